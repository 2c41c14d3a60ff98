"""Hosts check placement before a client session's turns.

Two in-process hosts registered with the embedded PD (its real placement and leases),
a real transport between them and a cluster gateway, and real WebSocket clients. The
gateway is handed a stale PD answer (a host under a server id it no longer has), or the
session's host is fenced and re-registers under a new id: the host refuses the session
as misplaced, the gateway re-resolves and re-binds it, and the actor ends up with one
activation, on the host the PD placed it on, having run every frame once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from koala import HostConfig, Runtime
from koala._host import embedded_pd
from koala.gateway import ClusterLink, Gateway, HostBridge
from koala.gateway._session import hub_for
from koala.pd import ActorPosition, ClusterDirectory, MemberConfig, PDClient, PlacementRemote
from koala.transport import Transport, TransportConfig

from ._gateway_client import WSClient, session
from ._gateway_helpers import ACTORS, EVENTS, EchoClient, gateway_config

pytestmark = pytest.mark.anyio

LIMIT = 20.0  # a bound for liveness, not a speed claim


@dataclass
class Host:
    runtime: Runtime
    directory: ClusterDirectory

    @property
    def address(self) -> str:
        return self.directory.address

    def holds(self, key: str) -> bool:
        return self.runtime.activation_of(EchoClient, key) is not None

    async def refence(self) -> int:
        """Fence this host and register it again, as after a lost lease: it gets a new
        server id. Returns the old one (its registration is deleted from the PD)."""
        d = self.directory
        old = d.server_id
        await d._fence()
        await d._register()
        d.serving = True
        await d.pd.delete(old)
        return old


class StalePD:
    """The PD, except that the next answer for an actor may be a stale one we set."""

    def __init__(self, pd: PDClient) -> None:
        self.pd = pd
        self.stale: dict[tuple[str, str], ActorPosition] = {}
        self.answers = 0

    async def find_position(self, actor_type: str, actor_id: str, ttl: int = 0) -> ActorPosition:
        self.answers += 1
        pos = self.stale.pop((actor_type, actor_id), None)
        return pos if pos is not None else await self.pd.find_position(actor_type, actor_id, ttl)


@asynccontextmanager
async def cluster_host(pd: PDClient) -> AsyncIterator[Host]:
    services = {impl.actor_type: f"{impl.__module__}.{impl.__qualname__}" for impl in ACTORS}
    async with Transport(TransportConfig(heartbeat_interval=0.5)) as transport:
        directory = ClusterDirectory(pd, "", services, MemberConfig(ttl=5))
        rt = Runtime(
            HostConfig(default_timeout=10.0, shutdown_grace=1.0),
            ACTORS,
            directory=directory,
            remote=PlacementRemote(transport, directory),
        )
        async with rt:
            transport.handler = rt.serve_request
            bridge = HostBridge(rt)
            transport.on_event = bridge.on_event
            directory.address = await transport.listen("127.0.0.1", 0)
            directory.attach(rt)
            async with anyio.create_task_group() as tg:
                tg.start_soon(bridge.run)
                await tg.start(directory.run)
                yield Host(rt, directory)
                tg.cancel_scope.cancel()


@asynccontextmanager
async def small_cluster() -> AsyncIterator[tuple[Host, Host, StalePD, ClusterLink, Any]]:
    """Two hosts and a gateway (its link talks to the PD through a StalePD)."""
    pd = embedded_pd()
    try:
        async with (
            cluster_host(pd) as a,
            cluster_host(pd) as b,
            Transport(TransportConfig()) as transport,
        ):
            stale = StalePD(pd)
            async with ClusterLink(stale, transport) as link, anyio.create_task_group() as tg:  # type: ignore[arg-type]
                gateway = Gateway(gateway_config(), link)
                shutdown = anyio.Event()
                address = await tg.start(gateway.serve, "127.0.0.1", 0, shutdown)
                try:
                    yield a, b, stale, link, address
                finally:
                    shutdown.set()
    finally:
        with anyio.CancelScope(shield=True):
            await pd.aclose()


async def receive(client: WSClient) -> str | bytes:
    with anyio.fail_after(LIMIT):
        item = await client.receive()
    assert isinstance(item, (str, bytes)), item
    return item


def seen(key: str, kind: str) -> list[Any]:
    return [value for k, value in EVENTS.get(key, []) if k == kind]


async def placed(pd: StalePD, key: str, a: Host, b: Host) -> tuple[Host, Host]:
    """(the host the PD places the actor on, the other one)."""
    pos = await pd.pd.find_position("EchoClient", key)
    home = a if pos.server_id == a.directory.server_id else b
    assert pos.server_id == home.directory.server_id
    return home, (b if home is a else a)


async def test_a_stale_answer_never_opens_a_second_activation() -> None:
    """The gateway is told the actor lives on a host under a server id that host had
    before it was fenced: that host refuses the session, the gateway asks the PD again
    and the session lands on the actor's real host, its frames in order, once."""
    key = "stale-1"
    EVENTS.pop(key, None)
    async with small_cluster() as (a, b, pd, link, address):
        home, other = await placed(pd, key, a, b)
        old_id = await other.refence()
        pd.stale[("EchoClient", key)] = ActorPosition("EchoClient", key, old_id, other.address, 0)
        async with session(address, "EchoClient", key) as client:
            assert str(await receive(client)).startswith("welcome ")
            await client.send_many(["a", b"b", "c"])
            assert [await receive(client) for _ in range(3)] == ["a", b"b", "c"]
        assert not pd.stale, "the gateway did not use the stale answer"
        assert home.holds(key)
        assert not other.holds(key)
        assert len(hub_for(other.runtime)) == 0
        assert seen(key, "open") == [True]  # re-bound once (the refused open never ran)
        assert seen(key, "msg") == ["a", b"b", "c"]
        assert link.statistics().failovers == 1
        stats = link.transport.statistics()  # refused, not cut off: no connection was lost
        assert (stats.connects, stats.connections) == (2, 2)


