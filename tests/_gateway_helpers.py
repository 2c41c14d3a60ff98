"""Actors and start-up for the gateway tests (in-process and across processes)."""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskStatus

from koala import ActorBase, ActorInterface, HostConfig, Runtime
from koala._tls import TLSConfig
from koala.gateway import (
    ActorRef,
    ClientHandler,
    ClientSession,
    Gateway,
    GatewayConfig,
    IAccount,
    LocalLink,
)

from ._gateway_client import KEY

# What the actors saw, per actor key: ("open", rebind) / ("msg", data) / ("close", reason)
EVENTS: dict[str, list[tuple[str, Any]]] = {}


class IEchoClient(ActorInterface):
    @abstractmethod
    async def events(self) -> list[str]: ...


class EchoClient(IEchoClient, ClientHandler, ActorBase):
    """Echoes every frame; a few text commands steer it."""

    async def events(self) -> list[str]:
        return [f"{kind}:{value!r}" for kind, value in EVENTS.get(str(self.key), [])]

    def _log(self, kind: str, value: Any) -> None:
        EVENTS.setdefault(str(self.key), []).append((kind, value))

    async def on_client_open(self, session: ClientSession, rebind: bool) -> None:
        self._log("open", rebind)
        await session.push(f"welcome {session.open_id} pid={os.getpid()} rebind={rebind}")

    async def on_client_message(self, session: ClientSession, data: bytes | str) -> None:
        self._log("msg", data)
        if data == "close":
            await session.close(4100, "asked to")
        elif data == "flood":
            for i in range(10_000):
                await session.push(f"flood {i}")
        elif data == "sessions":
            await session.push(str(len(self.client_sessions)))
        elif data == "pid":
            await session.push(str(os.getpid()))
        elif data == "deactivate":
            self.deactivate_on_idle()
            await session.push("bye")
        else:
            await session.push(data)

    async def on_client_close(self, session: ClientSession, reason: str) -> None:
        self._log("close", reason)


class Account(IAccount, ActorBase):
    """Binds open ids starting with 'x' to nothing; others to EchoClient/acct-<open_id>."""

    async def find_actor(self, server_id: str) -> ActorRef:
        assert isinstance(self.key, str)
        if self.key.startswith("x"):
            raise LookupError(f"no player for {self.key}")
        return ActorRef("EchoClient", f"acct-{self.key}")


ACTORS: list[type[ActorBase]] = [EchoClient, Account]


def gateway_config(**overrides: Any) -> GatewayConfig:
    values: dict[str, Any] = {"private_key": KEY, "auth_timeout": 2.0, "idle_timeout": 5.0}
    values.update(overrides)
    return GatewayConfig(**values)


@asynccontextmanager
async def local_gateway(
    config: GatewayConfig | None = None,
    host_config: HostConfig | None = None,
    *,
    tls: TLSConfig | None = None,
) -> AsyncIterator[tuple[tuple[str, int], Gateway, Runtime]]:
    """A runtime with an in-process gateway on a free loopback port (wss with ``tls``)."""
    shutdown = anyio.Event()
    stopped = anyio.Event()
    cfg = host_config or HostConfig(default_timeout=10.0, shutdown_grace=2.0)
    async with Runtime(cfg, ACTORS) as rt, anyio.create_task_group() as tg:
        gateway = Gateway(config or gateway_config(), LocalLink(rt))

        async def serve(*, task_status: TaskStatus[tuple[str, int]]) -> None:
            try:
                await gateway.serve("127.0.0.1", 0, shutdown, tls=tls, task_status=task_status)
            finally:
                stopped.set()

        address = await tg.start(serve)
        try:
            yield address, gateway, rt
        finally:  # stop hypercorn through its trigger even when the test failed
            shutdown.set()
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await stopped.wait()
