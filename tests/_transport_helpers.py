"""Shared pieces of the transport tests: actors, a static directory, node start-up.

Also runnable as a host process for the cross-process tests::

    python -m tests._transport_helpers --listen 127.0.0.1:PORT --backend trio \\
        --place Alpha=127.0.0.1:P1 --place Beta=127.0.0.1:P2

It prints ``READY <address>`` once listening and serves until stdin closes. With
KOALA_TLS_CERT/KEY/CA set it speaks TLS on its host links.

Or as a flood of idle strangers against a host (an attacker's process)::

    python -m tests._transport_helpers --flood 127.0.0.1:PORT --count 1100

It keeps ``count`` connections open that never send a byte, opening a new one for each
the host drops; prints ``FLOODING`` once they are all open and the host has dropped
one, and ``REOPENED <n>`` when stdin closes.
"""

from __future__ import annotations

import argparse
import os
import sys
from abc import abstractmethod
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio

from koala import LOCAL, ActorBase, ActorInterface, HostConfig, Key, Runtime, one_way
from koala._tls import TLSConfig
from koala.testing import free_port as free_port
from koala.transport import Transport, TransportConfig

SECRET = "test-secret-0123456789abcdef"


class StaticDirectory:
    """Actor type -> node address, fixed up front; unknown types and ``me`` are local."""

    def __init__(self, placements: Mapping[str, str] | None = None, me: str = "") -> None:
        self.placements = dict(placements or {})
        self.me = me

    def lookup(self, actor_type: str, key: Key) -> str | None:
        host = self.placements.get(actor_type)
        return LOCAL if host is None or host == self.me else host

    async def resolve(self, actor_type: str, key: Key) -> str:
        host = self.lookup(actor_type, key)
        assert host is not None
        return host

    def forget(self, actor_type: str, key: Key) -> None:
        """Nothing is cached: placements here never change."""

    def claim(self, actor_type: str, key: Key, ticket: bytes) -> bool:
        return False  # no server ids here: look it up

    def released(self, actor_type: str, key: Key) -> None:
        pass


# ---------------------------------------------------------------- actors


class IEcho(ActorInterface):
    @abstractmethod
    async def echo(self, text: str) -> str: ...

    @abstractmethod
    async def add(self, a: int, b: int) -> int: ...

    @abstractmethod
    async def sleep(self, seconds: float) -> str: ...

    @abstractmethod
    async def sleep_if(self, seconds: float) -> str: ...

    @abstractmethod
    async def fail(self, message: str) -> str: ...

    @abstractmethod
    async def where(self) -> int: ...

    @abstractmethod
    async def cancelled_count(self) -> int: ...

    @abstractmethod
    @one_way
    async def poke(self, text: str) -> None: ...

    @abstractmethod
    async def pokes(self) -> list[str]: ...


class Echo(IEcho, ActorBase):
    cancelled = 0
    poked: list[str] = []

    async def echo(self, text: str) -> str:
        return text

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def sleep(self, seconds: float) -> str:
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            Echo.cancelled += 1
            raise
        return "slept"

    async def sleep_if(self, seconds: float) -> str:
        """Finishes without suspending when ``seconds`` is 0, else sleeps."""
        if seconds <= 0:
            return "quick"
        return await self.sleep(seconds)

    async def fail(self, message: str) -> str:
        raise ValueError(message)

    async def where(self) -> int:
        return os.getpid()

    async def cancelled_count(self) -> int:
        return Echo.cancelled

    async def poke(self, text: str) -> None:
        Echo.poked.append(text)

    async def pokes(self) -> list[str]:
        return list(Echo.poked)


class IAlpha(ActorInterface):
    @abstractmethod
    async def start(self, depth: int) -> list[int]: ...

    @abstractmethod
    async def back(self) -> int: ...


class IBeta(ActorInterface):
    @abstractmethod
    async def bounce(self, key: str) -> list[int]: ...


