"""The host runtime: the call path (invoke, remote calls, serving the wire), and the
host's lifecycle (start, drain, shutdown, fencing) over its :class:`Catalog`.

A call goes: proxy -> :meth:`Runtime.invoke` (validate and copy arguments, pick the
chain and deadline) -> the directory says where the actor lives -> local delivery (no
bytes: the turn runs in the caller's task when the activation is free, else through its
mailbox) or a remote delivery through the transport (arguments encoded by their types).
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from opentelemetry.trace import SpanKind

from .. import _metrics, _tracing
from .._actor import ActorBase
from .._config import HostConfig
from .._context import current_invoker, done_serving, serving, started, stopped
from .._drive import fast_clock, lazy_deadline, scope_marker
from .._errors import (
    DeadlineExceededError,
    HostUnavailableError,
    ShuttingDownError,
    WrongHostError,
)
from .._interface import ActorInterface, MethodSpec
from .._messages import (
    Key,
    Request,
    Response,
    error_info,
    new_chain_id,
    new_request_id,
    rebuild_error,
)
from .._metrics import CallSeries
from .._seams import LOCAL, Directory, LocalDirectory, RemoteDelivery
from ..pd._records import MAX_REPORTED_TYPES, HostStats
from ._activation import Activation
from ._call import Call, TurnBody, current_chain, inline_depth
from ._catalog import Catalog
from ._inline import Refused
from ._observe import outcome_of, runtime_metrics
from ._served import Served
from ._states import HostState

log = logging.getLogger("koala.runtime")


def current_runtime() -> Runtime:
    """The runtime of this context (or, outside any, the newest running in this process)."""
    rt = current_invoker()
    assert isinstance(rt, Runtime)  # only runtimes enter the context
    return rt


WRONG_HOST_RETRIES = 3

# The local fast path runs turns in the caller's task: a loop of local calls never
# suspends. Every HostConfig.inline_check inline calls the runtime looks at the clock, and if
# TIME_SLICE seconds passed since a task last let others run through it, the caller
# lets them run now (a checkpoint). Inside an inline turn that would count as the
# turn suspending (its method then takes a deadline scope for good, see
# koala._drive), so there it waits for LONG_SLICE: such a turn is long anyway.
TIME_SLICE = 0.002
LONG_SLICE = 0.02

_RUNNING = HostState.RUNNING
_OK = "ok"
_BUCKETS = _metrics.BUCKETS
_bucket = bisect.bisect_left
_perf = time.perf_counter  # the calls' latency clock: one C call (the loop's is two)


@dataclass(frozen=True, slots=True)
class RuntimeStatistics:
    activations: int
    queued: int
    inflight: int
    draining: bool


class Runtime:
    """A host: holds activations and runs their turns. Use as ``async with Runtime(...)``.

    ``actors`` limits the implementations this host serves (default: every
    implementation defined in the process).
    """

    def __init__(
        self,
        config: HostConfig | None = None,
        actors: Iterable[type[ActorBase]] | None = None,
        directory: Directory | None = None,
        remote: RemoteDelivery | None = None,
    ) -> None:
        self.config = config or HostConfig()
        self.directory: Directory = directory or LocalDirectory()
        # a one-host directory (every actor is LOCAL): no lookups, no releases to report
        self._local_only = bool(getattr(self.directory, "local_only", False))
        self.remote = remote
        self._served_impls = Served(actors)
        self._actors = self._served_impls.actors
        self._impls = self._served_impls.impls  # read on every call: one lookup less
        self._catalog = Catalog(
            self,
            self.config,
            None if self._local_only else self.directory.released,
            self._served_impls.serves,
        )
        # anyio.current_time and current_effective_deadline, minus the backend lookup
        # (the catalog's turns read the same ones: both are set once, at start)
        self._clock: Callable[[], float] = anyio.current_time
        self._effective_deadline: Callable[[], float] = anyio.current_effective_deadline
        self._drain_hooks: list[Callable[[], Awaitable[None]]] = []
        # chain id -> requests of it served here or calls of it out of here, in flight:
        # the chains a draining host still accepts requests of
        self._chains: dict[int, int] = {}
        # metrics of the calls made from this host, per method (koala._metrics)
        self._local_calls: dict[MethodSpec, CallSeries] = {}
        self._remote_calls: dict[MethodSpec, CallSeries] = {}
        self._served = _metrics.Counters(
            "koala_requests_served_total",
            "Requests from other hosts served here, by actor type and method",
            ("actor_type", "method"),
        )
        _metrics.report(self, runtime_metrics)
        self._inline_calls = 0
        self._inline_check = self.config.inline_check
        self._slow_turn = self.config.slow_turn
        self._last_pause = 0.0  # when a task last let others run (see TIME_SLICE)
        self._tg: TaskGroup | None = None
        self._token: Any = None

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Runtime:
        self._clock, self._effective_deadline = fast_clock()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._catalog.start(self._tg, self._clock, self._effective_deadline, scope_marker())
        self._token = started(self)
        if _tracing.refresh():  # a tracer provider is configured: calls become spans
            self.invoke = self._invoke_traced  # type: ignore[method-assign]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        try:
            if exc is None:
                await self.shutdown()
        finally:
            self._tg.cancel_scope.cancel()
            stopped(self, self._token)
            result = await self._tg.__aexit__(exc_type, exc, tb)
        return result

    def add_drain_hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``await hook()`` when the host starts draining (e.g. the transport tells
        its peers, GOAWAY), within the shutdown grace."""
        self._drain_hooks.append(hook)

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain: refuse new calls, let in-flight turns finish, deactivate everything.

        Calls made by turns already running (the same call chains) still go through.
        After ``grace`` seconds what remains is cancelled.
        """
        cat = self._catalog
        if not cat.state.creates:  # stopping already, or fenced (evict_all runs)
            return
        grace = self.config.shutdown_grace if grace is None else grace
        deadline = anyio.current_time() + grace
        cat.drain()
        for hook in self._drain_hooks:
            try:
                with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                    await hook()
            except Exception:
                log.exception("a drain hook failed")
        await cat.wait_drained(deadline)
        left = await cat.stop(deadline)
        if left:
            log.warning("%d activations did not deactivate within the grace", left)

    async def evict_all(self, grace: float) -> int:
        """Deactivate every activation, starting no new one until they are gone (or
        ``grace`` passes); the number left. Calls queued meanwhile fail as not run.

        A host that lost its placement lease fences itself with this, so none of its
        actors is live when the cluster places them elsewhere. The host keeps running.
        Every activation is asked to deactivate even if that takes longer than
        ``grace`` (a batch at a time, letting other tasks run in between); the grace
        bounds the wait for them to finish.
        """
        return await self._catalog.evict_all(grace)

    async def shed(self, count: int) -> int:
        """Begin deactivating up to ``count`` activations that are valid and idle (no
        turn running, nothing queued), least recently used first; the number started.

        Each goes at a turn boundary, as idle collection does, and its next call
        activates the actor anew (placed anew, in a cluster): a rebalancer moves actors
        off a loaded host with this. The activations are looked at and deactivated a
        batch at a time, letting other tasks run in between.
        """
        return await self._catalog.shed(count)

    async def _pause(self, long: bool = False) -> None:
        """Let other tasks run if none did through here for TIME_SLICE seconds (or
        LONG_SLICE, when ``long``): for loops that may never suspend otherwise."""
        now = self._clock()
        if now - self._last_pause >= (LONG_SLICE if long else TIME_SLICE):
            self._last_pause = now
            await anyio.lowlevel.checkpoint()
            self._last_pause = self._clock()

    # ------------------------------------------------------------ looking at it

    def statistics(self) -> RuntimeStatistics:
        cat = self._catalog
        return RuntimeStatistics(
            activations=len(cat),
            queued=cat.queued,
            inflight=cat.inflight,
            draining=cat.state.draining,
        )

    def host_stats(self) -> HostStats:
        """What the cluster page shows of this host (sent to the PD with each renewal):
        calls made here, their total time, and live activations by actor type."""
        calls, seconds = 0, 0.0
        for table in (self._local_calls, self._remote_calls):
            for series in list(table.values()):
                calls += sum(series.counts().values())
                seconds += series.time.sum
        live = self._catalog.lifecycle.live
        return HostStats(calls, seconds, dict(list(live.items())[:MAX_REPORTED_TYPES]))

    @property
    def draining(self) -> bool:
        return self._catalog.state.draining

    def activation_of(self, impl: type[ActorBase], key: Key) -> Activation | None:
        """The live activation of (impl, key) on this host, if any (for tests and tools)."""
        return self._catalog.get(impl.actor_type, key)

    def is_active(self, actor_type: str, key: Key) -> bool:
        """Whether this host holds an activation of (actor_type, key) right now."""
        return self._catalog.get(actor_type, key) is not None

    @property
    def scope_marker(self) -> Callable[[], object] | None:
        """What names the running task's innermost cancel scope (a loop hook; None
        where it is not found, or before the runtime starts). See koala._drive."""
        return self._catalog.scope_marker

    @property
    def clock(self) -> Callable[[], float]:
        """``anyio.current_time`` of the running loop, minus the backend lookup."""
        return self._clock

    @property
    def effective_deadline(self) -> Callable[[], float]:
        """``anyio.current_effective_deadline`` of the running loop, likewise."""
        return self._effective_deadline

    @property
    def sync_methods(self) -> dict[tuple[type[ActorBase], str], int]:
        """Per (implementation, method): inline turns in a row that finished without
        suspending, -1 once one did (see koala._drive.run_under_deadline). Read only."""
        return self._catalog.sync_methods

    # ------------------------------------------------------------ resolving

    def impl_for(self, interface: type[ActorInterface]) -> type[ActorBase]:
        """The implementation (hence the actor type) that calls through ``interface``
        reach (see :meth:`Served.impl_for`)."""
        return self._served_impls.impl_for(interface)

    def serves(self, impl: type[ActorBase]) -> bool:
        """Whether this host may activate ``impl`` (every implementation, by default)."""
        return self._served_impls.serves(impl)

    # ------------------------------------------------------------ the call path

    async def invoke(
        self, spec: MethodSpec, interface: type[ActorInterface], key: Key, args: tuple[Any, ...]
    ) -> Any:
        """Call ``spec`` on actor (interface, key) with positional ``args``; await the result."""
        impl = self._impls.get(interface) or self.impl_for(interface)
        cat = self._catalog
        start = _perf()
        chain = current_chain.get()
        if chain is None:
            if cat.state is not _RUNNING and cat.state.draining:
                raise ShuttingDownError(
                    "this host is shutting down and accepts no new calls; retry on another host"
                )
            chain = new_chain_id()
        if self._local_only:
            host = LOCAL
        else:
            host = self.directory.lookup(impl.actor_type, key) or await self._resolve(
                spec, impl.actor_type, key
            )
        if host != LOCAL:
            deadline, own_deadline = self._deadline()
            req = Request(
                new_request_id(),
                new_chain_id() if spec.one_way else chain,
                deadline,
                impl.actor_type,
                key,
                spec.interface.__name__,
                spec.name,
                tuple(spec.encode_args(args)),
                spec.one_way,
                # without a scope of the caller's, the transport enforces the deadline: a
                # scope per call would cost more than the call's own work (Channel)
                own_deadline,
                b"",
                None if _tracing.tracer is None else _tracing.outgoing(),
            )
            return await self._invoke_remote(host, req, spec, start)
        series = self._local_calls.get(spec) or self._series(self._local_calls, spec, impl, "local")
        outcome = _OK
        try:
            args = spec.copy_args(args)
            if spec.one_way:
                act = cat.get_or_create(impl, key)
            else:
                calls = self._inline_calls = self._inline_calls + 1
                if calls >= self._inline_check:  # a loop of these may never suspend
                    self._inline_calls = 0
                    await self._pause(long=inline_depth.get() > 0)
                act = cat.get_or_create(impl, key)
                if act.can_run_inline(chain):
                    try:
                        return await act.run_inline(spec, chain, args)
                    except Refused:  # it ended in on_activate: queue for the next one
                        act = cat.get_or_create(impl, key)
            deadline, own_deadline = self._deadline()
            call = Call(
                cat,
                spec,
                act.ident,
                new_chain_id() if spec.one_way else chain,
                deadline,
                args,
                spec.one_way,
            )
            act.accept(call)
            if own_deadline:
                with anyio.CancelScope(deadline=deadline):
                    return await self._await_call(call)
                raise DeadlineExceededError(
                    f"{spec.qualname} on {impl.actor_type}/{key!r} got no answer within "
                    f"the default timeout of {self.config.default_timeout} s",
                    self.config.default_timeout,
                    impl.actor_type,
                    key,
                    spec.name,
                )
            return await self._await_call(call)
        except BaseException as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            # series.done(outcome, seconds), written out: this is every local call
            seconds = _perf() - start
            if outcome is _OK:
                series.ok += 1
            else:
                series.failed(outcome)
            hist = series.time
            hist.counts[_bucket(_BUCKETS, seconds)] += 1
            hist.sum += seconds
            if seconds > self._slow_turn:
                series.slow += 1

    async def _invoke_traced(
        self, spec: MethodSpec, interface: type[ActorInterface], key: Key, args: tuple[Any, ...]
    ) -> Any:
        """:meth:`invoke` inside a CLIENT span (the runtime's ``invoke`` while tracing is
        on: with no tracer, calls pay nothing for it)."""
        active = _tracing.tracer
        if active is None:
            return await Runtime.invoke(self, spec, interface, key, args)
        impl = self._impls.get(interface) or self.impl_for(interface)
        attributes = _tracing.call_attributes(interface.__name__, spec.name, impl.actor_type, key)
        with _tracing.span(active, spec.qualname, SpanKind.CLIENT, attributes):
            return await Runtime.invoke(self, spec, interface, key, args)

    def _deadline(self) -> tuple[float, bool]:
        """The current call's deadline, and whether the call enforces it itself (no cancel
        scope of its caller's does: the default timeout, or an inline turn's lazy one)."""
        deadline = self._effective_deadline()
        if deadline != math.inf:
            return deadline, False
        deadline = lazy_deadline.get()  # an inline turn's default one, not yet scoped
        if deadline == math.inf:
            deadline = self._clock() + self.config.default_timeout
        return deadline, True

    async def _resolve(self, spec: MethodSpec, actor_type: str, key: Key) -> str:
        """Ask the directory where the actor lives, within the call's deadline (the PD,
        or etcd behind it, may not answer: the call must still end on time)."""
        deadline, own_deadline = self._deadline()
        if not own_deadline:
            return await self.directory.resolve(actor_type, key)
        with anyio.CancelScope(deadline=deadline):  # the fast clock is anyio's timeline
            return await self.directory.resolve(actor_type, key)
        raise DeadlineExceededError(
            f"{spec.qualname} on {actor_type}/{key!r}: the deadline passed while finding "
            "where the actor lives (is the placement driver reachable?)",
            None,
            actor_type,
            key,
            spec.name,
        )

    @staticmethod
    async def _await_call(call: Call) -> Any:
        """Wait for a delivered call's answer; a caller that gives up cancels it."""
        if call.done is None:  # one-way
            return None
        try:
            await call.done.wait()
        except BaseException:
            if not call.answered:
                call.cancel()
            raise
        if call.error is not None:
            raise rebuild_error(call.error)
        return call.result

    async def _invoke_remote(self, host: str, req: Request, spec: MethodSpec, start: float) -> Any:
        if self.remote is None:
            raise HostUnavailableError(
                f"{req.actor_type}/{req.key!r} lives on host {host!r}, and this runtime has "
                "no transport to reach it"
            )
        series = self._remote_calls.get(spec) or self._series(
            self._remote_calls, spec, self.impl_for(spec.interface), "remote"
        )
        chains, chain = self._chains, req.chain_id
        chains[chain] = chains.get(chain, 0) + 1
        outcome = "ok"
        try:
            return await self.remote.call(host, req, spec)
        except WrongHostError:
            try:
                return await self._send_elsewhere(req, spec)
            except BaseException as exc:
                outcome = outcome_of(exc)
                raise
        except BaseException as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            self._chain_done(chain)
            series.done(outcome, _perf() - start)

    @staticmethod
    def _series(
        table: dict[MethodSpec, CallSeries], spec: MethodSpec, impl: type[ActorBase], path: str
    ) -> CallSeries:
        """The metrics series of calls to ``spec`` on ``path``, made on first use (at
        most MAX_SERIES per table: methods are few, but a table never grows unbounded)."""
        series = CallSeries(impl.actor_type, spec.name, path)
        if len(table) < _metrics.MAX_SERIES:
            table[spec] = series
        return series

    def _chain_done(self, chain: int) -> None:
        left = self._chains[chain] - 1
        if left:
            self._chains[chain] = left
        else:
            del self._chains[chain]

    async def _send_elsewhere(self, req: Request, spec: MethodSpec) -> Any:
        """The host answered "wrong host" (a stale placement, and proof the request did not
        run there): re-resolve and send again, a bounded number of times."""
        assert self.remote is not None
        for attempt in range(WRONG_HOST_RETRIES):
            self.directory.forget(req.actor_type, req.key)
            if req.expires:
                with anyio.fail_at(req.deadline):
                    host = await self.directory.resolve(req.actor_type, req.key)
            else:
                host = await self.directory.resolve(req.actor_type, req.key)
            if host == LOCAL:
                args = spec.decode_args(req.args)
                act = self._catalog.get_or_create(self.impl_for(spec.interface), req.key)
                call = Call(
                    self._catalog, spec, act.ident, req.chain_id, req.deadline, args, req.one_way
                )
                act.accept(call)
                if req.expires:
                    with anyio.fail_at(req.deadline):
                        return await self._await_call(call)
                return await self._await_call(call)
            if attempt == WRONG_HOST_RETRIES - 1:
                break
            try:
                return await self.remote.call(host, req, spec)
            except WrongHostError:
                continue
        return await self.remote.call(host, req, spec)

    def schedule_turn(self, impl: type[ActorBase], key: Key, body: TurnBody, name: str) -> None:
        """Queue ``body(activation)`` as a turn of actor (impl, key) on this host, with a
        chain of its own and the default timeout, activating the actor if needed: for
        work that is not a call (a gateway's client session hooks). Nobody waits for it;
        what it raises is logged. ShuttingDownError, ActorNotFoundError (not served
        here) or OverloadedError (the mailbox or the host's queue is full) if refused."""
        self._catalog.get_or_create(impl, key).schedule_turn(body, name)

    async def serve_request(self, req: Request) -> Response | None:
        """Run a request that came over the wire; its args and the answer are CBOR data.

        The transport calls this from a serving task, bounded by the request's deadline
        (``req.deadline``, on this process's clock: a cancel scope, entered at once or at
        the turn's first suspension, see koala._drive), which the peer's CANCEL also
        cancels. A free activation runs the turn right here (as local calls do);
        otherwise the request queues. Returns None for one-way requests.
        """
        chains, chain = self._chains, req.chain_id
        if self._catalog.state.draining and chain not in chains:
            # only chains live here go on: a turn of it waits on a call out of this host
            # (which may call back), or another request of it is served here
            exc = ShuttingDownError("this host is shutting down; retry on another host")
            return None if req.one_way else Response(req.request_id, None, error_info(exc))
        token = serving(self)
        chains[chain] = chains.get(chain, 0) + 1
        try:
            active = _tracing.tracer
            if active is None:
                return await self._serve(req)
            trace = req.trace
            parent = None if trace is None else _tracing.incoming(*trace)
            attributes = _tracing.call_attributes(
                req.interface, req.method, req.actor_type, req.key
            )
            name = f"{req.interface}.{req.method}"
            with _tracing.span(active, name, SpanKind.SERVER, attributes, parent):
                return await self._serve(req)
        finally:
            self._chain_done(chain)
            done_serving(token)

    async def _serve(self, req: Request) -> Response | None:
        try:
            impl, spec = self._served_impls.target_of(req)
            self._served.inc((req.actor_type, req.method))
            if not self._local_only:
                owner = self.directory.lookup(req.actor_type, req.key)
                if owner != LOCAL:
                    if req.placement and self.directory.claim(
                        req.actor_type, req.key, req.placement
                    ):
                        owner = LOCAL
                    else:
                        if owner is not None:  # the sender thinks otherwise: ask, once
                            self.directory.forget(req.actor_type, req.key)
                        owner = await self.directory.resolve(req.actor_type, req.key)
                if owner != LOCAL:
                    raise WrongHostError(
                        f"{req.actor_type}/{req.key!r} is not placed on this host "
                        f"(it is on {owner}); refresh the placement and retry"
                    )
            args = spec.decode_args(req.args)
            act = self._catalog.get_or_create(impl, req.key)
            if not req.one_way and act.can_run_inline(req.chain_id):
                try:
                    result = await act.run_inline(spec, req.chain_id, args)
                    return Response(req.request_id, spec.result.to_wire(result))
                except Refused:  # it ended in on_activate: queue for the next one
                    act = self._catalog.get_or_create(impl, req.key)
            call = Call(
                self._catalog, spec, act.ident, req.chain_id, req.deadline, args, req.one_way
            )
            act.accept(call)
        except Exception as exc:
            return None if req.one_way else Response(req.request_id, None, error_info(exc))
        if call.done is None:
            return None
        try:
            await call.done.wait()
        except BaseException:
            call.cancel()
            raise
        if call.error is not None:
            return Response(req.request_id, None, call.error)
        try:
            return Response(req.request_id, spec.result.to_wire(call.result))
        except Exception as exc:
            return Response(req.request_id, None, error_info(exc))
