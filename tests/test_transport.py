"""The transport over real loopback TCP, on every backend, nodes in one process."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import sniffio
from anyio.abc import ByteStream, SocketStream
from prometheus_client.parser import text_string_to_metric_families

from koala import (
    ConfigError,
    HostConfig,
    HostUnavailableError,
    OverloadedError,
    Runtime,
    _metrics,
    get_rpc_proxy,
)
from koala._net import split_hostport
from koala.testing import fail_if_hangs
from koala.transport import (
    NEED_DATA,
    Cancel,
    ClientMessage,
    CloseCode,
    Connection,
    ConnectionClosed,
    Event,
    HandshakeComplete,
    Ping,
    Request,
    Role,
    Transport,
)
from koala.transport._writers import StreamWriter
from koala.wire._wire import encode
from tests._hooks import require_hooks
from tests._transport_helpers import (
    SECRET,
    Echo,
    IAlpha,
    IEcho,
    free_port,
    node,
    transport_config,
)

pytestmark = pytest.mark.anyio

# A bound for "at once": far below every deadline in these tests, never a speed claim.
PROMPTLY = 8.0


def echo(rt: Runtime, key: str = "e") -> IEcho:
    return get_rpc_proxy(IEcho, key, runtime=rt)


async def wait_until(check: Callable[[], bool]) -> None:
    with anyio.fail_after(PROMPTLY):
        while not check():
            await anyio.sleep(0.01)


@asynccontextmanager
async def two_nodes(
    server_cfg: dict[str, Any] | None = None, client_cfg: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Runtime, Transport, Runtime, Transport]]:
    """Node 2 hosts Echo and Beta; node 1 hosts Alpha and calls node 2."""
    async with node(config=transport_config(**(server_cfg or {}))) as (rt2, t2, d2):
        placements = {"Echo": t2.address, "Beta": t2.address}
        async with node(placements, config=transport_config(**(client_cfg or {}))) as (
            rt1,
            t1,
            _,
        ):
            d2.placements["Alpha"] = t1.address
            yield rt1, t1, rt2, t2


@asynccontextmanager
async def raw_client(address: str) -> AsyncIterator[tuple[SocketStream, Connection]]:
    """A bare socket that completes the handshake by hand."""
    host, port = split_hostport(address)
    async with await anyio.connect_tcp(host, port) as stream:
        conn = Connection(Role.CLIENT, cluster_id="koala", node_id="raw")
        await stream.send(conn.initiate())
        while True:
            ev = conn.next_event()
            if isinstance(ev, HandshakeComplete):
                await stream.send(conn.data_to_send())
                break
            assert ev is NEED_DATA, ev
            conn.receive_data(await stream.receive())
        yield stream, conn


async def read_until_closed(stream: ByteStream, conn: Connection) -> ConnectionClosed:
    """Events until the server closes; the CLOSE it sent, as ConnectionClosed."""
    with anyio.fail_after(PROMPTLY):
        while True:
            ev = conn.next_event()
            if isinstance(ev, ConnectionClosed):
                return ev
            if ev is NEED_DATA:
                try:
                    data = await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    data = b""
                conn.receive_data(data or None)


async def until_dropped(stream: ByteStream) -> None:
    """Read until the server drops the connection (whatever it sent before)."""
    with anyio.fail_after(PROMPTLY):
        try:
            while True:
                await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return


@asynccontextmanager
async def fake_peer(
    behaviour: Callable[[SocketStream, Connection], Awaitable[None]],
) -> AsyncIterator[str]:
    """A listener that completes the handshake, then runs ``behaviour``."""

    async def serve(stream: SocketStream) -> None:
        conn = Connection(Role.SERVER, cluster_id="koala", node_id="fake")
        async with stream:
            while True:
                ev = conn.next_event()
                out = conn.data_to_send()
                if out:
                    await stream.send(out)
                if isinstance(ev, HandshakeComplete):
                    break
                if ev is NEED_DATA:
                    conn.receive_data(await stream.receive())
            await behaviour(stream, conn)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        bound: Any = listener.extra(anyio.abc.SocketAttribute.local_address)
        yield f"{bound[0]}:{bound[1]}"
        tg.cancel_scope.cancel()


async def receive_request(stream: SocketStream, conn: Connection) -> Request:
    while True:
        ev = conn.next_event()
        if isinstance(ev, Request):
            return ev
        if ev is NEED_DATA:
            conn.receive_data(await stream.receive())


# ---------------------------------------------------------------- calls


async def test_remote_call_returns_the_result() -> None:
    async with two_nodes() as (rt1, _, _, _):
        assert await echo(rt1).echo("hello") == "hello"
        assert await echo(rt1).add(2, 3) == 5


async def test_remote_error_keeps_type_message_and_traceback() -> None:
    async with two_nodes() as (rt1, _, _, _):
        with pytest.raises(ValueError, match="boom") as info:
            await echo(rt1).fail("boom")
        assert "raise ValueError(message)" in getattr(info.value, "remote_traceback", "")


async def test_many_concurrent_requests_share_one_connection() -> None:
    async with two_nodes() as (rt1, t1, _, t2):
        results: dict[int, int] = {}

        async def one(i: int) -> None:
            results[i] = await echo(rt1, f"k{i % 7}").add(i, i)

        async with anyio.create_task_group() as tg:
            for i in range(300):
                tg.start_soon(one, i)
        assert results == {i: 2 * i for i in range(300)}
        assert t1.statistics().connects == 1
        assert t1.statistics().connections == 1
        assert t2.statistics().connections == 1


async def test_frames_and_bytes_are_counted_both_ways_and_outlive_the_connection() -> None:
    text = "x" * 1000
    async with two_nodes() as (rt1, t1, _, t2):
        await echo(rt1).echo("warm")
        a0, b0 = t1.statistics(), t2.statistics()
        for _ in range(50):
            assert await echo(rt1).echo(text) == text
        a1, b1 = t1.statistics(), t2.statistics()
        assert a1.frames_sent - a0.frames_sent >= 50  # the requests (and maybe pings)
        assert b1.frames_sent - b0.frames_sent >= 50  # the answers
        assert a1.bytes_sent - a0.bytes_sent > 50 * len(text)
        assert b1.bytes_sent - b0.bytes_sent > 50 * len(text)
        # every answer read means every request before it was read by the other side
        assert b1.frames_received - b0.frames_received >= 50
        assert a1.bytes_received - a0.bytes_received >= b1.bytes_sent - b0.bytes_sent - 64
        scraped = {
            s.name: s.value
            for f in text_string_to_metric_families(_metrics.exposition()[0].decode())
            for s in f.samples
            if s.name.startswith("koala_transport_") and s.name.endswith("_total")
        }
        assert scraped["koala_transport_sent_bytes_total"] >= a1.bytes_sent
        assert scraped["koala_transport_received_bytes_total"] >= a1.bytes_received
        for ch in list(t1._all):
            ch.close()
        await wait_until(lambda: t1.statistics().connections == 0)
        after = t1.statistics()  # a closed connection's traffic stays counted
        assert after.frames_sent >= a1.frames_sent
        assert after.bytes_sent >= a1.bytes_sent
        assert after.bytes_received >= a1.bytes_received


async def test_reentrancy_across_nodes() -> None:
    async with two_nodes() as (rt1, _, _, t2):
        pids = await get_rpc_proxy(IAlpha, "a", runtime=rt1).start(1)
        assert len(pids) == 3
        # node 2 called node 1 back over the connection node 1 opened
        assert t2.statistics().connects == 0


async def test_one_way_call_is_delivered() -> None:
    Echo.poked.clear()
    async with two_nodes() as (rt1, _, _, _):
        await echo(rt1).poke("x")  # returns once sent
        await wait_until(lambda: Echo.poked == ["x"])


async def test_result_decoding_uses_the_annotation() -> None:
    async with two_nodes() as (rt1, _, _, _):
        assert await echo(rt1).pokes() == list(Echo.poked)


# ---------------------------------------------------------------- deadlines and cancel


async def test_cancel_crosses_the_wire_and_cancels_the_remote_turn() -> None:
    async with two_nodes() as (rt1, _, _, t2):
        before = Echo.cancelled
        async with anyio.create_task_group() as tg:
            tg.start_soon(echo(rt1).sleep, 60.0)
            await wait_until(lambda: t2.statistics().serving == 1)
            tg.cancel_scope.cancel()
        await wait_until(lambda: Echo.cancelled == before + 1)
        await wait_until(lambda: t2.statistics().serving == 0)


async def test_cancel_reaches_a_turn_served_by_a_reused_task() -> None:
    async with two_nodes() as (rt1, _, _, t2):
        for i in range(20):  # park serving tasks on node 2
            assert await echo(rt1, f"w{i}").add(i, 1) == i + 1
        before = Echo.cancelled
        async with anyio.create_task_group() as tg:
            tg.start_soon(echo(rt1, "w3").sleep, 60.0)
            await wait_until(lambda: t2.statistics().serving == 1)
            tg.cancel_scope.cancel()
        await wait_until(lambda: Echo.cancelled == before + 1)
        assert await echo(rt1, "w3").add(1, 1) == 2  # the reused task serves on


async def test_remaining_deadline_travels() -> None:
    async with two_nodes() as (rt1, _, _, t2):
        before = Echo.cancelled
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.5):
                await echo(rt1).sleep(60.0)
        await wait_until(lambda: Echo.cancelled == before + 1)
        await wait_until(lambda: t2.statistics().serving == 0)


async def test_the_default_deadline_of_a_remote_call_fails_it_and_cancels_the_turn() -> None:
    quick = HostConfig(default_timeout=0.3, collection_interval=0.05, shutdown_grace=2.0)
    async with node() as (_, t2, _), node({"Echo": t2.address}, host=quick) as (rt1, t1, _):
        before = Echo.cancelled
        async with fail_if_hangs():  # the call itself has no deadline but the default
            with pytest.raises(TimeoutError, match="before its deadline"):
                await echo(rt1).sleep(60.0)
            await wait_until(lambda: Echo.cancelled == before + 1)
            assert await echo(rt1).add(2, 2) == 4  # the connection serves on
            with pytest.raises(TimeoutError):
                await echo(rt1, "other").sleep(60.0)
        assert (await t1.channel(t2.address)).pending == 0


# ---------------------------------------------------------------- failures


async def test_peer_dying_fails_pending_calls_at_once() -> None:
    async def die_mid_call(stream: SocketStream, conn: Connection) -> None:
        await receive_request(stream, conn)
        await anyio.aclose_forcefully(stream)

    async with fake_peer(die_mid_call) as address, node({"Echo": address}) as (rt1, _, _):
        with anyio.fail_after(PROMPTLY):  # the call's own deadline is 60 s
            with pytest.raises(HostUnavailableError, match="may have run"):
                await echo(rt1).sleep(60.0)


async def test_heartbeat_detects_a_silent_peer() -> None:
    async def go_silent(stream: SocketStream, conn: Connection) -> None:
        await anyio.sleep_forever()

    cfg = transport_config(heartbeat_interval=0.1, heartbeat_timeout=0.5)
    async with fake_peer(go_silent) as address, node({"Echo": address}, config=cfg) as (rt, *_):
        with anyio.fail_after(PROMPTLY):
            with pytest.raises(HostUnavailableError, match="heartbeat"):
                await echo(rt).sleep(60.0)


async def test_unreachable_host_fails_fast_then_backs_off() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    cfg = transport_config(reconnect_min=5.0, reconnect_max=10.0)
    async with node({"Echo": address}, config=cfg) as (rt1, t1, _):
        with pytest.raises(HostUnavailableError, match="cannot be reached"):
            await echo(rt1).echo("x")
        with pytest.raises(HostUnavailableError, match="next attempt"):
            await echo(rt1).echo("x")
        assert t1.statistics().failed_connects == 1


async def test_reconnects_after_the_peer_comes_back() -> None:
    port = free_port()
    async with node({"Echo": f"127.0.0.1:{port}"}) as (rt1, t1, _):
        async with node(listen=("127.0.0.1", port)):
            assert await echo(rt1).echo("a") == "a"
        with pytest.raises(HostUnavailableError):
            await echo(rt1).echo("b")
        async with node(listen=("127.0.0.1", port)):
            with anyio.fail_after(PROMPTLY):
                while True:
                    try:
                        assert await echo(rt1).echo("c") == "c"
                        break
                    except HostUnavailableError:
                        await anyio.sleep(0.02)
        assert t1.statistics().connects == 2


async def test_malformed_frame_closes_only_that_connection() -> None:
    async with two_nodes() as (rt1, _, _, t2):
        assert await echo(rt1).echo("before") == "before"
        async with raw_client(t2.address) as (stream, conn):
            await stream.send(struct.pack(">I", 3) + b"\xff\xff\xff")
            closed = await read_until_closed(stream, conn)
        assert closed.code == CloseCode.PROTOCOL_ERROR
        assert "not valid CBOR" in closed.reason
        assert await echo(rt1).echo("after") == "after"
        await wait_until(lambda: t2.statistics().connections == 1)


async def test_oversized_frame_is_refused_from_its_prefix() -> None:
    async with two_nodes(server_cfg={"max_frame_size": 4096}) as (rt1, _, _, t2):
        async with raw_client(t2.address) as (stream, conn):
            await stream.send(struct.pack(">I", 1 << 30))  # 1 GiB announced, never sent
            closed = await read_until_closed(stream, conn)
        assert closed.code == CloseCode.FRAME_TOO_LARGE
        assert await echo(rt1).echo("still") == "still"
        await wait_until(lambda: t2.statistics().connections == 1)


async def test_garbage_before_the_handshake_is_dropped() -> None:
    async with two_nodes() as (rt1, _, _, t2):
        host, port = split_hostport(t2.address)
        async with await anyio.connect_tcp(host, port) as stream:
            await stream.send(b"\x00\x00\x00\x05garbage and more garbage")
            await until_dropped(stream)
        assert await echo(rt1).echo("fine") == "fine"
        assert t2.statistics().refused_connections == 1


async def test_handshake_timeout_closes_a_mute_connection() -> None:
    async with two_nodes(server_cfg={"handshake_timeout": 0.2}) as (_, _, _, t2):
        host, port = split_hostport(t2.address)
        async with await anyio.connect_tcp(host, port) as stream:
            conn = Connection(Role.CLIENT, cluster_id="koala", node_id="mute")
            conn.initiate()  # never sent
            closed = await read_until_closed(stream, conn)
        assert closed.code == CloseCode.HANDSHAKE_TIMEOUT


async def test_wrong_secret_is_refused() -> None:
    server = {"secret": SECRET}
    client = {"secret": "a-different-secret-0123456789"}
    async with two_nodes(server, client) as (rt1, _, _, t2):
        with pytest.raises(HostUnavailableError, match="secret"):
            await echo(rt1).echo("x")
        assert t2.statistics().connections == 0


async def test_failed_authentication_invokes_nothing() -> None:
    Echo.poked.clear()
    async with two_nodes(server_cfg={"secret": SECRET}) as (_, _, _, t2):
        host, port = split_hostport(t2.address)
        async with await anyio.connect_tcp(host, port) as stream:
            conn = Connection(Role.CLIENT, cluster_id="koala", node_id="intruder")
            hello = conn.initiate()
            forged_auth = struct.pack(">I", 35) + b"\x82\x02\x58\x20" + b"\0" * 32
            poke = Request(1, 1, 5.0, "Echo", "e", "IEcho", "poke", ["pwned"], True)
            body = encode(poke)
            await stream.send(hello)
            await stream.send(forged_auth + struct.pack(">I", len(body)) + body)
            await until_dropped(stream)
        await anyio.sleep(0.1)
        assert Echo.poked == []
        assert t2.statistics().refused_connections == 1


async def test_matching_secret_works() -> None:
    async with two_nodes({"secret": SECRET}, {"secret": SECRET}) as (rt1, _, _, _):
        assert await echo(rt1).echo("ok") == "ok"


async def test_listening_on_a_public_address_needs_a_secret() -> None:
    async with Transport(transport_config()) as t:
        with pytest.raises(ConfigError, match="KOALA_CLUSTER_SECRET"):
            await t.listen("0.0.0.0", 0)


async def test_listeners_bind_loopback_by_default() -> None:
    async with Transport(transport_config()) as t:
        address = await t.listen()
        assert split_hostport(address)[0] == "127.0.0.1"


async def test_server_side_in_flight_bound() -> None:
    async with two_nodes(server_cfg={"max_in_flight": 2}) as (rt1, *_):
        outcomes: list[str] = []

        async def one(i: int) -> None:
            try:
                await echo(rt1, f"s{i}").sleep(0.5)
                outcomes.append("ok")
            except OverloadedError:
                outcomes.append("overloaded")

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(one, i)
        assert sorted(outcomes) == ["ok", "ok", "overloaded", "overloaded"]


async def test_gateway_messages_reach_the_event_handler() -> None:
    seen: list[Event] = []
    async with two_nodes() as (_, t1, _, t2):
        t2.on_event = lambda ch, ev: seen.append(ev)
        ch = await t1.channel(t2.address)
        await ch.send_event(ClientMessage(3, b"\x01\x02"))
        await wait_until(lambda: seen == [ClientMessage(3, b"\x01\x02")])


async def test_go_away_marks_the_peer_draining() -> None:
    async with two_nodes() as (rt1, t1, _, t2):
        ch = await t1.channel(t2.address)
        await wait_until(lambda: t2.statistics().connections == 1)  # t2 has its end too
        await t2.go_away()
        await wait_until(lambda: ch.peer_draining)
        assert await echo(rt1).echo("still served") == "still served"


async def test_nothing_leaks_after_many_connections() -> None:
    async with two_nodes() as (_, _, _, t2):
        for _ in range(10):
            async with raw_client(t2.address) as (stream, conn):
                await stream.send(b"\xff" * 8)
                await read_until_closed(stream, conn)
        await wait_until(lambda: t2.statistics().connections == 0)
        assert t2.statistics().serving == 0


class _GatedStream(anyio.abc.ByteStream):
    """Wraps a stream: every send hangs until the stream is closed; counts sends."""

    def __init__(self, inner: ByteStream, *, hang: bool) -> None:
        self.inner = inner
        self.hang = hang
        self.sends = 0
        self.closed = anyio.Event()

    async def send(self, item: bytes) -> None:
        self.sends += 1
        if self.hang:
            await self.closed.wait()
            raise anyio.ClosedResourceError
        await self.inner.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        self.closed.set()
        await self.inner.aclose()


async def test_a_burst_of_frames_is_coalesced_into_few_sends() -> None:
    async with two_nodes(client_cfg={"direct_io": False}) as (rt1, t1, _, t2):
        assert await echo(rt1).echo("warm") == "warm"
        ch = await t1.channel(t2.address)
        writer = ch.writer
        assert isinstance(writer, StreamWriter)  # direct_io is off
        counting = writer.stream = _GatedStream(writer.stream, hang=False)

        async def one(i: int) -> None:
            assert await echo(rt1, f"c{i}").add(i, 1) == i + 1

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        assert counting.sends < 100  # 200 request frames


def _first_may_have_run_second_was_sent_again(outcomes: dict[str, object], t1: Transport) -> None:
    assert isinstance(outcomes["first"], HostUnavailableError)
    assert "may have run" in str(outcomes["first"])
    assert outcomes["second"] == "second"  # sent again on a new connection
    assert t1.statistics().connects == 2


async def test_a_request_that_never_left_is_retried_one_that_may_have_run_is_not() -> None:
    async with two_nodes(client_cfg={"direct_io": False}) as (rt1, t1, _, t2):
        assert await echo(rt1).echo("warm") == "warm"
        ch = await t1.channel(t2.address)
        writer = ch.writer
        assert isinstance(writer, StreamWriter)  # direct_io is off
        writer.stream = _GatedStream(writer.stream, hang=True)
        outcomes: dict[str, object] = {}

        async def call(name: str) -> None:
            try:
                outcomes[name] = await echo(rt1).echo(name)
            except HostUnavailableError as exc:
                outcomes[name] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "first")  # its frame is being written: may reach the peer
            await wait_until(lambda: ch.pending == 1)
            tg.start_soon(call, "second")  # queued behind it: surely never sent
            await wait_until(lambda: ch.pending == 2)
            ch.close("closed by the test")
        _first_may_have_run_second_was_sent_again(outcomes, t1)


async def test_bursts_of_large_frames_and_heartbeats_keep_the_connection() -> None:
    # 100 calls of 100 kB each at once (10 MB), then a control frame, which cannot
    # wait: writers waited for room instead of queueing without bound, so it fits. And
    # a PING or PONG that finds the queue backed up by one large frame is dropped (the
    # frames ahead of it show the peer this side is alive), never a reason to close
    async with two_nodes() as (rt1, t1, _, t2):
        assert await echo(rt1).echo("warm") == "warm"
        ch = await t1.channel(t2.address)
        big = "x" * 100_000

        async def one(i: int) -> None:
            assert await echo(rt1, f"b{i}").echo(f"{i}{big}") == f"{i}{big}"

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, i)
            await wait_until(lambda: ch.pending >= 50)
            ch.send_control(Cancel(10**9))  # cannot wait: it must fit
            assert not ch.closed, ch.close_reason
        huge = "y" * 12_000_000  # one frame of more than four times the buffer's bound

        async def large() -> None:
            assert await echo(rt1, "huge").echo(huge) == huge

        async with anyio.create_task_group() as tg:
            tg.start_soon(large)
            await wait_until(lambda: ch.pending == 1)
            ch.send_control(Ping(2), droppable=True)  # what the heartbeat sends
            ch.inject(Ping(3))  # the peer's: answered with a PONG
            assert not ch.closed, ch.close_reason
        assert not ch.closed, ch.close_reason


# ---------------------------------------------------------------- direct I/O (asyncio)


def _require_pipe() -> None:
    """Skip (before any task group, so the reason shows) unless channels take their
    transport over: on asyncio with its loop hook, never on trio."""
    if sniffio.current_async_library() == "trio":
        pytest.skip("trio channels keep their stream: there is no transport to take over")
    require_hooks("asyncio_pipe")


async def test_channel_statistics_name_the_io_path() -> None:
    trio = sniffio.current_async_library() == "trio"
    require_hooks("trio_lone_write" if trio else "asyncio_pipe")
    async with two_nodes(client_cfg={"direct_io": False}) as (rt1, t1, _, t2):
        assert await echo(rt1).echo("warm") == "warm"
        stats = (await t1.channel(t2.address)).statistics()
        assert (stats.pending, stats.serving, stats.io) == (0, 0, "stream")
        (inbound,) = t2._all
        assert inbound.statistics().io == ("stream+socket" if trio else "pipe")


def _pipe_of(ch: Any) -> Any:
    """The channel's taken-over transport (see _require_pipe)."""
    from koala.transport._pipe import Pipe

    assert isinstance(ch.writer, Pipe)
    return ch.writer


