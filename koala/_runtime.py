"""The host runtime: the catalog of activations, the call path, collection and shutdown.

A call goes: proxy -> :meth:`Runtime.invoke` (validate and copy arguments, pick the
chain and deadline) -> the directory says where the actor lives -> local delivery (no
bytes: the turn runs in the caller's task when the activation is free, else through its
mailbox) or a remote delivery through the transport (arguments encoded by their types).
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from ._activation import (
    PUMP_NONE,
    Activation,
    Call,
    State,
    current_chain,
    inline_depth,
)
from ._actor import ActorBase, implementations_of, implemented_interfaces
from ._config import HostConfig
from ._context import current_invoker, done_serving, serving, started, stopped
from ._drive import fast_clock, lazy_deadline, scope_marker
from ._errors import (
    ActorNotFoundError,
    DeadlineExceededError,
    HostUnavailableError,
    RuntimeNotRunningError,
    ShuttingDownError,
    WrongHostError,
)
from ._interface import ActorInterface, MethodSpec, interfaces_of
from ._messages import (
    Key,
    Request,
    Response,
    error_info,
    new_chain_id,
    new_request_id,
    rebuild_error,
)
from ._seams import LOCAL as LOCAL  # koala.pd imports it from here (see #16)
from ._seams import Directory, LocalDirectory, RemoteDelivery

log = logging.getLogger("koala.runtime")


def current_runtime() -> Runtime:
    """The runtime of this context (or, outside any, the newest running in this process)."""
    rt = current_invoker()
    assert isinstance(rt, Runtime)  # only runtimes enter the context
    return rt


WRONG_HOST_RETRIES = 3

# The local fast path runs turns in the caller's task: a loop of local calls never
# suspends. Every INLINE_CHECK inline calls the runtime looks at the clock, and if
# TIME_SLICE seconds passed since a task last let others run through it, the caller
# lets them run now (a checkpoint). Inside an inline turn that would count as the
# turn suspending (its method then takes a deadline scope for good, see
# koala._drive), so there it waits for LONG_SLICE: such a turn is long anyway.
INLINE_CHECK = 64
TIME_SLICE = 0.002
LONG_SLICE = 0.02
# Memory is given back (the catalog's table rebuilt, the C heap trimmed) once at least
# COMPACT_AFTER activations left since the last time, four times as many as remain, and
# no more than COMPACT_MAX remain: the rebuild copies them in one step (a few ms).
COMPACT_AFTER = 10_000
COMPACT_MAX = 50_000


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
        self._local_only = isinstance(self.directory, LocalDirectory)
        self.remote = remote
        self._actors = list(actors) if actors is not None else None
        self._impls: dict[type[ActorInterface], type[ActorBase]] = {}
        # names the task's innermost cancel scope (see koala._drive); None: unknown
        self.scope_marker: Callable[[], object] | None = None
        # anyio.current_time and current_effective_deadline, minus the backend lookup
        self.clock: Callable[[], float] = anyio.current_time
        self.effective_deadline: Callable[[], float] = anyio.current_effective_deadline
        # per method: inline turns in a row that finished without suspending (-1: one
        # did suspend); see Activation._run_with_default_deadline
        self.sync_methods: dict[tuple[type[ActorBase], str], int] = {}
        self._targets: dict[tuple[str, str, str], tuple[type[ActorBase], MethodSpec]] = {}
        self.drain_hooks: list[Callable[[], Awaitable[None]]] = []
        self._catalog: dict[tuple[str, Key], Activation] = {}
        self._waiting: set[Activation] = set()
        self._buckets: dict[int, set[Activation]] = {}
        self._queued = 0
        self._inflight = 0
        # idle activations waiting for a deactivation task, and how many tasks run
        self._retiring: deque[Activation] = deque()
        self._retirers = 0
        self._released = 0  # activations that left the catalog since the last compaction
        # chain id -> requests of it served here or calls of it out of here, in flight:
        # the chains a draining host still accepts requests of
        self._chains: dict[int, int] = {}
        self._inline_calls = 0
        self._last_pause = 0.0  # when a task last let others run (see TIME_SLICE)
        self.now = 0.0  # a coarse clock (updated by the collector) for idle bookkeeping
        self._draining = False
        self._stopping = False
        self._drained = anyio.Event()
        self._emptied = anyio.Event()
        self._tg: TaskGroup = _NotStarted()  # type: ignore[assignment]
        self._token: Any = None
        if self._actors is not None:
            for impl in self._actors:
                if not (isinstance(impl, type) and issubclass(impl, ActorBase)):
                    raise TypeError(f"{impl!r} is not an ActorBase implementation")
                for iface in interfaces_of(impl):
                    self._impls[iface] = impl

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Runtime:
        self.scope_marker = scope_marker()
        self.clock, self.effective_deadline = fast_clock()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self.now = anyio.current_time()
        self._token = started(self)
        self._tg.start_soon(self._collector)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            if exc is None:
                await self.shutdown()
        finally:
            self._tg.cancel_scope.cancel()
            stopped(self, self._token)
            result = await self._tg.__aexit__(exc_type, exc, tb)
        return result

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain: refuse new calls, let in-flight turns finish, deactivate everything.

        Calls made by turns already running (the same call chains) still go through.
        After ``grace`` seconds what remains is cancelled.
        """
        if self._stopping:
            return
        grace = self.config.shutdown_grace if grace is None else grace
        deadline = anyio.current_time() + grace
        self._draining = True
        for hook in self.drain_hooks:  # e.g. the transport tells peers (GOAWAY)
            try:
                with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                    await hook()
            except Exception:
                log.exception("a drain hook failed")
        if self._inflight:
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                await self._drained.wait()
        self._stopping = True
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            await self._begin_deactivating(deque(self._catalog.values()))
            if self._catalog:
                await self._emptied.wait()
        if self._catalog:
            log.warning("%d activations did not deactivate within the grace", len(self._catalog))

    async def evict_all(self, grace: float) -> int:
        """Deactivate every activation, starting no new one until they are gone (or
        ``grace`` passes); the number left. Calls queued meanwhile fail as not run.

        A host that lost its placement lease fences itself with this, so none of its
        actors is live when the cluster places them elsewhere. The host keeps running.
        Every activation is asked to deactivate even if that takes longer than
        ``grace`` (a batch at a time, letting other tasks run in between); the grace
        bounds the wait for them to finish.
        """
        if self._stopping:
            return len(self._catalog)
        self._stopping = True
        self._emptied = anyio.Event()
        deadline = anyio.current_time() + grace
        try:
            await self._begin_deactivating(deque(self._catalog.values()))
            if self._catalog:
                with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                    await self._emptied.wait()
            self._compact_if_due()
            return len(self._catalog)
        finally:
            if not self._draining:
                self._stopping = False
                self._emptied = anyio.Event()

    async def shed(self, count: int) -> int:
        """Begin deactivating up to ``count`` activations that are valid and idle (no
        turn running, nothing queued), least recently used first; the number started.

        Each goes at a turn boundary, as idle collection does, and its next call
        activates the actor anew (placed anew, in a cluster): a rebalancer moves actors
        off a loaded host with this. The activations are looked at and deactivated a
        batch at a time, letting other tasks run in between.
        """
        if count <= 0 or self._stopping:
            return 0
        scan = self.config.deactivation_batch * 32  # looking costs less than deactivating
        by_use: dict[float, list[Activation]] = {}  # last_used is a coarse clock: few values
        for i, act in enumerate(list(self._catalog.values())):
            if i and i % scan == 0:
                await anyio.lowlevel.checkpoint()
            if act.state is State.VALID and act.chain is None and not act.mailbox:
                by_use.setdefault(act.last_used, []).append(act)
        chosen: deque[Activation] = deque()
        for used in sorted(by_use):
            chosen.extend(by_use[used][: count - len(chosen)])
            if len(chosen) >= count:
                break
        del by_use
        return await self._begin_deactivating(chosen, idle_only=True)  # others ran meanwhile

    async def _begin_deactivating(self, todo: deque[Activation], idle_only: bool = False) -> int:
        """``begin_deactivation`` for each of ``todo`` (only those still idle then, if
        ``idle_only``), a batch at a time, letting other tasks run between batches; the
        number begun. Taken out of ``todo`` one by one, each is freed as it goes."""
        batch = self.config.deactivation_batch
        looked = begun = 0
        while todo:
            if looked and looked % batch == 0:
                await anyio.lowlevel.checkpoint()
            act = todo.popleft()
            looked += 1
            if idle_only and not (
                act.state is State.VALID and act.chain is None and not act.mailbox
            ):
                continue
            act.begin_deactivation()
            begun += 1
        return begun

    def _retire(self, act: Activation) -> None:
        """Have a deactivation task run the last turn of ``act``, which is free and has
        no task of its own; at most ``deactivation_tasks`` of them run at once."""
        self._retiring.append(act)
        if self._retirers < self.config.deactivation_tasks:
            self._retirers += 1
            self._tg.start_soon(self._retirer)

    async def _retirer(self) -> None:
        try:
            while self._retiring:
                act = self._retiring.popleft()
                try:
                    await act._deactivate()
                finally:
                    act.pump = PUMP_NONE
                await anyio.lowlevel.checkpoint()  # on_deactivate may never suspend
        finally:
            self._retirers -= 1

    async def _pause(self, long: bool = False) -> None:
        """Let other tasks run if none did through here for TIME_SLICE seconds (or
        LONG_SLICE, when ``long``): for loops that may never suspend otherwise."""
        now = self.clock()
        if now - self._last_pause >= (LONG_SLICE if long else TIME_SLICE):
            self._last_pause = now
            await anyio.lowlevel.checkpoint()
            self._last_pause = self.clock()

    def statistics(self) -> RuntimeStatistics:
        return RuntimeStatistics(
            activations=len(self._catalog),
            queued=self._queued,
            inflight=self._inflight,
            draining=self._draining,
        )

    @property
    def draining(self) -> bool:
        return self._draining

    def activation_of(self, impl: type[ActorBase], key: Key) -> Activation | None:
        """The live activation of (impl, key) on this host, if any (for tests and tools)."""
        return self._catalog.get((impl.actor_type, key))

    def is_active(self, actor_type: str, key: Key) -> bool:
        """Whether this host holds an activation of (actor_type, key) right now."""
        return (actor_type, key) in self._catalog

    # ------------------------------------------------------------ resolving

    def impl_for(self, interface: type[ActorInterface]) -> type[ActorBase]:
        """The implementation (hence the actor type) that calls through ``interface`` reach.

        The implementations this host serves come first; a host may also call actors it
        does not serve (they live elsewhere), as long as their class is importable here.
        """
        try:
            return self._impls[interface]
        except KeyError:
            pass
        served = [a for a in self._actors or () if issubclass(a, interface)]
        candidates = served or implementations_of(interface)
        # the same class defined again (a reloaded module) replaces the old one
        candidates = list({(c.__module__, c.__qualname__): c for c in candidates}.values())
        if not candidates:
            raise ActorNotFoundError(
                f"no implementation of {interface.__name__} is known to this host: define a "
                f"class that subclasses {interface.__name__} and ActorBase, and import it"
            )
        if len(candidates) > 1:
            names = ", ".join(sorted(c.__qualname__ for c in candidates))
            raise ActorNotFoundError(
                f"{interface.__name__} has several implementations ({names}); pass the one "
                "this host serves in actors=[...]"
            )
        self._impls[interface] = candidates[0]
        return candidates[0]

    def serves(self, impl: type[ActorBase]) -> bool:
        """Whether this host may activate ``impl`` (every implementation, by default)."""
        return self._actors is None or impl in self._actors

    # ------------------------------------------------------------ the call path

    async def invoke(
        self, spec: MethodSpec, interface: type[ActorInterface], key: Key, args: tuple[Any, ...]
    ) -> Any:
        """Call ``spec`` on actor (interface, key) with positional ``args``; await the result."""
        impl = self._impls.get(interface) or self.impl_for(interface)
        chain = current_chain.get()
        if chain is None:
            if self._draining:
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
        if host == LOCAL:
            args = spec.copy_args(args)
            if not spec.one_way:
                calls = self._inline_calls = self._inline_calls + 1
                if calls >= INLINE_CHECK:  # a loop of these may never suspend
                    self._inline_calls = 0
                    await self._pause(long=inline_depth.get() > 0)
                ident = (impl.actor_type, key)
                act = self._catalog.get(ident)
                if act is None and not self._stopping and self.serves(impl):
                    act = self._catalog[ident] = Activation(self, impl, key)
                if act is not None and act.can_run_inline(chain):
                    return await act.run_inline(spec, chain, args)
        deadline, own_deadline = self._deadline()
        req = Request(
            new_request_id(),
            new_chain_id() if spec.one_way else chain,
            deadline,
            impl.actor_type,
            key,
            spec.interface.__name__,
            spec.name,
            args,
            spec.one_way,
        )
        if host != LOCAL:
            return await self._invoke_remote(host, req, spec, own_deadline)
        call = Call(self, req, spec)
        self._deliver_local(call, impl)
        if own_deadline:
            with anyio.CancelScope(deadline=deadline):
                return await self._await_call(call, spec)
            raise DeadlineExceededError(
                f"{spec.qualname} on {impl.actor_type}/{key!r} got no answer within "
                f"the default timeout of {self.config.default_timeout} s",
                self.config.default_timeout,
                impl.actor_type,
                key,
                spec.name,
            )
        return await self._await_call(call, spec)

    def _deadline(self) -> tuple[float, bool]:
        """The current call's deadline, and whether the call enforces it itself (no cancel
        scope of its caller's does: the default timeout, or an inline turn's lazy one)."""
        deadline = self.effective_deadline()
        if deadline != math.inf:
            return deadline, False
        deadline = lazy_deadline.get()  # an inline turn's default one, not yet scoped
        if deadline == math.inf:
            deadline = self.clock() + self.config.default_timeout
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

    async def _await_call(self, call: Call, spec: MethodSpec) -> Any:
        """Wait for a delivered call's answer; a caller that gives up cancels it."""
        if spec.one_way:
            return None
        assert call.done is not None
        try:
            await call.done.wait()
        except BaseException:
            if not call.answered:
                call.cancel()
            raise
        if call.error is not None:
            raise rebuild_error(call.error)
        return call.result

    async def _invoke_remote(
        self, host: str, req: Request, spec: MethodSpec, own_deadline: bool
    ) -> Any:
        if self.remote is None:
            raise HostUnavailableError(
                f"{req.actor_type}/{req.key!r} lives on host {host!r}, and this runtime has "
                "no transport to reach it"
            )
        req.args = tuple(spec.encode_args(req.args))
        # without a scope of the caller's, the transport enforces the deadline: a scope
        # per call would cost more than the call's own work (see Channel._expire_calls)
        req.expires = own_deadline
        chains, chain = self._chains, req.chain_id
        chains[chain] = chains.get(chain, 0) + 1
        try:
            return await self.remote.call(host, req, spec)
        except WrongHostError:
            return await self._send_elsewhere(req, spec)
        finally:
            self._chain_done(chain)

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
                req.args = spec.decode_args(req.args)
                call = Call(self, req, spec)
                self._deliver_local(call, self.impl_for(spec.interface))
                if req.expires:
                    with anyio.fail_at(req.deadline):
                        return await self._await_call(call, spec)
                return await self._await_call(call, spec)
            if attempt == WRONG_HOST_RETRIES - 1:
                break
            try:
                return await self.remote.call(host, req, spec)
            except WrongHostError:
                continue
        return await self.remote.call(host, req, spec)

    async def serve_request(self, req: Request) -> Response | None:
        """Run a request that came over the wire; its args and the answer are CBOR data.

        The transport calls this from a serving task, bounded by the request's deadline
        (``req.deadline``, on this process's clock: a cancel scope, entered at once or at
        the turn's first suspension, see koala._drive), which the peer's CANCEL also
        cancels. A free activation runs the turn right here (as local calls do);
        otherwise the request queues. Returns None for one-way requests.
        """
        chains, chain = self._chains, req.chain_id
        if self._draining and chain not in chains:
            # only chains live here go on: a turn of it waits on a call out of this host
            # (which may call back), or another request of it is served here
            exc = ShuttingDownError("this host is shutting down; retry on another host")
            return None if req.one_way else Response(req.request_id, None, error_info(exc))
        token = serving(self)
        chains[chain] = chains.get(chain, 0) + 1
        try:
            return await self._serve(req)
        finally:
            self._chain_done(chain)
            done_serving(token)

    async def _serve(self, req: Request) -> Response | None:
        try:
            impl, spec = self._target_of(req)
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
            req.args = spec.decode_args(req.args)
            if not req.one_way:
                ident = (req.actor_type, req.key)
                act = self._catalog.get(ident)
                if act is None and not self._stopping and self.serves(impl):
                    act = self._catalog[ident] = Activation(self, impl, req.key)
                if act is not None and act.can_run_inline(req.chain_id):
                    result = await act.run_inline(spec, req.chain_id, req.args)
                    return Response(req.request_id, spec.result.to_wire(result))
            call = Call(self, req, spec)
            self._deliver_local(call, impl)
        except Exception as exc:
            return None if req.one_way else Response(req.request_id, None, error_info(exc))
        if req.one_way:
            return None
        assert call.done is not None
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

    def _target_of(self, req: Request) -> tuple[type[ActorBase], MethodSpec]:
        """Implementation and method named by a wire request (only interface methods
        are callable). Cached per (interface, actor type, method)."""
        target = (req.interface, req.actor_type, req.method)
        found = self._targets.get(target)
        if found is not None:
            return found
        for iface in self._served_interfaces():
            if iface.__name__ == req.interface:
                impl = self.impl_for(iface)
                spec = iface.__koala_methods__.get(req.method)
                if impl.actor_type != req.actor_type or spec is None:
                    continue
                if len(self._targets) < 10_000:
                    self._targets[target] = (impl, spec)
                return impl, spec
        raise ActorNotFoundError(
            f"this host serves no {req.interface}.{req.method} for actor type {req.actor_type}"
        )

    def _served_interfaces(self) -> list[type[ActorInterface]]:
        if self._actors is not None:
            return [iface for impl in self._actors for iface in interfaces_of(impl)]
        return implemented_interfaces()

    def _deliver_local(self, call: Call, impl: type[ActorBase]) -> None:
        req = call.req
        ident = (req.actor_type, req.key)
        act = self._catalog.get(ident)
        if act is None or act.state is State.INVALID:
            if self._stopping:
                raise ShuttingDownError("this host is shutting down; retry on another host")
            if not self.serves(impl):
                raise ActorNotFoundError(
                    f"this host does not serve {impl.actor_type} (not in its actors=[...])"
                )
            act = self._catalog[ident] = Activation(self, impl, req.key)
        act.accept(call)

    # ------------------------------------------------------------ collection

    def _forget(self, act: Activation) -> None:
        if self._catalog.get(act.ident) is act:
            del self._catalog[act.ident]
            self._released += 1
            if not self._local_only:
                self.directory.released(*act.ident)
        bucket = self._buckets.get(act.bucket)
        if bucket is not None:
            bucket.discard(act)
        if self._stopping and not self._catalog:
            self._emptied.set()

    def _schedule_collection(self, act: Activation) -> None:
        quantum = self.config.collection_interval
        expiry = max(act.last_used + act.idle_timeout, act.keep_until)
        index = math.ceil(expiry / quantum)
        old = self._buckets.get(act.bucket)
        if old is not None:
            old.discard(act)
        act.bucket = index
        self._buckets.setdefault(index, set()).add(act)

    async def _collector(self) -> None:
        """Deactivate idle activations; let idle pumps go. Work is O(what expired), done
        a batch at a time, letting other tasks run between batches."""
        while True:
            await anyio.sleep(self.config.collection_interval)
            self.now = anyio.current_time()
            await self._sweep(self.now)
            self._compact_if_due()

    async def _sweep(self, now: float) -> None:
        """One look at what expired by ``now``. (A function of its own: what it held goes
        when it returns, not at the next sweep.)"""
        quantum = self.config.collection_interval
        batch = self.config.deactivation_batch
        lingering = [a for a in self._waiting if now - a.last_used >= quantum]
        for i, act in enumerate(lingering):
            if i and i % batch == 0:
                await anyio.lowlevel.checkpoint()
            if act in self._waiting:
                act.linger_exit = True
                act._wake()
        seen = 0
        for index in sorted(i for i in self._buckets if i * quantum <= now):
            # popped, the set is ours: an activation filed meanwhile goes to a later one.
            # Taken out one by one, so each activation is freed as it goes, not all at
            # once with the set (which, emptied, keeps its table until it goes too)
            bucket = self._buckets.pop(index)
            while bucket:
                act = bucket.pop()
                seen += 1
                if seen % batch == 0:
                    await anyio.lowlevel.checkpoint()
                if act.state is not State.VALID:
                    continue
                expiry = max(act.last_used + act.idle_timeout, act.keep_until)
                busy = act.chain is not None or bool(act.mailbox)
                if expiry > now or busy:
                    if busy:
                        act.last_used = now
                    self._schedule_collection(act)
                else:
                    act.begin_deactivation()

    def _compact_if_due(self) -> None:
        """After many activations left, give their memory back: a dict's table never
        shrinks as keys go, and freed memory stays in the C heap unless trimmed."""
        left = len(self._catalog)
        if self._released < COMPACT_AFTER or left * 4 > self._released or left > COMPACT_MAX:
            return
        self._released = 0
        self._catalog = dict(self._catalog)
        self._waiting = set(self._waiting)
        self._buckets = dict(self._buckets)
        _trim_c_heap()


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


# looked up at import: objects made late, during a large collection, would stay for good
# in memory pages that would otherwise be given back
_malloc_trim = _find_malloc_trim()


def _trim_c_heap() -> None:
    """glibc keeps freed memory in its heap; ``malloc_trim`` returns the free pages."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class _NotStarted:
    def start_soon(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeNotRunningError("the runtime is not started: use `async with Runtime()`")
