"""The app `bench.cluster` runs in its `koala host` processes.

``/first_calls`` makes first calls to new actors from inside the host (so no HTTP
client sits between the figure and the cluster) and reports the rate and latencies.
"""

from __future__ import annotations

import statistics
import time
from abc import abstractmethod
from typing import Any

import anyio
from fastapi import FastAPI

from koala import ActorBase, ActorInterface, get_rpc_proxy


class IPlaced(ActorInterface):
    @abstractmethod
    async def hello(self) -> int: ...


class Placed(IPlaced, ActorBase):
    async def hello(self) -> int:
        return 1


app = FastAPI()


@app.post("/first_calls")
async def first_calls(prefix: str, count: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    keys = iter(range(count))

    async def caller() -> None:
        for i in keys:
            t0 = time.perf_counter()
            await get_rpc_proxy(IPlaced, f"{prefix}-{i}").hello()
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(caller)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "per_s": count / elapsed,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1e3,
    }
