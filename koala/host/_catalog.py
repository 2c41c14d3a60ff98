"""The catalog: the activations of one host, and everything counted about them.

The :class:`Catalog` is the one owner of the host's invariants. It keeps the table of
activations (get-or-create is written here once), the calls in flight and queued (the
"drained" signal is set when in-flight work reaches zero while the host drains), the
pumps waiting for work, the collection buckets and their sweep, the deactivation tasks,
and the host's :class:`~koala.host._states.HostState`. Activations and calls tell it what
happened through its methods; nothing else writes those counts.

It also holds what every turn of the host reads: the config, the coarse clock of idle
bookkeeping (``now``), the loop's fast clock and deadline hooks (see koala._drive), and
the per-method table of turns proven synchronous.
"""

from __future__ import annotations

import ctypes
import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from .. import _metrics
from .._actor import ActorBase
from .._config import HostConfig
from .._errors import ActorNotFoundError, OverloadedError, RuntimeNotRunningError, ShuttingDownError
from .._messages import Key
from ._activation import Activation
from ._call import Work
from ._states import HostState, State

if TYPE_CHECKING:
    from ._runtime import Runtime

# Memory is given back (the table rebuilt, the C heap trimmed) once at least
# COMPACT_AFTER activations left since the last time, four times as many as remain, and
# no more than COMPACT_MAX remain: the rebuild copies them in one step (a few ms).
COMPACT_AFTER = 10_000
COMPACT_MAX = 50_000

_RUNNING = HostState.RUNNING
_INVALID = State.INVALID


class Lifecycle:
    """Activations by actor type: live now, and how many started, failed and ended
    (plain counters: koala._metrics reads them at a scrape, the PD's page at a renewal)."""

    __slots__ = ("activate_seconds", "deactivate_seconds", "failed", "finished", "live")

    def __init__(self) -> None:
        self.live: dict[str, int] = {}
        self.finished: dict[str, int] = {}  # left the catalog (deactivated, or failed)
        self.failed: dict[str, int] = {}  # on_activate raised or ran out of time
        self.activate_seconds = _metrics.Histograms(
            "koala_activation_seconds",
            "Time of on_activate (instance creation included)",
            ("actor_type",),
        )
        self.deactivate_seconds = _metrics.Histograms(
            "koala_deactivation_seconds", "Time of on_deactivate", ("actor_type",)
        )

    def ended(self, actor_type: str) -> None:
        live = self.live
        left = live[actor_type] - 1
        if left:
            live[actor_type] = left
        else:
            del live[actor_type]
        self.finished[actor_type] = self.finished.get(actor_type, 0) + 1

    def failure(self, actor_type: str) -> None:
        self.failed[actor_type] = self.failed.get(actor_type, 0) + 1


