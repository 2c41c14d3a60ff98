"""The app the cluster tests run in `koala host` processes.

``Counter`` actors record every activation and deactivation by appending a line
``activate|deactivate KEY PID`` to the file named by ``KOALA_TEST_EVENTS``, so a test
counts activations through the actors themselves, across processes. The HTTP app
calls actors (``/hit/{key}``) and reports this host (``/stats``).
"""

from __future__ import annotations

import os
from abc import abstractmethod
from typing import Any

import anyio
from fastapi import FastAPI

from koala import ActorBase, ActorInterface, current_runtime, get_rpc_proxy

EVENTS_ENV = "KOALA_TEST_EVENTS"


def record(kind: str, key: object) -> None:
    path = os.environ.get(EVENTS_ENV)
    if path:
        line = f"{kind} {key} {os.getpid()}\n".encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one small O_APPEND write: lines never interleave
        finally:
            os.close(fd)


class ICounter(ActorInterface):
    @abstractmethod
    async def hit(self) -> list[int]: ...

    @abstractmethod
    async def bye(self) -> int: ...


class Counter(ICounter, ActorBase):
    def __init__(self) -> None:
        super().__init__()
        self.hits = 0

    async def on_activate(self) -> None:
        record("activate", self.key)

    async def on_deactivate(self) -> None:
        record("deactivate", self.key)

    async def hit(self) -> list[int]:
        """[the pid of the process holding this activation, hits so far]."""
        self.hits += 1
        return [os.getpid(), self.hits]

    async def bye(self) -> int:
        """Deactivate after this turn; the pid of this process."""
        self.deactivate_on_idle()
        return os.getpid()


app = FastAPI()


@app.get("/hit/{key}")
async def hit(key: str) -> list[int]:
    return await get_rpc_proxy(ICounter, key).hit()


@app.get("/within/{seconds}/{key}")
async def hit_within(seconds: float, key: str) -> list[int]:
    """``hit`` under the caller's own deadline (a cancel scope) rather than the default."""
    with anyio.fail_after(seconds):
        return await get_rpc_proxy(ICounter, key).hit()


@app.get("/bye/{key}")
async def bye(key: str) -> int:
    return await get_rpc_proxy(ICounter, key).bye()


@app.get("/stats")
async def stats() -> dict[str, Any]:
    rt = current_runtime()
    out: dict[str, Any] = {"pid": os.getpid(), "activations": rt.statistics().activations}
    directory: Any = rt.directory
    if hasattr(directory, "statistics"):
        s = directory.statistics()
        out.update(server_id=s.server_id, serving=s.serving, fences=s.fences)
        out.update(registrations=s.registrations, cached=s.cached, resolves=s.resolves)
        out.update(owned=s.owned, unreleased=s.unreleased, releases=s.releases, claims=s.claims)
        out.update(shed=s.shed)
    return out
