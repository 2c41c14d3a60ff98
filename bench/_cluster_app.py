"""The app `bench.cluster` runs in its `koala host` processes.

``/first_calls`` makes first calls to new actors from inside the host (so no HTTP
client sits between the figure and the cluster) and reports the rate and latencies.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from fastapi import FastAPI

from bench._measure import concurrent_calls
from koala import ActorBase, ActorInterface, current_runtime, get_rpc_proxy


class IPlaced(ActorInterface):
    @abstractmethod
    async def hello(self) -> int: ...


class Placed(IPlaced, ActorBase):
    async def hello(self) -> int:
        return 1


app = FastAPI()


@app.post("/first_calls")
async def first_calls(prefix: str, count: int, concurrency: int) -> dict[str, Any]:
    async def one(i: int) -> int:
        return await get_rpc_proxy(IPlaced, f"{prefix}-{i}").hello()

    return await concurrent_calls(count, concurrency, one)


@app.get("/lookups")
async def lookups() -> dict[str, int]:
    """Positions this host asked the PD for, and the requests (batches) that took."""
    directory: Any = current_runtime().directory
    stats = directory.statistics()
    return {"resolves": stats.resolves, "batches": stats.lookup_batches}