class Catalog:
    """The activations of one host: see the module's docstring."""

    def __init__(
        self,
        runtime: Runtime,
        config: HostConfig,
        released: Callable[[str, Key], None] | None,
        serves: Callable[[type[ActorBase]], bool],
    ) -> None:
        self.runtime = runtime
        self.config = config
        self._released_hook = released  # Directory.released (None: a one-host directory)
        self._serves = serves
        self.state = HostState.RUNNING
        self._table: dict[tuple[str, Key], Activation] = {}
        self._waiting: set[Activation] = set()  # pumps waiting for work
        self._buckets: dict[int, set[Activation]] = {}  # collection: expiry quantum -> due
        self._queued = 0
        self._inflight = 0
        self._drained = anyio.Event()
        self._emptied = anyio.Event()
        # idle activations waiting for a deactivation task, and how many tasks run
        self._retiring: deque[Activation] = deque()
        self._retirers = 0
        self._released = 0  # activations that left the table since the last compaction
        self.now = 0.0  # a coarse clock (advanced by the collector) for idle bookkeeping
        # names the task's innermost cancel scope (see koala._drive); None: unknown
        self.scope_marker: Callable[[], object] | None = None
        # anyio.current_time and current_effective_deadline, minus the backend lookup
        self.clock: Callable[[], float] = anyio.current_time
        self.effective_deadline: Callable[[], float] = anyio.current_effective_deadline
        # per method: inline turns in a row that finished without suspending (-1: one
        # did suspend); see Activation._run_with_default_deadline
        self.sync_methods: dict[tuple[type[ActorBase], str], int] = {}
        self._tg: TaskGroup = _NotStarted()  # type: ignore[assignment]
        self.lifecycle = Lifecycle()  # counts by actor type, for metrics and the PD

    def start(
        self,
        tg: TaskGroup,
        clock: Callable[[], float],
        effective_deadline: Callable[[], float],
        scope_marker: Callable[[], object] | None,
    ) -> None:
        """The host runs: tasks go to ``tg``; the collector starts."""
        self._tg = tg
        self.clock, self.effective_deadline = clock, effective_deadline
        self.scope_marker = scope_marker
        self.now = anyio.current_time()
        tg.start_soon(self._collector)

    def start_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self._tg.start_soon(fn, *args)

    # ------------------------------------------------------------ the table

    def __len__(self) -> int:
        return len(self._table)

    def __iter__(self) -> Iterator[Activation]:
        return iter(list(self._table.values()))

    def get(self, actor_type: str, key: Key) -> Activation | None:
        return self._table.get((actor_type, key))

    def get_or_create(self, impl: type[ActorBase], key: Key) -> Activation:
        """The live activation of (impl, key), made now if there is none: the one way
        to find an activation to deliver to. ShuttingDownError if none may start (the
        host stops, or is fenced), ActorNotFoundError if this host does not serve
        ``impl``."""
        ident = (impl.actor_type, key)
        act = self._table.get(ident)
        if act is not None and act.state is not _INVALID:
            return act
        if self.state is not _RUNNING and not self.state.creates:
            raise ShuttingDownError("this host is shutting down; retry on another host")
        if not self._serves(impl):
            raise ActorNotFoundError(
                f"this host does not serve {impl.actor_type} (not in its actors=[...])"
            )
        act = self._table[ident] = Activation(self, impl, ident)
        live = self.lifecycle.live
        live[ident[0]] = live.get(ident[0], 0) + 1
        return act

    def forget(self, act: Activation) -> None:
        """``act`` ended (or never started): it leaves the table and collection."""
        if self._table.get(act.ident) is act:
            del self._table[act.ident]
            self._released += 1
            self.lifecycle.ended(act.ident[0])
            if self._released_hook is not None:
                self._released_hook(*act.ident)
        bucket = self._buckets.get(act.bucket)
        if bucket is not None:
            bucket.discard(act)
        if not self._table and not self.state.creates:
            self._emptied.set()

    # ------------------------------------------------------------ accounting

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def inflight(self) -> int:
        return self._inflight

    def inline_started(self) -> None:
        """A turn runs in its caller's task (it ends with :meth:`call_ended`)."""
        self._inflight += 1

    def started(self, work: Work) -> None:
        """``work`` is in flight here (counted once, however often it is re-delivered;
        it ends with :meth:`call_ended`)."""
        if not work.counted:
            work.counted = True
            self._inflight += 1

    def call_ended(self) -> None:
        n = self._inflight = self._inflight - 1
        if n == 0 and self.state is not _RUNNING and self.state.draining:
            self._drained.set()

    def check_room(self) -> None:
        """OverloadedError if the host's queue bound (``max_queued``) is reached."""
        if self._queued >= self.config.max_queued:
            raise OverloadedError(
                f"this host has {self._queued} calls queued (max_queued); retry later"
            )

    def enqueued(self, work: Work) -> None:
        self._queued += 1
        self.started(work)

    def dequeued(self, count: int) -> None:
        self._queued -= count

    def pump_waits(self, act: Activation) -> None:
        self._waiting.add(act)

    def pump_resumes(self, act: Activation) -> None:
        self._waiting.discard(act)

    # ------------------------------------------------------------ draining and fencing

    def drain(self) -> None:
        """Refuse new call chains from now on (the host shuts down)."""
        if self.state is HostState.RUNNING:
            self.state = HostState.DRAINING
        elif self.state is HostState.EVICTING:
            self.state = HostState.STOPPING

    async def wait_drained(self, deadline: float) -> None:
        """Until no call is in flight here, or ``deadline``."""
        if self._inflight:
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                await self._drained.wait()

    async def stop(self, deadline: float) -> int:
        """Start no activation any more and deactivate every one; wait until they are
        gone or ``deadline``. The number left."""
        self.state = HostState.STOPPING
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            await self._begin_deactivating(deque(self._table.values()))
            if self._table:
                await self._emptied.wait()
        return len(self._table)

    async def evict_all(self, grace: float) -> int:
        """Deactivate every activation, starting no new one until they are gone (or
        ``grace`` passes); the number left. See :meth:`Runtime.evict_all`."""
        state = self.state
        if not state.creates:
            return len(self._table)
        self.state = HostState.STOPPING if state is HostState.DRAINING else HostState.EVICTING
        self._emptied = anyio.Event()
        deadline = anyio.current_time() + grace
        try:
            await self._begin_deactivating(deque(self._table.values()))
            if self._table:
                with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                    await self._emptied.wait()
            self._compact_if_due()
            return len(self._table)
        finally:
            if self.state is HostState.EVICTING:  # not shutting down meanwhile
                self.state = HostState.RUNNING
                self._emptied = anyio.Event()

    async def shed(self, count: int) -> int:
        """Begin deactivating up to ``count`` idle activations, least recently used
        first; the number started. See :meth:`Runtime.shed`."""
        if count <= 0 or not self.state.creates:
            return 0
        scan = self.config.deactivation_batch * 32  # looking costs less than deactivating
        by_use: dict[float, list[Activation]] = {}  # last_used is a coarse clock: few values
        for i, act in enumerate(list(self._table.values())):
            if i and i % scan == 0:
                await anyio.lowlevel.checkpoint()
            if act.is_idle():
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
            if idle_only and not act.is_idle():
                continue
            act.begin_deactivation()
            begun += 1
        return begun

    def retire(self, act: Activation) -> None:
        """Have a deactivation task run the last turn of ``act``, which is free and has
        no task of its own; at most ``deactivation_tasks`` of them run at once."""
        self._retiring.append(act)
        if self._retirers < self.config.deactivation_tasks:
            self._retirers += 1
            self._tg.start_soon(self._retirer)

    async def _retirer(self) -> None:
        try:
            while self._retiring:
                await self._retiring.popleft().retire()
                await anyio.lowlevel.checkpoint()  # on_deactivate may never suspend
        finally:
            self._retirers -= 1

    # ------------------------------------------------------------ collection

    def schedule_collection(self, act: Activation) -> None:
        """File ``act`` in the bucket of its expiry (its ``bucket`` slot is ours)."""
        index = math.ceil(act.expiry() / self.config.collection_interval)
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
                act.let_pump_go()
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
                busy = act.is_busy()
                if busy:
                    act.touch(now)
                if busy or act.expiry() > now:
                    self.schedule_collection(act)
                else:
                    act.begin_deactivation()

    def _compact_if_due(self) -> None:
        """After many activations left, give their memory back: a dict's table never
        shrinks as keys go, and freed memory stays in the C heap unless trimmed."""
        left = len(self._table)
        if self._released < COMPACT_AFTER or left * 4 > self._released or left > COMPACT_MAX:
            return
        self._released = 0
        self._table = dict(self._table)
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
