"""Serving the requests a channel receives: the ready queue, the drainer, its workers.

Requests are accepted in arrival order (or refused at once: a duplicate id, no
handler, ``max_in_flight`` reached) and queued; one serving task at a time, the
*drainer*, starts them one after another while they finish without suspending, so a
burst of quick requests costs one task switch, not one each (its answers leave
together: see ``Writer.hold``). A request that suspends keeps its task (a coroutine
cannot move) and the drainer's role passes to another task: a parked one if any, else
a new one; a task whose request is done parks, up to MAX_IDLE_WORKERS per connection.

A request of a method that has proved to finish without suspending may even start in
the reader's task, before any serving task (:meth:`Serving.start_in_reader`). Both
paths skip the deadline's cancel scope by the one policy of ``koala._drive``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import anyio
import sniffio
from anyio.abc import TaskGroup

from .._drive import (
    Suspended,
    finish_under_deadline,
    run_under_deadline,
    skips_scope,
    step_unscoped,
)
from .._errors import ActorNotFoundError, ArgumentTypeError, OverloadedError
from .._messages import ErrorCode, error_info
from .._messages import Request as CallRequest
from .._messages import Response as CallResponse
from ..wire._events import LocalProtocolError, Request, Response
from ._writers import NotSent

if TYPE_CHECKING:
    from ._channel import Channel

log = logging.getLogger("koala.transport")

Handler = Callable[[CallRequest], Coroutine[Any, Any, CallResponse | None]]

# Serving tasks kept parked per connection after a burst; more simply end.
MAX_IDLE_WORKERS = 256


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


def event_factory() -> Callable[[], Signal]:
    """The cheapest one-shot event of the running backend: on asyncio a bare future,
    else the backend's Event class (``anyio.Event()`` looks the backend up each call)."""
    if sniffio.current_async_library() == "asyncio":
        return functools.partial(_Signal, asyncio.get_running_loop())
    return type(anyio.Event())


def call_of(ev: Request, deadline: float) -> CallRequest:
    """The runtime's request for a REQUEST received, due at ``deadline`` (this
    process's clock): the one place a wire event becomes a runtime request."""
    return CallRequest(
        ev.request_id,
        ev.chain_id,
        deadline,
        ev.actor_type,
        ev.key,
        ev.interface,
        ev.method,
        tuple(ev.args),
        ev.one_way,
        placement=ev.placement,
        trace=ev.trace,
    )


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


