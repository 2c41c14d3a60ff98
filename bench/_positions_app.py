"""The app `bench.positions` runs in its `koala host` processes: actors that are called
once and then collected (a short idle timeout), and the host's counts."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from fastapi import FastAPI

from bench._measure import concurrent_calls
from koala import ActorBase, ActorInterface, current_runtime, get_rpc_proxy


class IVisitor(ActorInterface):
    @abstractmethod
    async def visit(self) -> int: ...


class Visitor(IVisitor, ActorBase):
    idle_timeout = 2.0  # collected soon after its one call

    async def visit(self) -> int:
        return 1


app = FastAPI()


@app.post("/visit")
async def visit(prefix: str, count: int, concurrency: int) -> dict[str, Any]:
    async def one(i: int) -> int:
        return await get_rpc_proxy(IVisitor, f"{prefix}-{i}").visit()

    return await concurrent_calls(count, concurrency, one)


@app.get("/counts")
async def counts() -> dict[str, int]:
    rt = current_runtime()
    directory: Any = rt.directory
    stats = directory.statistics()
    return {
        "activations": rt.statistics().activations,
        "owned": stats.owned,
        "unreleased": stats.unreleased,
        "releases": stats.releases,
        "release_batches": stats.release_batches,
    }
