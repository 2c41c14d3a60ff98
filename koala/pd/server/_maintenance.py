"""A PD looking after its store: compaction, recovery from a full etcd, reaping.

etcd keeps every revision until it is compacted, and refuses writes once its file
reaches its quota (the NOSPACE alarm). :class:`StoreKeeper` compacts the history on a
schedule, and when the store is full compacts all of it, defragments and clears the
alarm once there is room. It also revokes, one at a time, the position leases of hosts
that left (:meth:`StoreKeeper.reap`), so etcd never deletes a big host's positions in
one step. Several PDs doing this at once is harmless.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus

from ..._errors import ConfigError
from ._errors import STORE_FULL_FIX
from ._store import NOSPACE, Store, StoreError, StoreFullError

log = logging.getLogger("koala.pd")

REAP_PAUSE = 0.01
MAX_REAPING = 65_536
FULL_LOG_EVERY = 30.0  # seconds between two error lines about a full store
ROOM = 0.9  # a full store is disarmed once its file is below this share of the quota


@dataclass(frozen=True, slots=True)
class MaintenanceConfig:
    """How a PD looks after its store. Validated on construction.

    - ``compact_interval``: seconds between two compactions (0: never compact).
    - ``history``: seconds of revisions a compaction keeps (older ones are dropped).
    - ``check_interval``: seconds between two checks of the store's alarms (a write
      refused for lack of space triggers a check at once).
    - ``quota_bytes``: etcd's ``--quota-backend-bytes`` if known (0: unknown). A full
      store is disarmed once its file is below 90 % of it; unknown, it is disarmed after
      every compaction and defragmentation, and etcd raises the alarm again at the
      first write that still does not fit.
    """

    compact_interval: float = 60.0
    history: float = 300.0
    check_interval: float = 10.0
    quota_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("compact_interval", "history", "check_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"MaintenanceConfig.{name} must be a number, got {value!r}")
            if not 0 <= value < float("inf"):
                raise ConfigError(f"MaintenanceConfig.{name} must be >= 0 seconds, got {value!r}")
        if self.check_interval <= 0:
            raise ConfigError("MaintenanceConfig.check_interval must be positive")
        quota = self.quota_bytes
        if isinstance(quota, bool) or not isinstance(quota, int) or quota < 0:
            raise ConfigError(f"MaintenanceConfig.quota_bytes must be >= 0, got {quota!r}")


@dataclass(frozen=True, slots=True)
class MaintenanceStatistics:
    compactions: int  # compactions this PD asked for
    compacted_revision: int  # the latest
    recoveries: int  # times it found the store full and set about freeing it
    disarms: int  # NOSPACE alarms it cleared
    full: bool  # the store was full at the last check


class StoreKeeper:
    """The maintenance of one PD's store, as ``config`` says (see the module docstring)."""

    def __init__(self, store: Store, config: MaintenanceConfig | None = None) -> None:
        self.store = store
        self.config = config or MaintenanceConfig()
        self._wake = anyio.Event()
        self._reaping: deque[int] = deque(maxlen=MAX_REAPING)  # leases of departed hosts
        self._reap_wanted = anyio.Event()
        self._maintaining = anyio.CancelScope()
        self._logged: dict[str, float] = {}  # topic -> when last logged (rate limit)
        self._full = False
        self._compactions = 0
        self._compacted = 0
        self._defragmented = 0  # the revision of the last defragmentation
        self._recoveries = 0
        self._recovering = False
        self._disarms = 0

    def reap(self, leases: Iterable[int]) -> None:
        """Revoke these leases of a host whose registration ended, one by one, soon."""
        self._reaping.extend(leases)
        self._reap_wanted.set()

    def store_full(self, exc: StoreFullError) -> None:
        """A write was refused for lack of space: say so loudly (at most every 30 s) and
        have :meth:`maintain` look at the store now."""
        if not self._full:
            self._full = True
            self._wake.set()
        self._loudly("full", "%s (%s)", STORE_FULL_FIX, exc)

    def _loudly(self, topic: str, message: str, *args: object) -> None:
        """An error line, at most one per ``topic`` every FULL_LOG_EVERY seconds."""
        now = anyio.current_time()
        if now - self._logged.get(topic, -1e18) >= FULL_LOG_EVERY:
            self._logged[topic] = now
            log.error(message, *args)

    def statistics(self) -> MaintenanceStatistics:
        return MaintenanceStatistics(
            compactions=self._compactions,
            compacted_revision=self._compacted,
            recoveries=self._recoveries,
            disarms=self._disarms,
            full=self._full,
        )

    async def maintain(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Look after the store until cancelled: compact its history every
        ``compact_interval`` (keeping ``history`` seconds of it), and when it is full
        (NOSPACE), free space and clear the alarm (:meth:`_recover`).

        Several PDs doing this at once is harmless: a compaction at or below an earlier
        one is a no-op, and the alarm is cleared only when there is room."""
        cfg = self.config
        period = cfg.check_interval
        if cfg.compact_interval:
            period = min(period, cfg.compact_interval)
        # (time, revision) seen at the checks: a compaction keeps `history` seconds of
        # them; at most ~1 000 are kept within the history, and one older
        marks: deque[tuple[float, int]] = deque()
        next_compaction = anyio.current_time() + cfg.compact_interval
        task_status.started()
        with self._maintaining:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._reap)
                await self._maintain(period, marks, next_compaction)

    async def _reap(self) -> None:
        """Revoke the position leases of hosts that left the view (their registration
        lease is gone, so they fenced themselves before), one at a time: etcd deletes
        each lease's keys in one step, and the other hosts' writes go on in between,
        instead of waiting for all of a big host's positions at once when its leases
        expire together."""
        while True:
            await self._reap_wanted.wait()
            self._reap_wanted = anyio.Event()
            while self._reaping:
                lease = self._reaping.popleft()
                try:
                    await self.store.revoke(lease)
                except StoreError as exc:
                    log.warning("could not revoke the departed host's lease %d: %s", lease, exc)
                await anyio.sleep(REAP_PAUSE)

    def stop(self) -> None:
        """End :meth:`maintain` (it returns; nothing else is cancelled)."""
        self._maintaining.cancel()

    async def _maintain(
        self, period: float, marks: deque[tuple[float, int]], next_compaction: float
    ) -> None:
        cfg = self.config
        while True:
            if self._full:  # being recovered: once a period, however many writes fail
                await anyio.sleep(period)
            else:
                with anyio.move_on_after(period):
                    await self._wake.wait()
            self._wake = anyio.Event()
            try:
                status = await self.store.status()
                now = anyio.current_time()
                if not marks or now - marks[-1][0] >= cfg.history / 1000:
                    marks.append((now, status.revision))
                while len(marks) > 1 and marks[1][0] <= now - cfg.history:
                    marks.popleft()  # the next one is old enough already
                if NOSPACE in status.alarms:
                    await self._recover(status.revision)
                    continue
                self._full = self._recovering = False
                if cfg.compact_interval and now >= next_compaction:
                    next_compaction = now + cfg.compact_interval
                    seen, revision = marks[0]
                    if seen <= now - cfg.history and revision > self._compacted:
                        await self.store.compact(revision)
                        self._compacted = revision
                        self._compactions += 1
                        log.debug("compacted the store's history up to revision %d", revision)
            except StoreError as exc:
                log.warning("store maintenance failed (%s); trying again in %g s", exc, period)

    async def _recover(self, revision: int) -> None:
        """The store is full: compact all its history (nothing is worth keeping then),
        defragment it so the file shrinks, and clear the alarm if there is room."""
        if not self._recovering:  # a new episode
            self._recoveries += 1
            self._recovering = True
        self._full = True
        self._loudly(
            "recover",
            "the store's NOSPACE alarm is raised (new placements and registrations fail): "
            "compacting and defragmenting it, and disarming the alarm when there is room",
        )
        if revision > self._compacted:
            await self.store.compact(revision)
            self._compacted = revision
            self._compactions += 1
        # defragmenting blocks the store meanwhile: only when something was deleted
        # since the last time (etcd counts freed pages only at its next write, which a
        # full etcd refuses, so its "in use" figure cannot tell)
        if revision != self._defragmented:
            await self.store.defragment()
            self._defragmented = revision
        after = await self.store.status()
        quota = self.config.quota_bytes
        if quota and after.db_size >= quota * ROOM:
            self._loudly(
                "still full",
                "the store is still full after compaction and defragmentation (%d of %d "
                "bytes): live data fills it; delete keys or raise etcd's "
                "--quota-backend-bytes (and koala pd --etcd-quota-bytes)",
                after.db_size,
                quota,
            )
            return
        await self.store.disarm()
        self._disarms += 1
        self._full = self._recovering = False
        log.warning(
            "the store's NOSPACE alarm is disarmed (database %d bytes, %d in use): writes resume",
            after.db_size,
            after.db_size_in_use,
        )
