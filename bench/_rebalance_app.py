"""The app `bench.rebalance` runs in its `koala host` processes: actors called at
random from a pool (collected after a short idle time, so they churn), and the host's
counts."""

from __future__ import annotations

import random
from abc import abstractmethod
from typing import Any

import anyio
from fastapi import FastAPI

from koala import ActorBase, ActorInterface, current_runtime, get_rpc_proxy

activated = 0  # activations this process made (each but a key's first is a re-placement)


class IMember(ActorInterface):
    @abstractmethod
    async def ping(self) -> int: ...


class Member(IMember, ActorBase):
    idle_timeout = 20.0

    async def on_activate(self) -> None:
        global activated
        activated += 1

    async def ping(self) -> int:
        return 1


app = FastAPI()


@app.post("/churn")
async def churn(pool: int, seconds: float, concurrency: int) -> dict[str, Any]:
    """Calls to random actors of a pool of ``pool`` from ``concurrency`` tasks for
    ``seconds``; how many, and how many failed."""
    calls = failed = 0
    end = anyio.current_time() + seconds

    async def caller() -> None:
        nonlocal calls, failed
        while anyio.current_time() < end:
            try:
                await get_rpc_proxy(IMember, f"m-{random.randrange(pool)}").ping()
            except Exception:
                failed += 1
            calls += 1

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(caller)
    return {"calls": calls, "failed": failed}


@app.get("/counts")
async def counts() -> dict[str, int]:
    rt = current_runtime()
    directory: Any = rt.directory
    return {
        "activations": rt.statistics().activations,
        "activated": activated,
        "shed": directory.statistics().shed,
    }
