"""A host's membership in the cluster: registration, lease renewal, the view, fencing.

:class:`MembershipAgent` (after Orleans' part of that name) registers the host with the
PD (a fresh node id, a lease with a TTL), renews the lease every TTL/3 reporting the
host's load, and keeps the membership view the renewals answer.

Self-fencing: a host whose lease it could not renew for ``TTL - fence_margin`` seconds
stops serving on its own: it forgets every position, deactivates its activations and
refuses requests, before the lease can expire in the store (the store counts the TTL
from when it received the last renewal, which is after the host sent it). Only then
can the PD place the host's actors elsewhere. The host then registers again, as a
new node with a new id.

The directory (:class:`~koala.pd._directory.ClusterDirectory`) is a membership agent
that also knows where actors live: it fills in :meth:`MembershipAgent._renewed` and
:meth:`MembershipAgent._drop_positions`.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from .._errors import ConfigError, LeaseExpiredError, PDRequestError, PDUnavailableError
from .._messages import Key
from ._http import PDClient
from ._rebalance import RebalanceConfig
from ._records import MAX_REPORTED_TYPES, HostStats, Member, Membership
from ._ticket import PLACEMENT_KEY_SIZE

log = logging.getLogger("koala.pd.client")

MAX_DEPARTED = 10_000  # ids of hosts seen leaving, remembered to drop their positions
# A host wants one more lease for its positions per POSITIONS_PER_LEASE it holds (so
# that etcd deletes at most about that many keys in one step when it dies).
POSITIONS_PER_LEASE = 4096


class HostLoad(Protocol):
    """What a host's runtime reports: its activations and the calls it serves."""

    @property
    def activations(self) -> int: ...

    @property
    def inflight(self) -> int: ...


class HostRuntime(Protocol):
    """What the PD's client needs of the host's runtime (a :class:`~koala.Runtime`)."""

    def statistics(self) -> HostLoad: ...

    def is_active(self, actor_type: str, key: Key) -> bool: ...

    async def evict_all(self, grace: float) -> int: ...

    async def shed(self, count: int) -> int: ...


@dataclass(frozen=True, slots=True)
class MemberConfig:
    """Settings of a host's membership and position cache. Validated on construction.

    - ``ttl``: the lease, in whole seconds; renewed every ``ttl / 3``.
    - ``fence_margin``: a host that has not renewed for ``ttl - fence_margin`` seconds
      fences itself (default ``ttl / 4``); deactivation must fit in the margin.
    - ``cache_size`` / ``cache_ttl``: positions of actors remembered, and for how long.
    - ``rejoin_wait``: how long a call on a fenced host waits for it to rejoin.
    - ``positions_per_lease``: the host asks for one more lease for its positions per
      this many it holds, so that etcd deletes at most about that many keys in one
      step when the host dies (0: every position on the registration's lease).
    - ``rebalance``: when the host gives activations up so that hosts even out
      (koala.pd._rebalance; ``RebalanceConfig(threshold=0)`` turns it off).
    - ``reconcile_interval``: how often the host lists the positions the store holds
      for it and gives back those it never took (0: never); ``reconcile_grace``: how
      old such a position must be (its first call may still be on its way).
    """

    ttl: int = 15
    fence_margin: float = 0.0
    cache_size: int = 100_000
    cache_ttl: float = 60.0
    rejoin_wait: float = 5.0
    desc: str = ""
    positions_per_lease: int = POSITIONS_PER_LEASE
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)
    reconcile_interval: float = 300.0
    reconcile_grace: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.ttl, bool) or not isinstance(self.ttl, int) or self.ttl < 1:
            raise ConfigError(
                f"MemberConfig.ttl must be a whole number of seconds >= 1, got {self.ttl!r}"
            )
        if not self.fence_margin:
            object.__setattr__(self, "fence_margin", self.ttl / 4)
        if not 0 < self.fence_margin < self.ttl * 2 / 3:
            raise ConfigError(
                "MemberConfig.fence_margin must be positive and below 2/3 of the TTL (a host "
                f"renews every TTL/3), got {self.fence_margin!r}"
            )
        if isinstance(self.cache_size, bool) or not isinstance(self.cache_size, int):
            raise ConfigError("MemberConfig.cache_size must be an integer")
        per_lease = self.positions_per_lease
        if isinstance(per_lease, bool) or not isinstance(per_lease, int) or per_lease < 0:
            raise ConfigError(
                f"MemberConfig.positions_per_lease must be an integer >= 0, got {per_lease!r}"
            )
        interval = self.reconcile_interval
        if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval >= 0):
            raise ConfigError(
                f"MemberConfig.reconcile_interval must be a number >= 0, got {interval!r}"
            )
        for name in ("cache_size", "cache_ttl", "rejoin_wait", "reconcile_grace"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"MemberConfig.{name} must be a positive number, got {value!r}")