class Alpha(IAlpha, ActorBase):
    async def start(self, depth: int) -> list[int]:
        """Alpha -> Beta (other node) -> Alpha.back (this activation, same chain)."""
        assert isinstance(self.key, str)
        return [os.getpid(), *await self.get_proxy(IBeta, "b").bounce(self.key)]

    async def back(self) -> int:
        return os.getpid()


class Beta(IBeta, ActorBase):
    async def bounce(self, key: str) -> list[int]:
        return [os.getpid(), await self.get_proxy(IAlpha, key).back()]


ACTORS: list[type[ActorBase]] = [Echo, Alpha, Beta]


# ---------------------------------------------------------------- nodes


def transport_config(**overrides: Any) -> TransportConfig:
    values: dict[str, Any] = {
        "heartbeat_interval": 0.5,
        "heartbeat_timeout": 5.0,
        "reconnect_min": 0.01,
        "reconnect_max": 0.1,
        "handshake_timeout": 2.0,
        "connect_timeout": 2.0,
    }
    values.update(overrides)
    return TransportConfig(**values)


def host_config() -> HostConfig:
    return HostConfig(default_timeout=10.0, collection_interval=0.05, shutdown_grace=2.0)


@asynccontextmanager
async def node(
    placements: Mapping[str, str] | None = None,
    *,
    actors: list[type[ActorBase]] | None = None,
    listen: tuple[str, int] | None = ("127.0.0.1", 0),
    config: TransportConfig | None = None,
    host: HostConfig | None = None,
) -> AsyncIterator[tuple[Runtime, Transport, StaticDirectory]]:
    """A runtime with a transport, listening (by default) on a free loopback port."""
    directory = StaticDirectory(placements)
    async with Transport(config or transport_config()) as transport:
        rt = Runtime(host or host_config(), actors or ACTORS, directory=directory, remote=transport)
        async with rt:
            transport.handler = rt.serve_request
            if listen is not None:
                directory.me = await transport.listen(*listen)
            yield rt, transport, directory


# ---------------------------------------------------------------- a host process


async def _serve(args: argparse.Namespace) -> None:
    placements = dict(p.split("=", 1) for p in args.place)
    host, _, port = args.listen.rpartition(":")
    secret = os.environ.get("KOALA_CLUSTER_SECRET") or None
    cfg = transport_config(secret=secret, tls=TLSConfig.from_env())
    async with node(placements, listen=(host, int(port)), config=cfg) as (_, transport, _):
        print("READY", transport.address, flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


async def _flood(args: argparse.Namespace) -> None:
    host, _, port = args.flood.rpartition(":")
    reopened = 0
    opened = anyio.Event()
    count = 0

    async def stranger() -> None:
        nonlocal reopened, count
        first = True
        while True:
            try:
                stream = await anyio.connect_tcp(host, int(port))
            except OSError:
                await anyio.sleep(0.01)
                continue
            if first:
                first = False
                count += 1
            else:
                reopened += 1
            if count == args.count and reopened:  # all open, and the host drops some
                opened.set()
            async with stream:
                try:
                    while True:  # never says a word; waits to be dropped
                        await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    pass

    async with anyio.create_task_group() as tg:
        for _ in range(args.count):
            tg.start_soon(stranger)
        await opened.wait()
        print("FLOODING", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        print("REOPENED", reopened, flush=True)
        tg.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen")
    parser.add_argument("--flood")
    parser.add_argument("--count", type=int, default=1100)
    parser.add_argument("--backend", default="asyncio")
    parser.add_argument("--place", action="append", default=[])
    args = parser.parse_args()
    if args.flood:
        anyio.run(_flood, args)
        return
    if not args.listen:
        parser.error("give --listen HOST:PORT (or --flood HOST:PORT)")
    backend = "trio" if args.backend == "trio" else "asyncio"
    options = {"use_uvloop": True} if args.backend == "uvloop" else {}
    anyio.run(_serve, args, backend=backend, backend_options=options)


if __name__ == "__main__":
    main()
