"""One open connection to a peer node: calls out, calls in, heartbeats, one writer.

A :class:`Channel` runs over one byte stream. On asyncio it takes the stream's
transport over (see ``_pipe``): frames are decoded and dispatched as bytes arrive and
written with ``transport.write``. Elsewhere (trio) a reader task does the reading, and
frames go through one bounded queue: the first task that finds no writer busy writes
it, joining the frames queued meanwhile into one ``send`` (a lone frame goes straight
to the socket). A TLS stream is always driven the second way: its bytes must pass
through the TLS layer. Beside it run the heartbeat (PING every interval; a peer from
which no whole frame came for ``heartbeat_timeout`` is dead, however many bytes of an
unfinished one arrive) and the expiry of calls that carry the default deadline.
Incoming requests queue in arrival order and one serving task at a time starts them
(see ``_work``). Requests both ways are matched by id. When the
connection ends for any reason every pending call fails at once: with
:class:`HostUnavailableError` if its frame may have reached the peer, or with
:class:`NotSent` (safe to retry elsewhere) if it was still queued here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import socket
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import anyio
import sniffio
from anyio.abc import ByteStream, TaskGroup, TaskStatus

from .._drive import (
    Suspended,
    fast_clock,
    finish_under_deadline,
    run_under_deadline,
    scope_marker,
    skips_scope,
    step_unscoped,
)
from .._errors import (
    ActorNotFoundError,
    ArgumentTypeError,
    HostUnavailableError,
    OverloadedError,
)
from .._loop import trio_socket
from .._messages import ErrorCode, error_info
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
    LocalProtocolError,
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
from ._writers import NotSent as NotSent
from ._writers import StreamWriter, Writer

log = logging.getLogger("koala.transport")

Handler = Callable[[CallRequest], Coroutine[Any, Any, CallResponse | None]]
EventHandler = Callable[["Channel", Event], None]


class _Signal:
    """A one-shot event on asyncio: a bare future. anyio's Event wraps an asyncio.Event,
    which keeps a list of waiter futures; a pending call has one waiter at most."""

    __slots__ = ("_future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # the loop is given: asyncio.get_running_loop() makes a getpid() system call on
        # Python 3.11, on every call
        self._future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        if not self._future.done():  # done already: set, or its waiter was cancelled
            self._future.set_result(None)

    def is_set(self) -> bool:
        return self._future.done() and not self._future.cancelled()

    def wait(self) -> asyncio.Future[None]:
        return self._future


Signal = anyio.Event | _Signal


class _Pending:
    __slots__ = ("deadline", "done", "error", "req", "response", "written")

    def __init__(self, req: CallRequest, new_event: Callable[[], Signal]) -> None:
        self.req = req
        self.deadline = req.deadline if req.expires else math.inf  # see _expire_calls
        self.done = new_event()
        self.response: CallResponse | None = None
        self.error: BaseException | None = None
        self.written = False


class _Job:
    """A request accepted for serving: queued, then running (maybe under a scope)."""

    __slots__ = ("cancelled", "deadline", "ev", "handler", "scope", "suspended")

    def __init__(self, ev: Request, handler: Handler, deadline: float) -> None:
        self.ev = ev
        self.handler = handler
        self.deadline = deadline
        self.scope: anyio.CancelScope | None = None
        self.cancelled = False
        self.suspended = False  # its first step suspended: it left the drainer's role

    def cancel(self) -> None:
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()

    def attach(self, scope: anyio.CancelScope) -> None:
        self.scope = scope
        if self.cancelled:
            scope.cancel()


class _Worker:
    """A parked serving task, woken to take the drainer's role (cheaper than a new task)."""

    __slots__ = ("wake",)

    def __init__(self, new_event: Callable[[], Signal]) -> None:
        self.wake = new_event()


# Serving tasks kept parked per connection after a burst; more simply end.
MAX_IDLE_WORKERS = 256


