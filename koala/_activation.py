"""One activation of one actor: its mailbox, its turns, its lifecycle and its timers.

Turns run one at a time. A pump task (started when work arrives, gone after the
activation has been idle a while) takes calls from the bounded mailbox in order and
runs each as a turn. A call of the call chain that holds the activation right now
(A -> B -> A) does not queue: it runs at once, beside the suspended turn it belongs to,
so chains never deadlock and two chains never interleave.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import anyio

from ._actor import ActorBase
from ._drive import lazy_deadline, run_under_deadline
from ._errors import OverloadedError, ShuttingDownError
from ._messages import (
    ErrorCode,
    ErrorInfo,
    Key,
    Request,
    deadline_rejection,
    error_info,
    new_chain_id,
    rebuild_error,
    rejection,
)

if TYPE_CHECKING:
    from ._interface import MethodSpec
    from ._runtime import Runtime

log = logging.getLogger("koala.activation")

current_chain: ContextVar[int | None] = ContextVar("koala_chain", default=None)
current_activation: ContextVar[Activation | None] = ContextVar("koala_activation", default=None)
# How many inline turns this task is nested in; past the bound calls go through a mailbox
# (a fresh task and stack), so long call chains cannot exhaust the interpreter's stack.
inline_depth: ContextVar[int] = ContextVar("koala_inline_depth", default=0)


def current_deadline() -> float:
    """The deadline of the call being served, on ``anyio.current_time()``'s clock.

    Inside an actor turn this is the caller's deadline, or the default one when the
    caller had none; ``math.inf`` outside any deadline. Prefer it to
    ``anyio.current_effective_deadline()`` in a turn: a turn on the local fast path gets
    its default deadline's cancel scope only once it first suspends.
    """
    deadline = anyio.current_effective_deadline()
    return deadline if deadline != math.inf else lazy_deadline.get()


MAX_INLINE_DEPTH = 32

_DEFAULT_ON_DEACTIVATE = ActorBase.on_deactivate


class State(enum.Enum):
    CREATING = "creating"
    ACTIVATING = "activating"
    VALID = "valid"
    DEACTIVATING = "deactivating"
    INVALID = "invalid"


class Call:
    """A request in flight on this host, with what the caller waits on."""

    __slots__ = (
        "answered",
        "callback",
        "cancelled",
        "counted",
        "done",
        "error",
        "req",
        "result",
        "rt",
        "scope",
        "spec",
    )

    def __init__(
        self,
        rt: Runtime,
        req: Request,
        spec: MethodSpec | None,
        callback: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self.rt = rt
        self.req = req
        self.spec = spec
        self.callback = callback
        self.done: anyio.Event | None = None if req.one_way else anyio.Event()
        self.result: Any = None
        self.error: ErrorInfo | None = None
        self.scope: anyio.CancelScope | None = None
        self.cancelled = False
        self.answered = False
        self.counted = False  # counted in the host's in-flight total once accepted

    def _complete(self) -> None:
        self.answered = True
        if self.counted:
            rt = self.rt
            rt._inflight -= 1
            if rt._inflight == 0 and rt._draining:
                rt._drained.set()
        if self.done is not None:
            self.done.set()
        elif self.error is not None and self.error.code is not ErrorCode.CANCELLED:
            log.error(
                "one-way call %s.%s to %s/%r failed: %s\n%s",
                self.req.interface,
                self.req.method,
                self.req.actor_type,
                self.req.key,
                self.error.message,
                self.error.traceback,
            )

    def finish(self, result: Any) -> None:
        if not self.answered:
            self.result = result
            self._complete()

    def fail(self, info: ErrorInfo) -> None:
        if not self.answered:
            self.error = info
            self._complete()

    def cancel(self) -> None:
        """The caller gave up: drop the call if queued, cancel its turn if running."""
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


class TimerHandle:
    """A registered timer; ``cancel()`` stops it. Ticks never overlap other turns."""

    __slots__ = ("_pending", "_scope", "callback", "interval", "ticks")

    def __init__(self, interval: float, callback: Callable[[], Awaitable[Any]]) -> None:
        self.interval = interval
        self.callback = callback
        self.ticks = 0
        self._pending = False
        self._scope = anyio.CancelScope()

    def cancel(self) -> None:
        self._scope.cancel()

    @property
    def cancelled(self) -> bool:
        return self._scope.cancel_called


def next_tick(start: float, interval: float, now: float, last: int) -> int:
    """Index of the next tick to run after tick `last`, at time `now`.

    Tick n is due at ``start + n * interval``. Ticks whose time already passed are
    skipped rather than run back to back, so a late timer catches up without a burst.
    """
    behind = math.floor((now - start) / interval) + 1
    return max(last + 1, behind)


PUMP_NONE, PUMP_RUNNING, PUMP_WAITING = 0, 1, 2


class Activation:
    """The in-memory incarnation of one (actor type, key)."""

    __slots__ = (
        "bucket",
        "chain",
        "deactivate_asap",
        "depth",
        "ident",
        "impl",
        "instance",
        "keep_until",
        "key",
        "last_used",
        "linger_exit",
        "mailbox",
        "pump",
        "reentrant_done",
        "runtime",
        "state",
        "timers",
        "waiter",
    )

    def __init__(self, runtime: Runtime, impl: type[ActorBase], key: Key) -> None:
        self.runtime = runtime
        self.impl = impl
        self.key = key
        self.ident = (impl.actor_type, key)
        self.instance: ActorBase | None = None
        self.state = State.CREATING
        self.mailbox: deque[Call] | None = None
        self.waiter: anyio.Event | None = None
        self.pump = PUMP_NONE
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
        return f"<Activation {self.ident[0]}/{self.key!r} {self.state.value}>"

    @property
    def idle_timeout(self) -> float:
        return self.impl.idle_timeout or self.runtime.config.idle_timeout

    # ------------------------------------------------------------ accepting work

    def accept(self, call: Call) -> None:
        """Take a call: run it now if it belongs to the chain holding us, else queue it."""
        rt = self.runtime
        if self.chain is not None and call.req.chain_id == self.chain:
            if not call.counted:
                call.counted = True
                rt._inflight += 1
            self.depth += 1
            rt._tg.start_soon(self._reentrant_turn, call)
            return
        if rt._queued >= rt.config.max_queued:
            raise OverloadedError(
                f"this host has {rt._queued} calls queued (max_queued); retry later"
            )
        mb = self.mailbox
        if mb is None:
            mb = self.mailbox = deque()
        elif len(mb) >= rt.config.mailbox_size:
            raise OverloadedError(
                f"the mailbox of {self.ident[0]}/{self.key!r} is full "
                f"({rt.config.mailbox_size} calls queued); retry later or raise mailbox_size"
            )
        mb.append(call)
        rt._queued += 1
        if not call.counted:
            call.counted = True
            rt._inflight += 1
        self._wake()

    def _wake(self) -> None:
        if self.pump == PUMP_WAITING:
            self.pump = PUMP_RUNNING
            self.runtime._waiting.discard(self)
            assert self.waiter is not None
            self.waiter.set()
        elif self.pump == PUMP_NONE:
            self.pump = PUMP_RUNNING
            self.runtime._tg.start_soon(self._run_pump)

    def begin_deactivation(self) -> None:
        """Deactivate at the next turn boundary (on_deactivate is the last turn).

        A free activation with no task of its own ends at once when it has nothing to
        run (no timers, the default on_deactivate), without any task; if it has, one of
        the runtime's bounded set of deactivation tasks runs on_deactivate. A busy one
        is deactivated by its pump (or its inline caller) when its turn ends.
        """
        state = self.state
        if state is State.CREATING and self.chain is None and not self.mailbox:
            self.state = State.INVALID  # never activated: nothing to run on_deactivate on
            self.runtime._forget(self)
            return
        if state is State.VALID or state is State.CREATING or state is State.ACTIVATING:
            self.deactivate_asap = True
            if state is State.VALID and self.chain is None:
                self.state = State.DEACTIVATING
                if self.pump == PUMP_NONE and not self.mailbox:
                    if not self.timers and self.impl.on_deactivate is _DEFAULT_ON_DEACTIVATE:
                        self._finish()
                    else:
                        self.pump = PUMP_RUNNING  # a deactivation task owns it from now
                        self.runtime._retire(self)
                    return
            self._wake()

    def _finish(self) -> None:
        """Leave the catalog; calls that queued meanwhile go to a fresh activation."""
        self._stop_timers()
        self.state = State.INVALID
        # the instance points back at us: without this a cycle, freed only by a full GC
        self.instance = None
        self.runtime._forget(self)
        self._requeue_leftovers()

    # ------------------------------------------------------------ the pump

    async def _run_pump(self) -> None:
        rt = self.runtime
        try:
            if self.state is State.CREATING and not await self._activate():
                return
            while True:
                if self.chain is None and self.state is State.DEACTIVATING:
                    await self._deactivate()  # what is queued goes to a fresh activation
                    return
                mb = self.mailbox
                if mb and self.chain is None:
                    call = mb.popleft()
                    rt._queued -= 1
                    self.linger_exit = False
                    await self._primary_turn(call)
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
                self.pump = PUMP_WAITING
                self.waiter = anyio.Event()
                rt._waiting.add(self)
                await self.waiter.wait()
        finally:
            self.pump = PUMP_NONE
            rt._waiting.discard(self)

    def can_run_inline(self, chain: int) -> bool:
        """True when a caller may run its turn in its own task right now: the activation
        is valid (or just created) and free (no turn, nothing queued), or held by the
        caller's own chain."""
        if self.state is not State.VALID and self.state is not State.CREATING:
            return False
        held = self.chain
        if held is None:
            return not self.mailbox and inline_depth.get() < MAX_INLINE_DEPTH
        return held == chain and inline_depth.get() < MAX_INLINE_DEPTH

    async def run_inline(self, spec: MethodSpec, chain: int, args: tuple[Any, ...]) -> Any:
        """Run one turn in the caller's task: the local fast path, with no task switch.

        The turn has the same guarantees as a mailbox turn: it holds the activation (other
        chains queue behind it), it runs under the caller's deadline (or the default one),
        the caller's cancellation cancels it, and errors reach the caller rebuilt exactly
        as on the mailbox path.
        """
        rt = self.runtime
        outer = self.chain
        self.chain = chain
        rt._inflight += 1
        t_chain = current_chain.set(chain)
        t_act = current_activation.set(self)
        t_depth = inline_depth.set(inline_depth.get() + 1)
        try:
            deadline = rt.effective_deadline()
            if deadline == math.inf:
                # inside a turn that has not suspended yet, its deadline (whose scope is
                # entered at its first suspension, this turn's included); else the default
                deadline = lazy_deadline.get()
            if deadline == math.inf:
                result = await self._run_with_default_deadline(spec, args)
            elif deadline <= rt.clock():
                raise rebuild_error(
                    deadline_rejection(
                        f"the deadline of {spec.qualname} had passed before it ran; not run",
                        *self.ident,
                        spec.name,
                    )
                )
            else:
                result = await self._inline_body(spec, args)
        except Exception as exc:  # the caller sees what a mailbox turn would report
            raise rebuild_error(error_info(exc)) from None
        finally:
            current_chain.reset(t_chain)
            current_activation.reset(t_act)
            inline_depth.reset(t_depth)
            # turns of one chain may end out of order (a call back into this actor that
            # outlives the turn whose call gave up): only the holder's exit frees it
            if self.chain == chain:
                self.chain = outer
            rt._inflight -= 1
            if rt._inflight == 0 and rt._draining:
                rt._drained.set()
            if outer is None:
                if self.state is State.INVALID or self.state is State.CREATING:
                    self.state = State.INVALID  # its activation failed, or never started
                    rt._forget(self)
                    self._requeue_leftovers()
                else:
                    self.last_used = rt.now
                    if self.deactivate_asap and self.state is State.VALID:
                        self.state = State.DEACTIVATING  # the next call gets a fresh one
                    if self.mailbox or self.deactivate_asap:
                        self._wake()
        return spec.result.check(result, f"the result of {spec.qualname}")

    async def _run_with_default_deadline(self, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        """An inline turn under the default deadline; a method seen finishing without
        suspending skips the deadline's cancel scope until it suspends
        (koala._drive.run_under_deadline)."""
        rt = self.runtime
        deadline = rt.clock() + rt.config.default_timeout
        result, scope = await run_under_deadline(
            lambda: self._inline_body(spec, args),
            deadline,
            (self.impl, spec.name),
            rt.sync_methods,
            rt.scope_marker,
        )
        if scope is not None and scope.cancelled_caught:
            raise rebuild_error(
                deadline_rejection(
                    f"{spec.qualname} on {self.ident[0]}/{self.key!r} did not finish within "
                    f"the default timeout of {rt.config.default_timeout} s",
                    *self.ident,
                    spec.name,
                    rt.config.default_timeout,
                )
            )
        return result

    def _inline_body(self, spec: MethodSpec, args: tuple[Any, ...]) -> Coroutine[Any, Any, Any]:
        # implementations are checked to be 'async def' when their class is defined
        if self.state is State.CREATING:
            return self._activate_inline(spec, args)
        return getattr(self.instance, spec.name)(*args)  # type: ignore[no-any-return]

    async def _activate_inline(self, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        """First call to a new activation, in the caller's task: on_activate, then the call."""
        rt = self.runtime
        self.state = State.ACTIVATING
        try:
            instance = self.impl.__new__(self.impl)
            instance._koala_activation = self
            instance.__init__()  # type: ignore[misc]
            self.instance = instance
            await instance.on_activate()
        except BaseException:
            log.warning("activation of %s/%r failed", self.ident[0], self.key, exc_info=True)
            self.state = State.INVALID
            self._stop_timers()
            rt._forget(self)
            raise
        self.state = State.VALID
        self.last_used = rt.now
        rt._schedule_collection(self)
        return await getattr(instance, spec.name)(*args)

    async def _primary_turn(self, call: Call) -> None:
        req = call.req
        if call.cancelled:
            call.fail(rejection(ErrorCode.CANCELLED, "the caller cancelled the call"))
            return
        if req.deadline <= anyio.current_time():
            call.fail(
                deadline_rejection(
                    f"the deadline of {req.interface}.{req.method} passed while it waited in "
                    f"the mailbox of {req.actor_type}/{req.key!r}; it was not run",
                    req.actor_type,
                    req.key,
                    req.method,
                )
            )
            return
        self.chain = req.chain_id
        try:
            await self._turn(call)
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
        req = call.req
        t_chain = current_chain.set(req.chain_id)
        t_act = current_activation.set(self)
        try:
            with anyio.CancelScope(deadline=req.deadline) as scope:
                call.scope = scope
                if call.cancelled:
                    scope.cancel()
                if call.callback is not None:
                    result = await call.callback()
                else:
                    result = await getattr(self.instance, req.method)(*req.args)
            if scope.cancelled_caught:
                if call.cancelled:
                    call.fail(rejection(ErrorCode.CANCELLED, "the caller cancelled the call"))
                else:
                    call.fail(
                        deadline_rejection(
                            f"{req.interface}.{req.method} on {req.actor_type}/{req.key!r} "
                            "did not finish before its deadline",
                            req.actor_type,
                            req.key,
                            req.method,
                        )
                    )
            elif call.spec is not None and not req.one_way:
                result = call.spec.result.check(result, f"the result of {call.spec.qualname}")
                call.finish(result)
            else:
                call.finish(None)
        except Exception as exc:
            call.fail(error_info(exc))
        finally:
            current_chain.reset(t_chain)
            current_activation.reset(t_act)
            if not call.answered:  # cancelled from outside (hard shutdown)
                call.fail(rejection(ErrorCode.SHUTTING_DOWN, "the host stopped during the call"))
            self.last_used = self.runtime.now

    # ------------------------------------------------------------ lifecycle

    async def _activate(self) -> bool:
        """Create the instance and run on_activate as the first turn (the trigger's chain)."""
        rt = self.runtime
        self.state = State.ACTIVATING
        assert self.mailbox
        first = self.mailbox[0]
        self.chain = first.req.chain_id
        t_chain = current_chain.set(first.req.chain_id)
        t_act = current_activation.set(self)
        failure: ErrorInfo | None = None
        try:
            with anyio.CancelScope(deadline=first.req.deadline) as scope:
                instance = self.impl.__new__(self.impl)
                instance._koala_activation = self
                instance.__init__()  # type: ignore[misc]
                self.instance = instance
                await instance.on_activate()
            if scope.cancelled_caught:
                failure = rejection(
                    ErrorCode.TIMEOUT,
                    f"on_activate of {self.ident[0]}/{self.key!r} did not finish before the "
                    "deadline of the call that triggered it",
                )
        except Exception as exc:
            failure = error_info(exc)
        finally:
            current_chain.reset(t_chain)
            current_activation.reset(t_act)
            self.chain = None
        if failure is None:
            self.state = State.VALID
            self.last_used = rt.now
            rt._schedule_collection(self)
            return True
        log.warning("activation of %s/%r failed: %s", self.ident[0], self.key, failure.message)
        self.state = State.INVALID
        self.mailbox.popleft()
        rt._queued -= 1
        first.fail(failure)
        self._stop_timers()
        rt._forget(self)
        self._requeue_leftovers()
        return False

    async def _deactivate(self) -> None:
        """Run on_deactivate as the last turn, then leave the catalog."""
        rt = self.runtime
        self.state = State.DEACTIVATING
        self._stop_timers()
        chain = new_chain_id()
        self.chain = chain
        t_chain = current_chain.set(chain)
        t_act = current_activation.set(self)
        try:
            with anyio.move_on_after(rt.config.shutdown_grace):
                assert self.instance is not None
                await self.instance.on_deactivate()
        except Exception:
            log.exception("on_deactivate of %s/%r raised", self.ident[0], self.key)
        finally:
            current_chain.reset(t_chain)
            current_activation.reset(t_act)
            self.chain = None
            self._finish()

    def _requeue_leftovers(self) -> None:
        """Calls that arrived while we were going away wait for a fresh activation."""
        mb, self.mailbox = self.mailbox, None
        if not mb:
            return
        rt = self.runtime
        rt._queued -= len(mb)
        for call in mb:
            if rt._stopping:
                call.fail(rejection(ErrorCode.SHUTTING_DOWN, "the host is shutting down"))
                continue
            try:
                rt._deliver_local(call, self.impl)
            except (OverloadedError, ShuttingDownError) as exc:
                call.fail(error_info(exc))

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
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
            raise ValueError(f"register_timer() needs a positive interval, got {interval!r}")
        if not callable(callback):
            raise TypeError("register_timer() needs an async callable taking no arguments")
        if self.state not in (State.ACTIVATING, State.VALID):
            raise RuntimeError(f"cannot register a timer on an activation that is {self.state}")
        handle = TimerHandle(float(interval), callback)
        if self.timers is None:
            self.timers = []
        self.timers.append(handle)
        self.runtime._tg.start_soon(self._run_timer, handle)
        return handle

    async def _run_timer(self, handle: TimerHandle) -> None:
        rt = self.runtime
        with handle._scope:
            start = anyio.current_time()
            n = 1
            while True:
                await anyio.sleep_until(start + n * handle.interval)
                if self.state not in (State.VALID, State.ACTIVATING):
                    break
                if not handle._pending:
                    handle._pending = True
                    self._enqueue_tick(handle, rt)
                n = next_tick(start, handle.interval, anyio.current_time(), n)
        if self.timers is not None and handle in self.timers:
            self.timers.remove(handle)

    def _enqueue_tick(self, handle: TimerHandle, rt: Runtime) -> None:
        async def tick() -> None:
            try:
                handle.ticks += 1
                await handle.callback()
            except Exception:
                log.exception("timer tick of %s/%r raised; the timer goes on", *self.ident)
            finally:
                handle._pending = False

        req = Request(
            0,
            new_chain_id(),
            anyio.current_time() + rt.config.default_timeout,
            self.ident[0],
            self.key,
            "<timer>",
            getattr(handle.callback, "__name__", "callback"),
            (),
            True,
        )
        try:
            self.accept(Call(rt, req, None, tick))
        except OverloadedError:
            handle._pending = False
            log.warning("timer tick of %s/%r skipped: mailbox full", *self.ident)

    def _stop_timers(self) -> None:
        for handle in self.timers or ():
            handle.cancel()
        self.timers = None
