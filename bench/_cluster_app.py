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


@app.post("/probe")
async def probe(prefix: str, seconds: float, concurrency: int, rate: float = 0.0) -> dict[str, Any]:
    """First calls to new actors from ``concurrency`` tasks for ``seconds``: each call's
    start (seconds since the probe began) and latency (ms), or its error.

    ``rate`` > 0: an open loop instead, one call every 1/rate s whatever the answers
    (at most ``concurrency`` in flight), each latency counted from when the call was
    due, so a stall shows in full without the probe's own queueing driving it."""
    import anyio

    samples: list[tuple[float, float]] = []
    errors: list[tuple[float, str]] = []
    start = anyio.current_time()
    counter = iter(range(10**9))
    if rate > 0:
        slots = anyio.Semaphore(concurrency)

        async def one(due: float) -> None:
            async with slots:
                try:
                    await get_rpc_proxy(IPlaced, f"{prefix}-{next(counter)}").hello()
                except Exception as exc:
                    errors.append((due - start, type(exc).__name__))
                    return
            samples.append((due - start, (anyio.current_time() - due) * 1000))

        async with anyio.create_task_group() as tg:
            due = start
            while due - start < seconds:
                await anyio.sleep_until(due)
                tg.start_soon(one, due)
                due += 1.0 / rate
        return {"samples": samples, "errors": errors}

    async def caller() -> None:
        while anyio.current_time() - start < seconds:
            began = anyio.current_time()
            try:
                await get_rpc_proxy(IPlaced, f"{prefix}-{next(counter)}").hello()
            except Exception as exc:
                errors.append((began - start, type(exc).__name__))
                await anyio.sleep(0.01)
                continue
            samples.append((began - start, (anyio.current_time() - began) * 1000))

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(caller)
    return {"samples": samples, "errors": errors}