class _CountingTransport:
    """Forwards to a transport and counts writes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_direct_io_coalesces_a_burst_into_few_writes() -> None:
    _require_pipe()
    async with two_nodes() as (rt1, t1, _, t2):
        assert await echo(rt1).echo("warm") == "warm"
        ch = await t1.channel(t2.address)
        pipe = _pipe_of(ch)
        counting = pipe.transport = _CountingTransport(pipe.transport)

        async def one(i: int) -> None:
            assert await echo(rt1, f"c{i}").add(i, 1) == i + 1

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        assert 0 < counting.writes < 100  # 200 request frames


async def test_direct_io_a_frame_held_by_a_full_buffer_is_retried_elsewhere() -> None:
    _require_pipe()
    async with two_nodes() as (rt1, t1, _, t2):
        assert await echo(rt1).echo("warm") == "warm"
        ch = await t1.channel(t2.address)
        pipe = _pipe_of(ch)
        outcomes: dict[str, object] = {}

        async def call(name: str, sleep: bool) -> None:
            try:
                proxy = echo(rt1, name)
                outcomes[name] = await (proxy.sleep(30) if sleep else proxy.echo(name))
            except HostUnavailableError as exc:
                outcomes[name] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "first", True)  # written: the peer is running it
            await wait_until(lambda: ch.pending == 1)
            pipe.pause_writing()  # as the transport does when its buffer is full
            tg.start_soon(call, "second", False)  # waits for room: never written
            await wait_until(lambda: ch.pending == 2)
            ch.close("closed by the test")
        _first_may_have_run_second_was_sent_again(outcomes, t1)


async def test_direct_io_refuses_control_frames_past_the_bound() -> None:
    _require_pipe()
    async with two_nodes() as (rt1, t1, _, t2):
        assert await echo(rt1).echo("warm") == "warm"
        ch = await t1.channel(t2.address)
        pipe = _pipe_of(ch)
        pipe.overfull = lambda max_frames: True  # as if the peer had stopped reading
        ch.send_control(Cancel(10**9))  # a control frame (a CANCEL, a PONG) cannot wait
        assert ch.closed
        assert "the peer is not reading" in ch.close_reason


async def test_a_request_started_by_the_reader_that_suspends_keeps_the_connection_going() -> None:
    # in stream mode (trio; asyncio without direct I/O) the reader starts a request of a
    # method that has kept finishing without suspending itself; when one suspends after
    # all, another task takes the reading over while this one finishes the request
    async with two_nodes(server_cfg={"direct_io": False}) as (rt1, _, _, t2):
        proxy = echo(rt1, "reader")
        for _ in range(12):  # more than koala._drive.SYNC_METHOD_CALLS
            assert await proxy.sleep_if(0) == "quick"
        results: list[str] = []

        async def slow() -> None:
            results.append(await proxy.sleep_if(0.3))

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            await wait_until(lambda: t2.statistics().serving == 1)
            # the connection still reads and answers while that request sleeps
            assert await echo(rt1, "other").add(2, 3) == 5
        assert results == ["slept"]
        # and a caller's deadline reaches such a request: it is cancelled at the host
        for _ in range(12):
            assert await echo(rt1, "again").sleep_if(0) == "quick"
        before = Echo.cancelled
        with pytest.raises(TimeoutError), anyio.fail_after(0.3):
            await echo(rt1, "again").sleep_if(30)
        await wait_until(lambda: Echo.cancelled == before + 1)
        await wait_until(lambda: t2.statistics().serving == 0)


async def test_direct_io_a_frame_the_closed_transport_refuses_is_not_written() -> None:
    if sniffio.current_async_library() == "trio":
        pytest.skip("the pipe is asyncio's")
    from koala.transport._pipe import Pipe

    class Closed:
        def write(self, data: bytes) -> None:
            raise RuntimeError("the handler is closed")  # as uvloop says it

    written: list[int] = []
    pipe = Pipe(Closed(), lambda data: None, lambda reason: None, written.append, 8)  # type: ignore[arg-type]
    assert pipe.try_write(b"frame", 5)
    assert written == []  # so its call fails as not sent, safe to send elsewhere
    assert pipe.lost


async def test_direct_io_a_call_waiting_for_room_ends_at_its_default_deadline() -> None:
    _require_pipe()
    quick = HostConfig(default_timeout=0.3, collection_interval=0.05, shutdown_grace=2.0)
    async with node() as (_, t2, _), node({"Echo": t2.address}, host=quick) as (rt1, t1, _):
        assert await echo(rt1).echo("warm") == "warm"
        ch = await t1.channel(t2.address)
        pipe = _pipe_of(ch)
        pipe.pause_writing()  # the peer is not reading: no room to write
        async with fail_if_hangs():
            with pytest.raises(TimeoutError):
                await echo(rt1).echo("never written")
        assert ch.pending == 0
        pipe.resume_writing()
        assert await echo(rt1).echo("room again") == "room again"
