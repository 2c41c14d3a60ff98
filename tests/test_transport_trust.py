"""Input before trust, over real loopback sockets, on every backend: strangers are
bounded by what a handshake needs, held apart from proven peers, and liveness counts
whole frames."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import SocketStream

from koala import ConfigError
from koala._net import split_hostport
from koala.transport import CloseCode, Connection, Role, TransportConfig
from koala.wire._protocol import MAX_HANDSHAKE_FRAME
from tests._transport_helpers import node, transport_config
from tests.test_transport import (
    PROMPTLY,
    echo,
    raw_client,
    read_until_closed,
    two_nodes,
    wait_until,
)

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def strangers(address: str, count: int) -> AsyncIterator[list[SocketStream]]:
    """``count`` connections that never say a word."""
    host, port = split_hostport(address)
    streams: list[SocketStream] = []
    try:
        for _ in range(count):
            streams.append(await anyio.connect_tcp(host, port))
        yield streams
    finally:
        for stream in streams:
            await anyio.aclose_forcefully(stream)


async def test_an_oversized_frame_before_hello_is_refused_from_its_prefix() -> None:
    async with two_nodes() as (rt1, _, _, t2):
        host, port = split_hostport(t2.address)
        async with await anyio.connect_tcp(host, port) as stream:
            conn = Connection(Role.CLIENT, cluster_id="koala", node_id="stranger")
            conn.initiate()  # to read the server's CLOSE with it; never sent
            await stream.send(struct.pack(">I", 16 * 1024 * 1024))  # announced, never sent
            closed = await read_until_closed(stream, conn)
        assert closed.code == CloseCode.FRAME_TOO_LARGE
        assert f"limit is {MAX_HANDSHAKE_FRAME}" in closed.reason
        assert t2.statistics().refused_connections == 1
        assert await echo(rt1).echo("still") == "still"


async def test_strangers_beyond_the_cap_displace_the_oldest_stranger() -> None:
    async with two_nodes(server_cfg={"max_unauthenticated": 4}) as (rt1, t1, _, t2):
        assert await echo(rt1).echo("proven") == "proven"  # a peer proven before
        async with strangers(t2.address, 4) as idle:
            await wait_until(lambda: t2.statistics().unauthenticated == 4)
            async with strangers(t2.address, 1):
                conn = Connection(Role.CLIENT, cluster_id="koala", node_id="oldest")
                conn.initiate()
                closed = await read_until_closed(idle[0], conn)
                assert closed.code == CloseCode.OVERLOADED
                assert "max_unauthenticated" in closed.reason
                await wait_until(lambda: t2.statistics().displaced == 1)
                assert t2.statistics().unauthenticated == 4
                # the proven peer kept its connection and is still served
                assert await echo(rt1).echo("kept") == "kept"
                assert t1.statistics().connects == 1
                assert t2.statistics().connections == 1


async def test_a_flood_of_idle_strangers_keeps_no_peer_out() -> None:
    cfg = {"max_unauthenticated": 8, "handshake_timeout": 30.0}
    async with two_nodes(server_cfg=cfg) as (rt1, t1, _, t2):
        assert await echo(rt1).echo("proven") == "proven"
        async with strangers(t2.address, 100):  # far more than the cap, all idle
            await wait_until(lambda: t2.statistics().displaced >= 100 - 8)
            for i in range(5):  # new peers get in, and call, while the flood holds
                async with node({"Echo": t2.address}) as (rt, t, _):
                    assert await echo(rt, f"new{i}").echo("in") == "in"
                    assert t.statistics().connects == 1
            assert await echo(rt1).echo("kept") == "kept"
            assert t1.statistics().connects == 1
        await wait_until(lambda: t2.statistics().unauthenticated == 0)


async def test_the_handshake_timeout_closes_a_stranger_that_sends_a_frame_slowly() -> None:
    async with two_nodes(server_cfg={"handshake_timeout": 0.5}) as (_, _, _, t2):
        host, port = split_hostport(t2.address)
        async with await anyio.connect_tcp(host, port) as stream:
            conn = Connection(Role.CLIENT, cluster_id="koala", node_id="slow")
            hello = conn.initiate()
            with anyio.fail_after(PROMPTLY):
                async with anyio.create_task_group() as tg:

                    async def trickle() -> None:
                        for byte in hello[:-1]:  # never the last one
                            await stream.send(bytes([byte]))
                            await anyio.sleep(0.05)

                    tg.start_soon(trickle)
                    closed = await read_until_closed(stream, conn)
                    tg.cancel_scope.cancel()
        assert closed.code == CloseCode.HANDSHAKE_TIMEOUT


async def test_a_peer_trickling_a_frame_after_the_handshake_is_closed_by_the_heartbeat() -> None:
    # 1 byte every 0.2 s of a frame that never ends, after a valid handshake: bytes keep
    # arriving well within the heartbeat timeout, but no whole frame does
    cfg = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}
    async with two_nodes(server_cfg=cfg) as (rt1, _, _, t2):
        assert await echo(rt1).echo("proven") == "proven"
        closes: list[tuple[int, str]] = []

        async def trickler() -> None:
            async with raw_client(t2.address) as (stream, conn):
                header = struct.pack(">I", 1000)

                async def trickle() -> None:
                    for i in range(1000):
                        await stream.send(header if i == 0 else b"\x00")
                        await anyio.sleep(0.2)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(trickle)
                    closed = await read_until_closed(stream, conn)
                    tg.cancel_scope.cancel()
                closes.append((closed.code, closed.reason))

        with anyio.fail_after(PROMPTLY):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(trickler)
        assert len(closes) == 10
        assert all(code == CloseCode.HEARTBEAT_TIMEOUT for code, _ in closes), closes
        assert all("no whole frame" in reason for _, reason in closes), closes
        await wait_until(lambda: t2.statistics().connections == 1)  # rt1's alone
        assert await echo(rt1).echo("alive") == "alive"  # a peer that sends frames stays


def test_the_stranger_cap_is_validated() -> None:
    assert TransportConfig().max_unauthenticated == 64
    with pytest.raises(ConfigError, match="max_unauthenticated"):
        TransportConfig(max_unauthenticated=0)


def test_ids_too_long_for_a_handshake_are_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="node_id takes 2000 bytes"):
        transport_config(node_id="n" * 2000)
    with pytest.raises(ConfigError, match="cluster_id"):
        transport_config(cluster_id="\u00e9" * 600)