class Serving:
    """The requests ``channel`` received, from acceptance to their answer's frame."""

    def __init__(
        self,
        channel: Channel,
        handler: Callable[[], Handler | None],
        sync_methods: dict[tuple[str, str], int],
    ) -> None:
        self._ch = channel
        self._handler = handler
        self._max = channel.config.max_in_flight
        self._jobs: dict[int, _Job] = {}  # accepted requests, by id
        self._ready: deque[_Job] = deque()  # accepted, not started yet
        self._draining = False  # a serving task holds the drainer's role
        self._idle: list[_Worker] = []
        # methods seen finishing without suspending (_drive.skips_scope), for the node
        self._sync_methods = sync_methods
        self._tg: TaskGroup | None = None
        self._marker: Callable[[], object] | None = None
        self._clock: Callable[[], float] = anyio.current_time
        self._new_event: Callable[[], Signal] = anyio.Event
        # a request the reader started that suspended, to finish in the reader's task
        self.taken: tuple[_Job, Suspended] | None = None

    def __len__(self) -> int:
        return len(self._jobs)

    def start(
        self,
        tg: TaskGroup,
        clock: Callable[[], float],
        marker: Callable[[], object] | None,
        new_event: Callable[[], Signal],
    ) -> None:
        self._tg, self._clock, self._marker, self._new_event = tg, clock, marker, new_event

    def cancel(self, rid: int) -> None:
        """The peer's CANCEL of request ``rid``."""
        job = self._jobs.get(rid)
        if job is not None:
            job.cancel()

    def close(self) -> None:
        """The connection ended: nothing queued starts, what runs is cancelled."""
        self._ready.clear()
        for job in self._jobs.values():
            job.cancel()

    def accept(self, ev: Request, in_reader: bool) -> None:
        """Take a REQUEST received (``in_reader``: in the reader's task, which may start
        it itself)."""
        rid = ev.request_id
        handler = self._handler()
        if rid in self._jobs:
            self._refuse(rid, ArgumentTypeError(f"request id {rid} is already in flight"))
        elif handler is None:
            self._refuse(rid, ActorNotFoundError("this node serves no actors"))
        elif len(self._jobs) >= self._max:
            self._refuse(
                rid,
                OverloadedError(
                    f"the connection from node {self._ch.peer.peer_node_id} has "
                    f"{len(self._jobs)} requests in flight (max_in_flight); retry later"
                ),
            )
        else:
            job = _Job(ev, handler, self._clock() + ev.timeout)
            self._jobs[rid] = job
            if in_reader and not self._draining and not self._ready and self.start_in_reader(job):
                return
            self._ready.append(job)
            if not self._draining:
                self._start_drainer()

    def _refuse(self, rid: int, exc: Exception) -> None:
        """Refuse a request without running it (the code says it was not run)."""
        ch = self._ch
        ch.enqueue_nowait(ch.conn.send(Response(rid, None, error_info(exc))))

    # ------------------------------------------------------------ the drainer

    def _start_drainer(self) -> None:
        """Have a serving task start the ready requests: a parked one, or a new one."""
        self._draining = True
        if self._idle:
            self._idle.pop().wake.set()
        else:
            assert self._tg is not None
            self._tg.start_soon(self._work, name="koala-serve")

    def _hand_off(self, job: _Job) -> None:
        """The drainer's request suspended: this task stays with it, another drains."""
        job.suspended = True
        self._draining = False
        self._ch.writer.release()  # a task writes what the batch held
        if self._ready:
            self._start_drainer()

    async def _work(self) -> None:
        """Start ready requests one after another while they finish without suspending
        (see the module docstring).

        The writer holds the answers of the drainer's batch back (the first one
        excepted) and writes them in one send when the queue is empty; it only ever
        holds them while the drainer runs without suspending, or while it writes.
        """
        ch, ready, writer = self._ch, self._ready, self._ch.writer
        while True:  # here this task is the drainer
            writer.hold()
            suspended = False
            while ready and not ch.closed:
                job = ready.popleft()
                await self._serve(job)
                if job.suspended:  # _hand_off ended the batch and passed the role on
                    suspended = True
                    break
            if not suspended:
                if writer.release_now():
                    await writer.flush()
                if ready and not ch.closed:
                    continue  # more came while the batch was written
                self._draining = False
            elif not self._draining and ready and not ch.closed:
                self._draining = True  # handed off, and no one took it
                continue
            if ch.closed or len(self._idle) >= MAX_IDLE_WORKERS:
                return
            worker = _Worker(self._new_event)
            self._idle.append(worker)
            await worker.wake.wait()
            if ch.closed:
                return

    async def _serve(self, job: _Job) -> None:
        ev = job.ev
        resp: CallResponse | None = None
        scope: anyio.CancelScope | None = None
        try:
            if job.cancelled or self._ch.closed:
                return
            req = call_of(ev, job.deadline)
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
                resp = _failed(job, exc)
        finally:
            self._jobs.pop(ev.request_id, None)
        await self._send_answer(job, resp, scope)

    async def _send_answer(
        self, job: _Job, resp: CallResponse | None, scope: anyio.CancelScope | None
    ) -> None:
        data = self._answer(job, resp, scope)
        if data:
            with contextlib.suppress(NotSent):  # the connection closed meanwhile
                await self._ch.enqueue(data)

    def _answer(
        self, job: _Job, resp: CallResponse | None, scope: anyio.CancelScope | None
    ) -> bytes:
        """The frame answering ``job`` (b"": none is due: one-way, cancelled, closed)."""
        ch = self._ch
        if resp is None or job.ev.one_way or job.cancelled or ch.closed:
            return b""
        if scope is not None and scope.cancel_called:
            return b""
        rid = job.ev.request_id
        try:
            if resp.error is None:
                return ch.conn.send_result(rid, resp.result)
            return ch.conn.send(Response(rid, resp.result, resp.error))
        except LocalProtocolError as exc:  # too large, or a value CBOR cannot carry
            info = error_info(exc, ErrorCode.APPLICATION)
            return ch.conn.send(Response(rid, None, info))

    # ------------------------------------------------------------ in the reader

    def start_in_reader(self, job: _Job) -> bool:
        """Start ``job`` in the reader task itself when nothing is queued before it and
        its method has proved to finish without suspending (no task switch at all).
        True if it was taken. If it suspends after all, it is left in ``taken``: the
        reader hands the reading to a new task and finishes it (``finish_taken``).

        Its answer is written at once when it is the first frame since bytes arrived,
        else with the answers that follow it (see ``_writers.Cork``).
        """
        ev = job.ev
        marker = self._marker
        method = (ev.interface, ev.method)
        if marker is None or not skips_scope(method, self._sync_methods, marker):
            return False
        req = call_of(ev, job.deadline)
        try:
            resp, suspended = step_unscoped(
                lambda: job.handler(req), job.deadline, method, self._sync_methods, marker
            )
        except Exception as exc:
            resp = _failed(job, exc)
        else:
            if suspended is not None:
                self.taken = (job, suspended)
                return True
        self._jobs.pop(ev.request_id, None)
        data = self._answer(job, resp, None)
        if data:
            # never waits: two peers both writing and neither reading would deadlock
            self._ch.enqueue_nowait(data)
        return True

    async def finish_taken(self) -> None:
        """Finish the request started in the reader that suspended, in this task."""
        assert self.taken is not None
        assert self._marker is not None
        (job, suspended), self.taken = self.taken, None
        resp: CallResponse | None = None
        scope: anyio.CancelScope | None = None
        try:
            resp, scope = await finish_under_deadline(
                suspended, job.deadline, self._marker, job.attach
            )
        except Exception as exc:
            resp = _failed(job, exc)
        finally:
            self._jobs.pop(job.ev.request_id, None)
        await self._send_answer(job, resp, scope)


def _failed(job: _Job, exc: Exception) -> CallResponse:
    log.exception("serving %s.%s failed", job.ev.interface, job.ev.method)
    return CallResponse(job.ev.request_id, None, error_info(exc))