@dataclass(frozen=True, slots=True)
class ChannelStatistics:
    """``pending``: calls out waiting for their answer; ``serving``: requests in accepted
    and not answered yet; ``io``: how bytes move: "pipe" (asyncio: the transport driven
    by callbacks), "stream+socket" (trio: a lone frame written to the socket, the rest
    through the stream) or "stream" (anyio's stream alone: TLS, or ``direct_io`` off)."""

    pending: int
    serving: int
    io: str


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
        handler: Callable[[], Handler | None],
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
        self._serving: dict[int, _Job] = {}  # accepted requests, by id
        self._ready: deque[_Job] = deque()  # accepted, not started yet
        self._drainer = False  # a serving task is starting the ready requests
        self._reading = False  # the reader is dispatching (it may start a request itself)
        # a request the reader started that suspended, to finish in the reader's task
        self._taken: tuple[_Job, Suspended] | None = None
        self._idle: list[_Worker] = []
        self._next_expiry = 0.0  # when _expire_calls looks next
        self._expiry = anyio.Event()  # set: look now
        # methods seen finishing without suspending (_drive.skips_scope), for the node
        self._sync_methods = sync_methods
        self._marker: Callable[[], object] | None = None
        self._clock: Callable[[], float] = anyio.current_time
        # the backend's Event class (anyio.Event() looks the backend up on every call),
        # or on asyncio a bare future
        self._new_event: Callable[[], Signal] = anyio.Event
        self._tg: TaskGroup | None = None
        # the stream's until run() knows better: asyncio's pipe, or trio's socket
        self._stream_writer = self._new_stream_writer(None)
        self._writer: Writer = self._stream_writer
        self.closed = False
        self.close_reason = ""
        self._close_frame = b""
        self.peer_draining = False
        self._ended = anyio.Event()

    def __repr__(self) -> str:
        return f"<Channel {self.name} node={self.peer.peer_node_id} closed={self.closed}>"

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
        self._enqueue_nowait(self.conn.send(ev), droppable=droppable)

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
                self._marker = scope_marker()
                self._clock = fast_clock()[0]
                if sniffio.current_async_library() == "asyncio":
                    self._new_event = functools.partial(_Signal, asyncio.get_running_loop())
                else:
                    self._new_event = type(anyio.Event())
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
        if self.closed:
            return
        self.closed = True
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
        self._ended.set()
        self._ready.clear()
        for job in self._serving.values():
            job.cancel()
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
        self._process()  # frames that came with the handshake, or after it
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
        self._process()

    def _lost(self, reason: str) -> None:
        self._stop(CloseCode.NORMAL, reason, send_close=False)

    def _written(self, rid: int) -> None:
        p = self._pending.get(rid)
        if p is not None:
            p.written = True  # from here on it may reach the peer

    def _process(self) -> bool:
        """Dispatch every complete frame received; False once the connection ended."""
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
            self._dispatch(ev)
            if self._taken is not None:
                return True  # the reader's task keeps a suspended request: see _reader

    async def _reader(self) -> None:
        """Stream mode: read and dispatch, in whichever task holds the reading role."""
        conn, stream = self.conn, self.stream
        read_size = self.config.read_size
        while True:
            self._reading = True
            go_on = self._process()  # the handshake may have left frames: drain first
            self._reading = False
            if not go_on:
                return
            if self._taken is not None:  # a request started here suspended
                taken, self._taken = self._taken, None
                assert self._tg is not None
                self._tg.start_soon(self._reader, name="koala-read")  # reading goes on
                await self._finish_taken(*taken)
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

    def _dispatch(self, ev: Event) -> None:
        kind = type(ev)
        if kind is Response:
            assert isinstance(ev, Response)
            p = self._pending.pop(ev.request_id, None)
            if p is not None:  # else: answered after the caller gave up
                p.response = CallResponse(ev.request_id, ev.result, ev.error)
                p.done.set()
        elif kind is Request:
            assert isinstance(ev, Request)
            self._accept_request(ev)
        elif kind is Cancel:
            assert isinstance(ev, Cancel)
            job = self._serving.get(ev.request_id)
            if job is not None:
                job.cancel()
        elif kind is Ping:
            assert isinstance(ev, Ping)
            self._enqueue_nowait(self.conn.send(Pong(ev.token)), droppable=True)
        elif kind is Pong:
            pass
        elif kind is GoAway:
            self.peer_draining = True
        elif kind in GATEWAY_EVENTS:
            on_event = self._on_event()
            if on_event is None:
                log.debug("connection %s: ignoring %s (no gateway handler)", self.name, ev)
            else:
                on_event(self, ev)

    # ------------------------------------------------------------ serving requests

    def _accept_request(self, ev: Request) -> None:
        rid = ev.request_id
        handler = self._handler()
        if rid in self._serving:
            self._reply(rid, ArgumentTypeError(f"request id {rid} is already in flight"))
        elif handler is None:
            self._reply(rid, ActorNotFoundError("this node serves no actors"))
        elif len(self._serving) >= self.config.max_in_flight:
            self._reply(
                rid,
                OverloadedError(
                    f"the connection from node {self.peer.peer_node_id} has "
                    f"{len(self._serving)} requests in flight (max_in_flight); retry later"
                ),
            )
        else:
            job = _Job(ev, handler, self._clock() + ev.timeout)
            self._serving[rid] = job
            if (
                self._reading
                and not self._drainer
                and not self._ready
                and self._start_in_reader(job)
            ):
                return
            self._ready.append(job)
            if not self._drainer:
                self._start_drainer()

    def _start_drainer(self) -> None:
        """Have a serving task start the ready requests: a parked one, or a new one."""
        self._drainer = True
        if self._idle:
            self._idle.pop().wake.set()
        else:
            assert self._tg is not None
            self._tg.start_soon(self._work, name="koala-serve")

    def _hand_off(self, job: _Job) -> None:
        """The drainer's request suspended: this task stays with it, another drains."""
        job.suspended = True
        self._drainer = False
        self._writer.release()  # a task writes what the batch held
        if self._ready:
            self._start_drainer()

    async def _work(self) -> None:
        """Start ready requests one after another while they finish without suspending:
        a burst of quick requests costs one task switch, not one each. A request that
        suspends keeps this task (it cannot move) and hands the queue to another; a task
        whose request is done parks, up to MAX_IDLE_WORKERS per connection.

        The writer holds the answers of the drainer's batch back (the first one
        excepted) and writes them in one send when the queue is empty; it only ever
        holds them while the drainer runs without suspending, or while it writes.
        """
        ready, writer = self._ready, self._writer
        while True:  # here this task is the drainer
            writer.hold()
            suspended = False
            while ready and not self.closed:
                job = ready.popleft()
                await self._serve(job)
                if job.suspended:  # _hand_off ended the batch and passed the role on
                    suspended = True
                    break
            if not suspended:
                if writer.release_now():
                    await writer.flush()
                if ready and not self.closed:
                    continue  # more came while the batch was written
                self._drainer = False
            elif not self._drainer and ready and not self.closed:
                self._drainer = True  # handed off, and no one took it
                continue
            if self.closed or len(self._idle) >= MAX_IDLE_WORKERS:
                return
            worker = _Worker(self._new_event)
            self._idle.append(worker)
            await worker.wake.wait()
            if self.closed:
                return

    def _reply(self, rid: int, exc: Exception) -> None:
        """Refuse a request without running it (the code says it was not run)."""
        self._enqueue_nowait(self.conn.send(Response(rid, None, error_info(exc))))

    @staticmethod
    def _call_of(job: _Job) -> CallRequest:
        ev = job.ev
        return CallRequest(
            ev.request_id,
            ev.chain_id,
            job.deadline,
            ev.actor_type,
            ev.key,
            ev.interface,
            ev.method,
            tuple(ev.args),
            ev.one_way,
            placement=ev.placement,
        )

    async def _serve(self, job: _Job) -> None:
        ev = job.ev
        resp: CallResponse | None = None
        scope: anyio.CancelScope | None = None
        try:
            if job.cancelled or self.closed:
                return
            req = self._call_of(job)
            try:
                resp, scope = await run_under_deadline(
                    lambda: job.handler(req),
                    job.deadline,
                    (ev.interface, ev.method),
                    self._sync_methods,
                    self._marker,
                    on_suspend=lambda: self._hand_off(job),
                    on_scope=job.attach,
                )
            except Exception as exc:
                resp = self._failed(job, exc)
        finally:
            self._serving.pop(ev.request_id, None)
        data = self._answer(job, resp, scope)
        if data:
            with contextlib.suppress(NotSent):  # the connection closed meanwhile
                await self._enqueue(data)

    @staticmethod
    def _failed(job: _Job, exc: Exception) -> CallResponse:
        log.exception("serving %s.%s failed", job.ev.interface, job.ev.method)
        return CallResponse(job.ev.request_id, None, error_info(exc))

    def _answer(
        self, job: _Job, resp: CallResponse | None, scope: anyio.CancelScope | None
    ) -> bytes:
        """The frame answering ``job`` (b"": none is due: one-way, cancelled, closed)."""
        if resp is None or job.ev.one_way or job.cancelled or self.closed:
            return b""
        if scope is not None and scope.cancel_called:
            return b""
        rid = job.ev.request_id
        try:
            if resp.error is None:
                return self.conn.send_result(rid, resp.result)
            return self.conn.send(Response(rid, resp.result, resp.error))
        except LocalProtocolError as exc:  # too large, or a value CBOR cannot carry
            info = error_info(exc, ErrorCode.APPLICATION)
            return self.conn.send(Response(rid, None, info))

    # ------------------------------------------------------------ serving in the reader

    def _start_in_reader(self, job: _Job) -> bool:
        """Stream mode: start ``job`` in the reader task itself when nothing is queued
        before it and its method has proved to finish without suspending (no task
        switch at all). True if it was taken. If it suspends after all, it keeps this
        task: _read_loop hands the reading to a new task and finishes it.

        Its answer is written at once when it is the first frame since bytes arrived,
        else by a task of its own, with the answers that follow it.
        """
        ev = job.ev
        marker = self._marker
        method = (ev.interface, ev.method)
        if marker is None or not skips_scope(method, self._sync_methods, marker):
            return False
        req = self._call_of(job)
        try:
            resp, suspended = step_unscoped(
                lambda: job.handler(req), job.deadline, method, self._sync_methods, marker
            )
        except Exception as exc:
            resp = self._failed(job, exc)
        else:
            if suspended is not None:
                self._taken = (job, suspended)
                return True
        self._serving.pop(ev.request_id, None)
        data = self._answer(job, resp, None)
        if data:
            # never waits: two peers both writing and neither reading would deadlock
            self._enqueue_nowait(data)
        return True

    async def _finish_taken(self, job: _Job, suspended: Suspended) -> None:
        """Finish a request started in the reader that suspended (now in this task)."""
        assert self._marker is not None
        resp: CallResponse | None = None
        scope: anyio.CancelScope | None = None
        try:
            resp, scope = await finish_under_deadline(
                suspended, job.deadline, self._marker, job.attach
            )
        except Exception as exc:
            resp = self._failed(job, exc)
        finally:
            self._serving.pop(job.ev.request_id, None)
        data = self._answer(job, resp, scope)
        if data:
            with contextlib.suppress(NotSent):
                await self._enqueue(data)

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
            await self._enqueue(data)
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
                self._enqueue_nowait(self.conn.send(Cancel(rid)))  # it follows the request
            raise
        if p.error is not None:
            raise p.error
        return p.response

    async def send_event(self, ev: Event) -> None:
        """Send a message that needs no answer (the gateway kinds, GOAWAY)."""
        if not self.closed:
            with contextlib.suppress(NotSent):
                await self._enqueue(self.conn.send(ev))
                return
        raise HostUnavailableError(f"the connection to {self.name} is closed")

    # ------------------------------------------------------------ writing

    async def _enqueue(self, data: bytes) -> None:
        """Write a frame that is not a request's, waiting for room if need be."""
        if not self._writer.try_write(data):
            await self._writer.write(data)

    def _enqueue_nowait(self, data: bytes, *, droppable: bool = False) -> None:
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
                    self._enqueue_nowait(self.conn.send(Cancel(rid)))
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
        self._enqueue_nowait(self.conn.send(Ping(token)), droppable=True)
