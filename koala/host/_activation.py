"""One activation of one actor: its mailbox, its pump, its turns and its lifecycle.

Turns run one at a time. A pump task (started when work arrives, gone after the
activation has been idle a while) takes work from the bounded mailbox in order and
runs each as a turn. A call of the call chain that holds the activation right now
(A -> B -> A) does not queue: it runs at once, beside the suspended turn it belongs to,
so chains never deadlock and two chains never interleave. A call to a free activation
runs in its caller's task (:meth:`Activation.run_inline`, the local fast path).

An activation counts nothing of the host's itself: what it queues, runs and leaves is
told to its :class:`~koala.host._catalog.Catalog`, which keeps the totals.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from .._actor import ActorBase
from .._errors import OverloadedError, ShuttingDownError
from .._messages import (
    ErrorCode,
    ErrorInfo,
    Key,
    deadline_rejection,
    error_info,
    new_chain_id,
    rejection,
)
from . import _inline
from ._call import Call, Turn, TurnBody, Work, current_activation, current_chain
from ._states import Pump, State
from ._timers import TimerHandle, check_timer, run_timer

if TYPE_CHECKING:
    from ._catalog import Catalog
    from ._runtime import Runtime

log = logging.getLogger("koala.activation")

# A call queued for an activation that deactivated itself inside on_activate goes to a
# fresh one; after this many in a row it fails instead (the actor never stays up).
MAX_REDELIVERIES = 3

_DEFAULT_ON_DEACTIVATE = ActorBase.on_deactivate


class Activation:
    """The in-memory incarnation of one (actor type, key)."""

    __slots__ = (
        "bucket",  # the catalog's: the collection bucket this activation is filed in
        "catalog",
        "chain",
        "deactivate_asap",
        "depth",
        "ident",
        "impl",
        "instance",
        "keep_until",
        "last_used",
        "linger_exit",
        "mailbox",
        "pump",
        "reentrant_done",
        "state",
        "timers",
        "waiter",
    )

    def __init__(self, catalog: Catalog, impl: type[ActorBase], ident: tuple[str, Key]) -> None:
        self.catalog = catalog
        self.impl = impl
        self.ident = ident  # (actor type, key): the very tuple the catalog is keyed by
        self.instance: ActorBase | None = None
        self.state = State.CREATING
        self.mailbox: deque[Work] | None = None
        self.waiter: anyio.Event | None = None
        self.pump = Pump.NONE
        self.linger_exit = False
        self.chain: int | None = None
        self.depth = 0
        self.reentrant_done: anyio.Event | None = None
        self.last_used = 0.0
        self.keep_until = 0.0
        self.deactivate_asap = False
        self.timers: list[TimerHandle] | None = None
        self.bucket = 0

    def __repr__(self) -> str:
        return f"<Activation {self.ident[0]}/{self.ident[1]!r} {self.state.value}>"

    @property
    def key(self) -> Key:
        return self.ident[1]

    @property
    def runtime(self) -> Runtime:
        """The runtime this activation's actor calls others through."""
        return self.catalog.runtime

    def expiry(self) -> float:
        """When, unused, it may be collected (its class's idle timeout, else the host's)."""
        idle = self.impl.idle_timeout or self.catalog.config.idle_timeout
        return max(self.last_used + idle, self.keep_until)

    def is_idle(self) -> bool:
        """Valid, no turn running, nothing queued."""
        return self.state is State.VALID and self.chain is None and not self.mailbox

    def is_busy(self) -> bool:
        return self.chain is not None or bool(self.mailbox)

    def touch(self, now: float) -> None:
        self.last_used = now

    # ------------------------------------------------------------ accepting work

    def accept(self, work: Work) -> None:
        """Take work: run a call at once if it belongs to the chain holding us, else
        queue it (OverloadedError if the host's or the mailbox's bound is reached)."""
        cat = self.catalog
        if self.chain is not None and work.chain_id == self.chain:
            assert type(work) is Call  # a turn has a chain of its own
            cat.started(work)
            self.depth += 1
            cat.start_soon(self._reentrant_turn, work)
            return
        cat.check_room()
        mb = self.mailbox
        if mb is None:
            mb = self.mailbox = deque()
        elif len(mb) >= cat.config.mailbox_size:
            raise OverloadedError(
                f"the mailbox of {self.ident[0]}/{self.key!r} is full "
                f"({cat.config.mailbox_size} calls queued); retry later or raise mailbox_size"
            )
        mb.append(work)
        cat.enqueued(work)
        self._wake()

    def schedule_turn(self, body: TurnBody, name: str) -> None:
        """Queue ``body(self)`` as a turn of a chain of its own, under the default
        timeout: for work that is not a call (a timer tick, a client session's hook).
        OverloadedError if the mailbox is full."""
        cat = self.catalog
        deadline = anyio.current_time() + cat.config.default_timeout
        self.accept(Turn(cat, self.ident, body, name, deadline))

    def _wake(self) -> None:
        if self.pump is Pump.WAITING:
            self.pump = Pump.RUNNING
            self.catalog.pump_resumes(self)
            assert self.waiter is not None
            self.waiter.set()
        elif self.pump is Pump.NONE:
            self.pump = Pump.RUNNING
            self.catalog.start_soon(self._run_pump)

    def let_pump_go(self) -> None:
        """An idle pump that waited long enough exits (the next work starts another)."""
        if self.pump is Pump.WAITING:
            self.linger_exit = True
            self._wake()

    def begin_deactivation(self) -> None:
        """Deactivate at the next turn boundary (on_deactivate is the last turn).

        A free activation with no task of its own ends at once when it has nothing to
        run (no timers, the default on_deactivate), without any task; if it has, one of
        the catalog's bounded set of deactivation tasks runs on_deactivate. A busy one
        is deactivated by its pump (or its inline caller) when its turn ends.
        """
        state = self.state
        if state is State.CREATING and self.chain is None and not self.mailbox:
            self.state = State.INVALID  # never activated: nothing to run on_deactivate on
            self.catalog.forget(self)
            return
        if state is State.VALID or state is State.CREATING or state is State.ACTIVATING:
            self.deactivate_asap = True
            if state is State.VALID and self.chain is None:
                self.state = State.DEACTIVATING
                if self.pump is Pump.NONE and not self.mailbox:
                    if not self.timers and self.impl.on_deactivate is _DEFAULT_ON_DEACTIVATE:
                        self._finish()
                    else:
                        self.pump = Pump.RUNNING  # a deactivation task owns it from now
                        self.catalog.retire(self)
                    return
            self._wake()

    async def retire(self) -> None:
        """The last turn, run by one of the catalog's deactivation tasks."""
        try:
            await self._deactivate()
        finally:
            self.pump = Pump.NONE

    def _finish(self) -> None:
        """Leave the catalog; work that queued meanwhile goes to a fresh activation."""
        self._stop_timers()
        self.state = State.INVALID
        # the instance points back at us: without this a cycle, freed only by a full GC
        self.instance = None
        self.catalog.forget(self)
        self._requeue_leftovers()

    # ------------------------------------------------------------ the pump

    async def _run_pump(self) -> None:
        cat = self.catalog
        try:
            if self.state is State.CREATING and not await self._activate():
                return
            while True:
                if self.state is State.INVALID:  # it failed, or ended: nothing left here
                    return
                if self.chain is None and self.state is State.DEACTIVATING:
                    await self._deactivate()  # what is queued goes to a fresh activation
                    return
                mb = self.mailbox
                if mb and self.chain is None:
                    work = mb.popleft()
                    cat.dequeued(1)
                    self.linger_exit = False
                    if type(work) is Call:
                        await self._primary_turn(work)
                    else:
                        assert type(work) is Turn
                        await self._scheduled_turn(work)
                    if self.deactivate_asap and self.state is State.VALID:
                        self.state = State.DEACTIVATING
                    if self.state is State.DEACTIVATING:
                        await self._deactivate()
                        return
                    continue
                if self.chain is None and (
                    self.deactivate_asap or self.state is State.DEACTIVATING
                ):
                    self.state = State.DEACTIVATING
                    await self._deactivate()
                    return
                if self.linger_exit and not mb:
                    self.linger_exit = False
                    self.mailbox = None
                    return
                self.pump = Pump.WAITING
                self.waiter = anyio.Event()
                cat.pump_waits(self)
                await self.waiter.wait()
        finally:
            self.pump = Pump.NONE
            cat.pump_resumes(self)

    # ------------------------------------------------------------ the local fast path

    can_run_inline = _inline.can_run_inline
    run_inline = _inline.run_inline

    # ------------------------------------------------------------ mailbox turns

    async def _primary_turn(self, call: Call) -> None:
        if call.cancelled:
            call.fail(rejection(ErrorCode.CANCELLED, "the caller cancelled the call"))
            return
        if call.deadline <= anyio.current_time():
            call.fail(
                deadline_rejection(
                    f"the deadline of {call.spec.qualname} passed while it waited in "
                    f"the mailbox of {self.ident[0]}/{self.key!r}; it was not run",
                    *self.ident,
                    call.spec.name,
                )
            )
            return
        await self._holding(call.chain_id, self._turn(call))

    async def _holding(self, chain: int, turn: Awaitable[None]) -> None:
        """Run ``turn`` holding the activation for ``chain``, until the calls of that
        chain that came back here (running beside it) have ended too."""
        self.chain = chain
        try:
            await turn
            if self.depth:
                self.reentrant_done = anyio.Event()
                await self.reentrant_done.wait()
        finally:
            self.chain = None
            self.reentrant_done = None

    async def _reentrant_turn(self, call: Call) -> None:
        try:
            await self._turn(call)
        finally:
            self.depth -= 1
            if self.depth == 0 and self.reentrant_done is not None:
                self.reentrant_done.set()

    async def _turn(self, call: Call) -> None:
        spec = call.spec
        t_chain = current_chain.set(call.chain_id)
        t_act = current_activation.set(self)
        try:
            with anyio.CancelScope(deadline=call.deadline) as scope:
                call.scope = scope
                if call.cancelled:
                    scope.cancel()
                result = await getattr(self.instance, spec.name)(*call.args)
            if scope.cancelled_caught:
                if call.cancelled:
                    call.fail(rejection(ErrorCode.CANCELLED, "the caller cancelled the call"))
                else:
                    call.fail(
                        deadline_rejection(
                            f"{spec.qualname} on {self.ident[0]}/{self.key!r} "
                            "did not finish before its deadline",
                            *self.ident,
                            spec.name,
                        )
                    )
            elif call.done is not None:
                call.finish(spec.copy_result(result))
            else:
                call.finish(None)
        except Exception as exc:
            call.fail(error_info(exc))
        finally:
            current_chain.reset(t_chain)
            current_activation.reset(t_act)
            if not call.answered:  # cancelled from outside (hard shutdown)
                call.fail(rejection(ErrorCode.SHUTTING_DOWN, "the host stopped during the call"))
            self.last_used = self.catalog.now

    async def _scheduled_turn(self, turn: Turn) -> None:
        """A turn that is not a call (see :meth:`schedule_turn`); calls it makes that
        come back here run beside it, and it holds the activation until they end."""
        if turn.deadline <= anyio.current_time():
            turn.fail(rejection(ErrorCode.TIMEOUT, "its deadline passed in the mailbox; not run"))
            return
        await self._holding(turn.chain_id, self._run_body(turn))

    async def _run_body(self, turn: Turn) -> None:
        t_chain = current_chain.set(turn.chain_id)
        t_act = current_activation.set(self)
        # what is reported unless the body ends (cancelled from outside: a hard shutdown)
        failure: ErrorInfo | None = rejection(
            ErrorCode.SHUTTING_DOWN, "the host stopped during the turn"
        )
        try:
            with anyio.CancelScope(deadline=turn.deadline) as scope:
                await turn.body(self)
            failure = None
            if scope.cancelled_caught:
                failure = rejection(ErrorCode.TIMEOUT, "it did not finish before its deadline")
        except Exception as exc:
            failure = error_info(exc)
        finally:
            current_chain.reset(t_chain)
            current_activation.reset(t_act)
            self.last_used = self.catalog.now
            if failure is None:
                turn.ended()
            else:
                turn.fail(failure)

    # ------------------------------------------------------------ lifecycle

    async def _create(self) -> None:
        """The activation itself: make the instance, then on_activate (its first turn)."""
        impl = self.impl
        start = time.perf_counter()
        instance = impl.__new__(impl)
        instance._koala_activation = self
        instance.__init__()  # type: ignore[misc]
        self.instance = instance
        try:
            await instance.on_activate()
        finally:
            seconds = time.perf_counter() - start
            self.catalog.lifecycle.activate_seconds.observe((self.ident[0],), seconds)

    def _activated(self) -> bool:
        """on_activate returned: valid from now on. False if it asked to deactivate
        already (``deactivate_on_idle()`` inside on_activate): then the work waiting for
        it is not run here but goes to a fresh activation once this one is gone."""
        self.state = State.VALID
        self.last_used = self.catalog.now
        self.catalog.schedule_collection(self)
        if not self.deactivate_asap:
            return True
        self.state = State.DEACTIVATING
        mb = self.mailbox
        if mb:
            keep: deque[Work] = deque()
            for work in mb:
                work.redelivered += 1
                if work.redelivered <= MAX_REDELIVERIES:
                    keep.append(work)
                    continue
                self.catalog.dequeued(1)
                work.fail(
                    rejection(
                        ErrorCode.APPLICATION,
                        f"{self.ident[0]}/{self.key!r} deactivated itself in on_activate "
                        f"{work.redelivered} times in a row; the call was not run",
                    )
                )
            self.mailbox = keep
        return False

    def _activation_failed(self, info: ErrorInfo | None) -> None:
        """on_activate raised (``info``: the work queued for this activation fails with
        the same error, as the call that triggered it did) or was cut short by its
        trigger's deadline or cancellation (None: the queued work goes to a fresh
        activation, which tries again under the next caller's deadline)."""
        self.state = State.INVALID
        self._stop_timers()
        self.instance = None
        self.catalog.lifecycle.failure(self.ident[0])
        self.catalog.forget(self)
        if info is None:
            self._requeue_leftovers()
        else:
            mb, self.mailbox = self.mailbox, None
            if mb:
                self.catalog.dequeued(len(mb))
                for work in mb:
                    work.fail(info)
        self.let_pump_go()  # a pump waiting for the inline caller has nothing left to do

    async def _activate(self) -> bool:
        """The pump's first turn: create the activation in the chain and under the
        deadline of the work that triggered it (the head of the mailbox)."""
        self.state = State.ACTIVATING
        assert self.mailbox
        first = self.mailbox[0]
        self.chain = first.chain_id
        t_chain = current_chain.set(first.chain_id)
        t_act = current_activation.set(self)
        failure: ErrorInfo | None = None
        own = False  # on_activate raised (rather than running out of the trigger's time)
        try:
            with anyio.CancelScope(deadline=first.deadline) as scope:
                await self._create()
            if scope.cancelled_caught:
                failure = rejection(
                    ErrorCode.TIMEOUT,
                    f"on_activate of {self.ident[0]}/{self.key!r} did not finish before the "
                    "deadline of the call that triggered it",
                )
        except Exception as exc:
            failure = error_info(exc)
            own = True
        finally:
            current_chain.reset(t_chain)
            current_activation.reset(t_act)
            self.chain = None
        if failure is None:
            self._activated()  # if it deactivated itself, the pump's loop ends it next
            return True
        log.warning("activation of %s/%r failed: %s", *self.ident, failure.message)
        self.mailbox.popleft()
        self.catalog.dequeued(1)
        first.fail(failure)
        self._activation_failed(failure if own else None)
        return False

    async def _deactivate(self) -> None:
        """Run on_deactivate as the last turn, then leave the catalog."""
        self.state = State.DEACTIVATING
        self._stop_timers()
        chain = new_chain_id()
        self.chain = chain
        t_chain = current_chain.set(chain)
        t_act = current_activation.set(self)
        start = time.perf_counter()
        try:
            with anyio.move_on_after(self.catalog.config.shutdown_grace):
                assert self.instance is not None
                await self.instance.on_deactivate()
        except Exception:
            log.exception("on_deactivate of %s/%r raised", *self.ident)
        finally:
            seconds = time.perf_counter() - start
            self.catalog.lifecycle.deactivate_seconds.observe((self.ident[0],), seconds)
            current_chain.reset(t_chain)
            current_activation.reset(t_act)
            self.chain = None
            self._finish()

    def _requeue_leftovers(self) -> None:
        """Work that arrived while we were going away waits for a fresh activation."""
        mb, self.mailbox = self.mailbox, None
        if not mb:
            return
        cat = self.catalog
        cat.dequeued(len(mb))
        for work in mb:
            if not cat.state.creates:
                work.fail(rejection(ErrorCode.SHUTTING_DOWN, "the host is shutting down"))
                continue
            try:
                cat.get_or_create(self.impl, self.key).accept(work)
            except (OverloadedError, ShuttingDownError) as exc:
                work.fail(error_info(exc))

    # ------------------------------------------------------------ steering

    def deactivate_on_idle(self) -> None:
        self.deactivate_asap = True

    def delay_deactivation(self, seconds: float) -> None:
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError("delay_deactivation() takes a finite number of seconds >= 0")
        self.keep_until = max(self.keep_until, anyio.current_time() + seconds)
        self.deactivate_asap = False

    # ------------------------------------------------------------ timers

    def register_timer(
        self, interval: float, callback: Callable[[], Awaitable[Any]]
    ) -> TimerHandle:
        handle = check_timer(interval, callback)
        if self.state is not State.ACTIVATING and self.state is not State.VALID:
            raise RuntimeError(f"cannot register a timer on an activation that is {self.state}")
        if self.timers is None:
            self.timers = []
        self.timers.append(handle)
        self.catalog.start_soon(run_timer, self, handle)
        return handle

    def timer_ended(self, handle: TimerHandle) -> None:
        if self.timers is not None and handle in self.timers:
            self.timers.remove(handle)

    def _stop_timers(self) -> None:
        for handle in self.timers or ():
            handle.cancel()
        self.timers = None