class MembershipAgent:
    """A host's registration with the PD, kept alive until the host leaves.

    ``address`` is where this host's transport listens; ``services`` maps each actor
    type it serves to its implementation's name. ``attach(runtime)`` names the runtime
    whose load is reported and whose activations a fence evicts; ``stats`` (or
    ``attach(runtime, stats=...)``), called at each renewal, gives what the renewal
    reports for the cluster page (koala.dashboard; None: nothing).
    """

    def __init__(
        self,
        pd: PDClient,
        address: str,
        services: dict[str, str],
        config: MemberConfig | None = None,
        *,
        labels: dict[str, str] | None = None,
        stats: Callable[[], HostStats] | None = None,
    ) -> None:
        self.pd = pd
        self.stats = stats
        self.address = address
        self.services = dict(services)
        self.config = config or MemberConfig()
        self.labels = dict(labels or {})
        self.runtime: HostRuntime | None = None
        self.server_id = 0
        self.lease_id = 0
        self.serving = False
        self.members: dict[int, Member] = {}
        self._version: int | None = None  # of the membership the PD last answered
        self._placement_key = b""  # this registration's (koala.pd._ticket)
        self._position_leases: list[int] = []  # this registration's (grow_leases)
        self._cluster_load = (0.0, 0)  # mean and least activations per host, last renewal
        self._departed: OrderedDict[int, None] = OrderedDict()
        self._rejoined = anyio.Event()
        self._registrations = 0
        self._fences = 0
        self._renewals = 0
        self._failed_renewals = 0
        self._lease_ok_at = -math.inf  # when the lease was last known alive (sent then)

    def attach(self, runtime: HostRuntime, *, stats: Callable[[], HostStats] | None = None) -> None:
        """The runtime whose load is reported and whose activations a fence evicts;
        ``stats``: what each renewal reports for the cluster page (None: unchanged)."""
        self.runtime = runtime
        if stats is not None:
            self.stats = stats

    def _stats(self) -> HostStats | None:
        """This renewal's report for the cluster page, within the PD's bounds (the most
        activated types when there are more); None if there is none or it failed: the
        page is never a reason for a renewal to fail."""
        if self.stats is None:
            return None
        try:
            stats = self.stats()
        except Exception as exc:
            log.debug("server %d: no stats for this renewal: %s", self.server_id, exc)
            return None
        by_type = stats.activations_by_type
        if len(by_type) > MAX_REPORTED_TYPES:
            top = sorted(by_type.items(), key=lambda kv: -kv[1])[:MAX_REPORTED_TYPES]
            stats = HostStats(stats.calls, stats.call_seconds, dict(top))
        return stats

    def readiness(self) -> str:
        """Whether this host should get traffic (``/readyz``): "" when it is registered
        and its lease renews; else why not: "registering" (not yet), "fenced" (it
        fenced itself and registers again), or "lease_not_renewing" (no renewal for
        half the TTL: it fences itself at ``ttl - fence_margin`` unless one succeeds).
        Reads state only; call it from the host's event loop."""
        if not self.serving:
            return "fenced" if self._fences else "registering"
        if anyio.current_time() - self._lease_ok_at > self.config.ttl / 2:
            return "lease_not_renewing"
        return ""

    def _renewed(self) -> None:
        """A renewal succeeded and the view is updated (for subclasses)."""

    def _drop_positions(self) -> None:
        """The registration ended (fenced, or left): forget where actors live."""

    def _load(self) -> tuple[int, int]:
        if self.runtime is None:
            return 0, 0
        stats = self.runtime.statistics()
        return stats.activations + stats.inflight, stats.activations

    def _update_view(self, view: Membership) -> None:
        """Apply a renewal's answer: the whole table replaces the view, a delta adds the
        hosts it names and drops the ones it removes."""
        if view.full:
            gone = [server_id for server_id in self.members if server_id not in view.hosts]
            self.members = dict(view.hosts)
        else:
            gone = list(view.removed)
            for server_id in gone:
                self.members.pop(server_id, None)
            self.members.update(view.hosts)
        for server_id in gone:
            self._departed[server_id] = None
        for event in view.events:
            for server_id in event.get("remove") or []:
                self._departed[int(server_id)] = None
        while len(self._departed) > MAX_DEPARTED:
            self._departed.popitem(last=False)
        self._version = view.version

    async def _register(self) -> float:
        """Register as a new node, retrying until the PD answers; when the lease began."""
        delay = 0.1
        while True:
            try:
                server_id = await self.pd.new_server_id()
                load, _ = self._load()
                key = secrets.token_bytes(PLACEMENT_KEY_SIZE)
                sent = anyio.current_time()
                lease = await self.pd.register(
                    server_id,
                    self.address,
                    self.services,
                    ttl=self.config.ttl,
                    load=load,
                    desc=self.config.desc,
                    labels=self.labels,
                    placement_key=key,
                )
            except (PDUnavailableError, PDRequestError) as exc:
                log.warning("cannot register with the PD (%s); retrying in %.1f s", exc, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self.server_id, self.lease_id = server_id, lease
            self._placement_key = key
            self._position_leases = []
            self._registrations += 1
            log.info(
                "registered as server %d (lease %d, TTL %d s)", server_id, lease, self.config.ttl
            )
            return sent

    async def _membership(self, task_status: TaskStatus[None]) -> None:
        started = False
        while True:
            last_ok = await self._register()
            self._lease_ok_at = last_ok
            self.serving = True
            self._rejoined.set()
            if not started:
                started = True
                task_status.started()
            await self._renew_until_lost(last_ok)
            await self._fence()

    async def _renew_until_lost(self, last_ok: float) -> None:
        cfg = self.config
        interval = cfg.ttl / 3
        fence_after = cfg.ttl - cfg.fence_margin
        next_renewal = last_ok + interval
        while True:
            now = anyio.current_time()
            fence_at = last_ok + fence_after
            await anyio.sleep(max(0.0, min(next_renewal, fence_at) - now))
            now = anyio.current_time()
            if now >= fence_at:
                log.error(
                    "server %d could not renew its lease for %.1f s: fencing itself",
                    self.server_id,
                    now - last_ok,
                )
                return
            load, activations = self._load()
            sent = now
            with anyio.move_on_after(fence_at - now):
                try:
                    view = await self.pd.keep_alive(
                        self.server_id,
                        self.lease_id,
                        load,
                        activations,
                        version=self._version,
                        stats=self._stats(),
                    )
                except LeaseExpiredError as exc:
                    log.error("server %d: %s; fencing itself", self.server_id, exc.message)
                    return
                except (PDUnavailableError, PDRequestError) as exc:
                    self._failed_renewals += 1
                    log.warning("server %d: lease renewal failed: %s", self.server_id, exc)
                    next_renewal = anyio.current_time() + max(0.05, interval / 4)
                    continue
                self._renewals += 1
                last_ok = self._lease_ok_at = sent
                next_renewal = sent + interval
                self._update_view(view)
                self._cluster_load = (view.mean_activations, view.min_activations)
                self._renewed()

    async def _fence(self) -> None:
        """Stop serving: no position is LOCAL any more, and no activation stays live."""
        self.serving = False
        self._rejoined = anyio.Event()
        self._drop_positions()  # they die with the lease; evict_all's ends are no-ops
        self._fences += 1
        if self.server_id:
            self._departed[self.server_id] = None
        if self.runtime is not None:
            left = await self.runtime.evict_all(grace=self.config.fence_margin * 0.8)
            if left:
                log.error("%d activations were still running when the fence closed", left)

    async def leave(self) -> None:
        """Deregister (after the runtime drained): the PD may place our actors at once."""
        self.serving = False
        self._drop_positions()  # revoking the lease deletes what was not released yet
        if self.server_id:
            try:
                await self.pd.delete(self.server_id)
            except (PDUnavailableError, PDRequestError) as exc:
                log.warning("could not deregister from the PD (%s); the lease will expire", exc)