async def test_a_fenced_host_refuses_the_frames_of_its_old_sessions() -> None:
    """The session's host is fenced and re-registers under a new id (the PD places the
    actor afresh): its next frame is refused before it runs, the session is re-bound
    and the frame (never acknowledged) is sent again and runs once."""
    key = "fenced-1"
    EVENTS.pop(key, None)
    async with small_cluster() as (a, b, pd, link, address):
        home, _ = await placed(pd, key, a, b)
        async with session(address, "EchoClient", key) as client:
            assert "rebind=False" in str(await receive(client))
            await client.send("one")
            assert await receive(client) == "one"
            await home.refence()
            assert not home.holds(key)  # the fence evicted it
            await client.send("two")
            assert "rebind=True" in str(await receive(client))
            assert await receive(client) == "two"
            await client.send("three")
            assert await receive(client) == "three"
        assert seen(key, "msg") == ["one", "two", "three"]
        assert sum(h.holds(key) for h in (a, b)) == 1
        assert link.statistics().failovers == 1
        stats = link.transport.statistics()
        assert stats.connections == stats.connects


def test_the_unacknowledged_buffer_is_bounded_and_acks_are_cumulative() -> None:
    from koala.gateway import ClientCloseCode
    from koala.gateway._cluster import Unacked
    from koala.gateway._gateway import BindError

    buf = Unacked(max_frames=3, max_bytes=10)
    assert [buf.add(x) for x in ("ab", b"cd", "é")] == [1, 2, 3]
    with pytest.raises(BindError) as exc:
        buf.add("x")  # a 4th frame
    assert exc.value.code == ClientCloseCode.OVERLOADED
    assert buf.after(0) == (1, "ab")
    buf.ack(2)  # cumulative: frames 1 and 2
    assert (buf.acked, buf.size, buf.after(buf.acked)) == (2, 2, (3, "é"))
    with pytest.raises(BindError):
        buf.add(b"0123456789")  # 2 + 10 bytes > 10
    assert buf.add("y") == 4
    buf.ack(9)  # never beyond what was sent
    assert (buf.acked, len(buf.frames), buf.after(buf.acked)) == (4, 0, None)
