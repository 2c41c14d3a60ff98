"""One open connection to a peer node: calls out, frames in, expiry, heartbeat, close.

A :class:`Channel` runs over one byte stream, in parts of one job each: the channel
itself keeps the calls this node makes (matched to their answers by id; cancelling a
caller sends CANCEL), dispatches the frames that arrive, fails the calls that carry
the default deadline when it passes, sends heartbeats (PING every interval; a peer
from which no whole frame came for ``heartbeat_timeout`` is dead, however many bytes
of an unfinished one arrive) and closes. Requests from the peer go to its
:class:`~._serving.Serving`; frames leave through its writer (``_writers``).

How bytes move depends on the backend. On asyncio the channel takes the stream's
transport over (``_pipe.Pipe``, reader and writer at once): frames are decoded and
dispatched as bytes arrive. Elsewhere (trio), and always under TLS, whose bytes must
pass through the TLS layer, a reader task reads the stream and a
:class:`~._writers.StreamWriter` writes it. When the connection ends for any reason
every pending call fails at once: with :class:`HostUnavailableError` if its frame may
have reached the peer, or with :class:`NotSent` (safe to send elsewhere) if it was
still queued here.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from anyio.abc import ByteStream, TaskGroup, TaskStatus

from .._drive import fast_clock, scope_marker
from .._errors import HostUnavailableError, OverloadedError
from .._loop import trio_socket
from .._messages import Request as CallRequest
from .._messages import Response as CallResponse
from ..wire._events import (
    GATEWAY_EVENTS,
    NEED_DATA,
    Cancel,
    CloseCode,
    ConnectionClosed,
    Event,
    GoAway,
    HandshakeComplete,
    Ping,
    Pong,
    ProtocolError,
    RemoteProtocolError,
    Request,
    Response,
)
from ..wire._protocol import Connection
from ._config import TransportConfig
from ._pipe import takeover
from ._serving import Handler as Handler
from ._serving import Serving, Signal, event_factory
from ._writers import NotSent as NotSent
from ._writers import StreamWriter, Writer

log = logging.getLogger("koala.transport")

EventHandler = Callable[["Channel", Event], None]


class _Pending:
    __slots__ = ("deadline", "done", "error", "req", "response", "written")

    def __init__(self, req: CallRequest, new_event: Callable[[], Signal]) -> None:
        self.req = req
        self.deadline = req.deadline if req.expires else math.inf  # see _expire_calls
        self.done = new_event()
        self.response: CallResponse | None = None
        self.error: BaseException | None = None
        self.written = False


@dataclass(frozen=True, slots=True)
class ChannelStatistics:
    """``pending``: calls out waiting for their answer; ``serving``: requests in accepted
    and not answered yet; ``io``: how bytes move: "pipe" (asyncio: the transport driven
    by callbacks), "stream+socket" (trio: a lone frame written to the socket, the rest
    through the stream) or "stream" (anyio's stream alone: TLS, or ``direct_io`` off)."""

    pending: int
    serving: int
    io: str


class ChannelState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"  # closed by either side; its task group is ending
    CLOSED = "closed"  # ended: its pending calls fail, its writer closes


class Channel:
    """An authenticated connection to ``peer``; use it from many tasks at once."""

    def __init__(
        self,
        stream: ByteStream,
        conn: Connection,
        peer: HandshakeComplete,
        config: TransportConfig,
        *,
        name: str,
        handler: Callable[[], Handler | None],  # a getter: see Transport.handler
        on_event: Callable[[], EventHandler | None],
        on_close: Callable[[Channel], None],
        sync_methods: dict[tuple[str, str], int],
    ) -> None:
        self.stream = stream
        self.conn = conn
        self.peer = peer
        self.config = config
        self.name = name  # the address dialed, or the peer's address, for messages
        self._handler = handler
        self._on_event = on_event
        self._on_close = on_close
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._serving = Serving(self, handler, sync_methods)
        self._next_expiry = 0.0  # when _expire_calls looks next
        self._expiry = anyio.Event()  # set: look now
        self._clock: Callable[[], float] = anyio.current_time
        self._new_event: Callable[[], Signal] = anyio.Event  # see event_factory
        self._tg: TaskGroup | None = None
        # the stream's until run() knows better: asyncio's pipe, or trio's socket
        self._stream_writer = self._new_stream_writer(None)
        self._writer: Writer = self._stream_writer
        self.state = ChannelState.OPEN
        self.close_reason = ""
        self._close_frame = b""
        self._ended = anyio.Event()

    def __repr__(self) -> str:
        return f"<Channel {self.name} node={self.peer.peer_node_id} {self.state.value}>"

    @property
    def closed(self) -> bool:
        """Whether the channel is closing or closed: no new call may start on it."""
        return self.state is not ChannelState.OPEN

    @property
    def peer_draining(self) -> bool:
        """Whether the peer said GOAWAY (it is draining: new sessions go elsewhere)."""
        return self.conn.peer_draining

    async def wait_closed(self) -> None:
        """Return once the connection has ended (its pending calls have failed)."""
        await self._ended.wait()

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def serving(self) -> int:
        return len(self._serving)

    @property
    def writer(self) -> Writer:
        """How this channel's frames leave (a ``_pipe.Pipe`` or a ``StreamWriter``)."""
        return self._writer

    def statistics(self) -> ChannelStatistics:
        return ChannelStatistics(len(self._pending), len(self._serving), self._writer.io)

    def send_control(self, ev: Event, *, droppable: bool = False) -> None:
        """Queue a frame that cannot wait (CANCEL, PING, PONG), from synchronous code: a
        full write queue closes the connection, or drops a ``droppable`` frame."""
        self.enqueue_nowait(self.conn.send(ev), droppable=droppable)

    def inject(self, ev: Event) -> None:
        """Act on ``ev`` as if the peer had sent it (for tests: a PING that arrives
        while the write queue is full, say)."""
        self._dispatch(ev)

    # ------------------------------------------------------------ running

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it closes; never raises (errors close it)."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._clock = fast_clock()[0]
                self._new_event = event_factory()
                self._serving.start(tg, self._clock, scope_marker(), self._new_event)
                tg.start_soon(self._heartbeat)
                tg.start_soon(self._expire_calls)
                if self._take_over():
                    task_status.started()
                    await anyio.sleep_forever()  # the pipe's callbacks read; _stop ends it
                else:
                    raw = self._raw_socket()
                    if raw is not None:
                        self._writer = self._stream_writer = self._new_stream_writer(raw)
                    self._stream_writer.start(tg)
                    tg.start_soon(self._reader, name="koala-read")
                    task_status.started()
                    await anyio.sleep_forever()  # _stop ends it
        except Exception as exc:  # a bug here must not take the node down
            log.exception("connection %s failed", self.name)
            self._stop(CloseCode.PROTOCOL_ERROR, f"internal error: {exc!r}")
        finally:
            await self._cleanup()

    def close(self, reason: str = "closed by this node", code: int = CloseCode.NORMAL) -> None:
        """Close the connection (pending calls fail with HostUnavailableError)."""
        self._stop(code, reason)

    def _stop(self, code: int, reason: str, *, send_close: bool = True) -> None:
        if self.state is not ChannelState.OPEN:
            return
        self.state = ChannelState.CLOSING
        self.close_reason = reason
        self._writer.stop()
        if send_close:
            try:
                self._close_frame = self.conn.close_frame(ProtocolError(reason, CloseCode(code)))
            except (ProtocolError, ValueError):
                self._close_frame = b""
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def _cleanup(self) -> None:
        if not self.closed:
            self._stop(CloseCode.NORMAL, "the connection ended")
        self._on_close(self)
        self.state = ChannelState.CLOSED
        self._ended.set()
        self._serving.close()
        pending, self._pending = self._pending, {}
        self._writer.abandon()  # the frames not written yet stay unwritten
        for p in pending.values():
            if p.written:
                p.error = HostUnavailableError(
                    f"the connection to {self.name} (node {self.peer.peer_node_id}) was lost "
                    f"({self.close_reason}) while the call was in flight; it may have run"
                )
            else:
                p.error = NotSent(self.close_reason)
            p.done.set()
        await self._writer.close(self._close_frame)

    # ------------------------------------------------------------ reading

    def _take_over(self) -> bool:
        """On asyncio, read and write through the transport itself (see _pipe)."""
        if not self.config.direct_io or self.config.tls is not None:
            return False
        taken = takeover(
            self.stream, self._received, self._lost, self._written, self.config.write_queue_size
        )
        if taken is None:
            return False
        self._writer, leftover = taken
        if leftover:
            self.conn.receive_data(leftover)
        self._process(False)  # frames that came with the handshake, or after it
        return True

    def _new_stream_writer(self, raw: socket.socket | None) -> StreamWriter:
        return StreamWriter(
            self.stream, raw, self.config.write_queue_size, self._written, self._broken
        )

    def _broken(self, reason: str) -> None:
        self._stop(CloseCode.NORMAL, reason, send_close=False)

    def _raw_socket(self) -> socket.socket | None:
        """On trio, the stream's socket, to write a lone frame to it directly: trio keeps
        no buffer of its own, so bytes written here stay in order with its sends."""
        if not self.config.direct_io or self.config.tls is not None:  # TLS: bytes go through it
            return None
        return trio_socket(self.stream)  # None unless it is anyio's plain trio stream

    def _received(self, data: bytes | bytearray | memoryview) -> None:
        """The pipe's bytes (b"": the peer closed its side)."""
        self.conn.receive_data(data or None)
        self._process(False)

    def _lost(self, reason: str) -> None:
        self._stop(CloseCode.NORMAL, reason, send_close=False)

    def _written(self, rid: int) -> None:
        p = self._pending.get(rid)
        if p is not None:
            p.written = True  # from here on it may reach the peer

    def _process(self, in_reader: bool) -> bool:
        """Dispatch every complete frame received (``in_reader``: in the stream's reader
        task, which may start a request itself); False once the connection ended."""
        conn = self.conn
        while True:
            try:
                ev = conn.next_event()
            except RemoteProtocolError as exc:
                log.warning("closing connection %s: %s", self.name, exc)
                self._stop(exc.close_code, str(exc))
                return False
            if ev is NEED_DATA:
                return True
            if type(ev) is ConnectionClosed:
                assert isinstance(ev, ConnectionClosed)
                reason = f"the peer closed it: {ev.reason}" if ev.reason else "peer closed"
                self._stop(ev.code, reason, send_close=False)
                return False
            assert isinstance(ev, Event)
            self._dispatch(ev, in_reader)
            if self._serving.taken is not None:
                return True  # the reader's task keeps a suspended request: see _reader

    async def _reader(self) -> None:
        """Stream mode: read and dispatch, in whichever task holds the reading role."""
        conn, stream = self.conn, self.stream
        read_size = self.config.read_size
        while True:
            if not self._process(True):  # the handshake may have left frames: drain first
                return
            if self._serving.taken is not None:  # a request started here suspended
                assert self._tg is not None
                self._tg.start_soon(self._reader, name="koala-read")  # reading goes on
                await self._serving.finish_taken()
                return
            try:
                data = await stream.receive(read_size)
            except anyio.EndOfStream:
                data = b""
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self._stop(CloseCode.NORMAL, f"the connection broke: {exc!r}", send_close=False)
                return
            self._stream_writer.received()  # a new exchange: see Cork
            conn.receive_data(data or None)

    def _dispatch(self, ev: Event, in_reader: bool = False) -> None:
        kind = type(ev)
        if kind is Response:
            assert isinstance(ev, Response)
            p = self._pending.pop(ev.request_id, None)
            if p is not None:  # else: answered after the caller gave up
                p.response = CallResponse(ev.request_id, ev.result, ev.error)
                p.done.set()
        elif kind is Request:
            assert isinstance(ev, Request)
            self._serving.accept(ev, in_reader)
        elif kind is Cancel:
            assert isinstance(ev, Cancel)
            self._serving.cancel(ev.request_id)
        elif kind is Ping:
            assert isinstance(ev, Ping)
            self.enqueue_nowait(self.conn.send(Pong(ev.token)), droppable=True)
        elif kind is Pong:
            pass
        elif kind is GoAway:
            pass  # the protocol marked the peer draining
        elif kind in GATEWAY_EVENTS:
            on_event = self._on_event()
            if on_event is None:
                log.debug("connection %s: ignoring %s (no gateway handler)", self.name, ev)
            else:
                on_event(self, ev)

    # ------------------------------------------------------------ calling

    async def request(self, req: CallRequest) -> CallResponse | None:
        """Send ``req`` and wait for its response (None for one-way requests).

        Raises NotSent if the connection closed before the frame was written,
        HostUnavailableError if it closed after. Cancelling the caller sends CANCEL.
        """
        if self.closed:
            raise NotSent(self.close_reason)
        if len(self._pending) >= self.config.max_in_flight:
            raise OverloadedError(
                f"{len(self._pending)} calls are in flight on the connection to {self.name} "
                "(max_in_flight); retry later"
            )
        rid = next(self._ids)
        timeout = max(0.0, req.deadline - self._clock())
        data = self.conn.send_request(rid, timeout, req)
        if req.one_way:
            await self.enqueue(data)
            return None
        p = self._pending[rid] = _Pending(req, self._new_event)
        if p.deadline < self._next_expiry:
            self._expiry.set()  # sooner than the expiry task planned to look
        queued = False
        try:
            if not self._writer.try_write(data, rid):
                await self._writer.write(data, rid, p.deadline)
            queued = True
            await p.done.wait()
        except BaseException:
            if self._pending.pop(rid, None) is not None and queued and not self.closed:
                self.enqueue_nowait(self.conn.send(Cancel(rid)))  # it follows the request
            raise
        if p.error is not None:
            raise p.error
        return p.response

    async def send_event(self, ev: Event) -> None:
        """Send a message that needs no answer (the gateway kinds, GOAWAY)."""
        if not self.closed:
            with contextlib.suppress(NotSent):
                await self.enqueue(self.conn.send(ev))
                return
        raise HostUnavailableError(f"the connection to {self.name} is closed")

    # ------------------------------------------------------------ writing

    async def enqueue(self, data: bytes) -> None:
        """Write a frame that is not a request's, waiting for room if need be."""
        if not self._writer.try_write(data):
            await self._writer.write(data)

    def enqueue_nowait(self, data: bytes, *, droppable: bool = False) -> None:
        """Queue a control frame from synchronous code; a full queue closes the
        connection (the peer is not reading), except for a ``droppable`` one (PING,
        PONG): the frames ahead of it show the peer this side is alive, once they move."""
        if self.closed:
            return
        if not self._writer.write_control(data) and not droppable:
            self._stop(CloseCode.OVERLOADED, "the write queue is full: the peer is not reading")

    # ------------------------------------------------------------ deadlines

    async def _expire_calls(self) -> None:
        """Fail calls whose deadline passed and that no cancel scope of their caller
        bounds (``Request.expires``: the default deadline), and cancel them at the peer.

        One task per connection instead of a scope per call: it looks at the pending
        calls at the earliest of their deadlines, and at least every heartbeat
        interval; a call due sooner than the next look wakes it.
        """
        interval = self.config.heartbeat_interval
        while True:
            now = self._clock()
            wake = now + interval
            due = []
            for rid, p in self._pending.items():
                if p.deadline <= now:
                    due.append(rid)
                elif p.deadline < wake:
                    wake = p.deadline
            for rid in due:
                p = self._pending.pop(rid)
                req = p.req
                p.error = TimeoutError(
                    f"{req.interface}.{req.method} on {req.actor_type}/{req.key!r} got no "
                    f"answer from {self.name} before its deadline (the default timeout)"
                )
                p.done.set()
                if p.written and not self.closed:
                    self.enqueue_nowait(self.conn.send(Cancel(rid)))
            self._next_expiry = wake
            self._expiry = anyio.Event()
            with anyio.move_on_after(wake - now):
                await self._expiry.wait()

    # ------------------------------------------------------------ liveness

    async def _heartbeat(self) -> None:
        """PING every interval; close when no whole frame came for the timeout. Frames
        are counted by the protocol (``frames_received``), so the reading costs no clock
        call, and a frame that never ends keeps nothing alive."""
        interval, limit = self.config.heartbeat_interval, self.config.heartbeat_timeout
        token = 0
        seen = self.conn.frames_received
        last = anyio.current_time()  # the handshake's frames just came
        while True:
            await anyio.sleep(interval)
            now = anyio.current_time()
            if self.conn.frames_received != seen:
                seen, last = self.conn.frames_received, now
            silent = now - last
            if silent >= limit:
                self._stop(
                    CloseCode.HEARTBEAT_TIMEOUT,
                    f"no whole frame from the peer in {silent:.1f} s (heartbeat_timeout {limit} s)",
                )
                return
            token += 1
            self._ping(token)

    def _ping(self, token: int) -> None:
        self.enqueue_nowait(self.conn.send(Ping(token)), droppable=True)
