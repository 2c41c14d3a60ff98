"""The placement driver's logic over a :class:`Store`: ids, membership, placement.

Everything that must be agreed on lives in the store; what a PD process keeps in
memory is a cache any PD can rebuild (the membership view and its versions, recent
membership events, the loads hosts reported in their renewals, unspent blocks of
sequence ids, placements it made since a host last reported its load). So any number
of PD processes may serve one etcd at once.

A host record is written once, at registration; a renewal is a lease keep-alive and
nothing else in the store (the load it reports stays in this PD's memory), so a
cluster at rest makes no writes and etcd's history grows only with placements and
membership changes. The PD compacts that history on a schedule, and recovers by
itself from etcd's NOSPACE alarm (:meth:`PlacementDriver.maintain`).

Layout under ``prefix`` (default ``/koala/``)::

    ids/server_id             counter of node ids (decimal text)
    ids/seq/{key}             counter of a named sequence
    hosts/{server_id}         a host's record (JSON), bound to the host's lease
    placement/{type}/{id}     an actor's position (JSON), bound to the host's lease

A position is created in one transaction that writes it only if absent, bound to the
chosen host's lease, and returns whichever position is stored (first writer wins). It
lives as long as the host's lease: when a host dies, its positions go with it.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus

from .._errors import ConfigError, KoalaError
from ._auth import owner_hash, owner_matches
from ._store import (
    NOSPACE,
    CreateOutcome,
    KeyValue,
    LeaseNotFoundError,
    Store,
    StoreError,
    StoreFullError,
)
from ._ticket import PLACEMENT_KEY_SIZE, make_ticket

log = logging.getLogger("koala.pd")

DEFAULT_PREFIX = "/koala/"
DEFAULT_HOST_TTL = 15
MAX_HOST_TTL = 3600
MAX_SEQUENCE_STEP = 1_000_000
MAX_SEQUENCES = 10_000  # named sequences whose unspent block a PD remembers
EVENT_LIFETIME = 60.0  # seconds a membership event is reported
MAX_EVENTS = 256
VIEW_MAX_AGE = 0.2  # seconds a membership view is reused before the store is read again
CAS_RETRIES = 64
# Leases a host's positions may be spread over, besides its main one (grow_leases), and
# how many of them one renewal renews at once.
MAX_POSITION_LEASES = 256
LEASE_RENEWALS = 8
# Position leases live POSITION_LEASE_TTL times the host's TTL, so that when a host's
# registration lease expires (it fenced itself by then), its position leases are still
# there for the PD to revoke one at a time (REAP_PAUSE apart), not expire all at once.
POSITION_LEASE_TTL = 3
REAP_PAUSE = 0.01
MAX_REAPING = 65_536
PLACEMENT_ATTEMPTS = 4
MAX_NAME = 256
MAX_BATCH = 1024  # actors in one find_positions request
# Placements of concurrent requests share store requests: CREATE_SLOTS run at once, and
# the creates that arrive meanwhile leave together (up to CREATE_BATCH keys) in the next.
CREATE_SLOTS = 2
CREATE_BATCH = 512
MAX_WAITING = 1024  # requests waiting for a slot; beyond, the PD answers 503 overloaded
MAX_VERSIONS = 1024  # membership changes remembered to answer deltas; older: the whole table
FULL_LOG_EVERY = 30.0  # seconds between two error lines about a full store
ROOM = 0.9  # a full store is disarmed once its file is below this share of the quota
_SEQUENCE_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class PDError(KoalaError):
    """A request the PD cannot serve; ``status`` is the HTTP status, ``code`` a short name."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def now_ms() -> int:
    return int(time.time() * 1000)


STORE_FULL_FIX = (
    "etcd is out of space (its NOSPACE alarm is raised: the database reached "
    "--quota-backend-bytes), so it refuses writes: no new actor can be placed and no host "
    "can register, while actors already placed keep answering and leases keep renewing. "
    "The PD compacts, defragments and disarms the alarm by itself once there is room; if "
    "live data fills the quota, delete keys or raise etcd's --quota-backend-bytes"
)


def _store_full() -> PDError:
    return PDError(507, "store_full", STORE_FULL_FIX)


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


@dataclass(frozen=True, slots=True)
class MembershipView:
    """The membership a keep-alive answers: the whole table (``full``), or the hosts
    added and the server ids removed since the version the caller sent."""

    version: int
    full: bool
    hosts: dict[int, HostInfo]
    removed: list[int]
    # activations per host over the whole view (for rebalancing): the mean and the least
    mean_activations: float = 0.0
    min_activations: int = 0


@dataclass(slots=True)
class HostInfo:
    """A host as registered (the original PD's fields, then Koala's additions)."""

    server_id: int
    load: int = 0
    start_time: int = 0  # when the PD registered it, ms since the epoch
    ttl: int = DEFAULT_HOST_TTL
    address: str = ""
    services: dict[str, str] = field(default_factory=dict)  # actor type -> implementation
    desc: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    lease_id: int = 0
    activations: int = 0
    renew_time: int = 0  # the last keep-alive, ms since the epoch
    # hex; keys the host's placement tickets (koala.pd._ticket). Never sent to anyone.
    placement_key: str = ""
    # further leases of the host that positions are bound to (spread over them with
    # lease_id), so its positions never all go in one step (grow_leases)
    position_leases: list[int] = field(default_factory=list)
    # hex SHA-256 of the host's owner key (koala.pd._auth): only who holds the key may
    # renew, change or delete this registration. Never sent to anyone.
    owner: str = ""

    def leases(self) -> list[int]:
        """Every lease of the host: the registration's first."""
        return [self.lease_id, *self.position_leases]

    def lease_for(self, key: str) -> int:
        """The lease a position of ``key`` on this host is bound to (a stable spread)."""
        if not self.position_leases:
            return self.lease_id
        leases = self.leases()
        return leases[zlib.crc32(key.encode()) % len(leases)]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostInfo:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True, slots=True)
class Position:
    actor_type: str
    actor_id: str
    server_id: int
    server_address: str
    create_time: int
    lease_id: int
    ttl: int = 0
    created: bool = False  # True when this request made the placement
    revision: int = 0  # the position's revision in the store: what a release names
    ticket: str = ""  # hex; the named host's proof of this answer ("" if not known)


class _Creates:
    """One caller's items for :meth:`Store.create_many`, waiting to be sent."""

    __slots__ = ("error", "items", "lead", "outcomes", "wake")

    def __init__(self, items: list[tuple[str, bytes, int]]) -> None:
        self.items = items
        self.outcomes: list[CreateOutcome] | None = None
        self.error: BaseException | None = None
        self.lead = False  # handed a slot: it sends the next batch itself
        self.wake = anyio.Event()

    @property
    def finished(self) -> bool:
        return self.outcomes is not None or self.error is not None


class CreateCombiner:
    """``store.create_many`` shared by concurrent callers, without a timer or a task.

    At most ``slots`` store requests run at once. A caller that finds them all busy
    queues its items and waits; when a request returns, its sender answers it and, if
    callers are waiting, sends their items together (at most ``batch`` keys, first come
    first served), until its own are answered; then it hands its slot to the next
    waiter. Alone, a caller sends at once. Items of different callers never share a
    key in one request (etcd refuses it, and each caller must learn whether *it*
    created its key): a caller whose keys collide waits for the next request.
    """

    def __init__(
        self,
        store: Store,
        *,
        slots: int = CREATE_SLOTS,
        batch: int = CREATE_BATCH,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self.store = store
        self.slots = slots
        self.batch = batch
        self.max_waiting = max_waiting
        self._queue: deque[_Creates] = deque()
        self._running = 0
        self.requests = 0  # store requests sent (statistics)

    async def create_many(self, items: list[tuple[str, bytes, int]]) -> list[CreateOutcome]:
        if len(self._queue) >= self.max_waiting:
            raise PDError(503, "overloaded", "too many placements are waiting; retry shortly")
        job = _Creates(items)
        self._queue.append(job)
        if self._running < self.slots:
            self._running += 1
            job.lead = True
        else:
            try:
                await job.wake.wait()  # answered, or handed a slot
            except BaseException:
                if not job.finished and job in self._queue:
                    self._queue.remove(job)
                if job.lead:
                    self._release()
                raise
        if job.lead:
            try:
                # send batches while ours waits in the queue (another sender may take it)
                while not job.finished and job in self._queue:
                    await self._send_next()
            finally:
                self._release()
            if not job.finished:  # another sender has it on its way: wait for that
                job.wake = anyio.Event()
                await job.wake.wait()
        if job.error is not None:
            raise job.error
        assert job.outcomes is not None
        return job.outcomes

    def _release(self) -> None:
        """Hand this slot to the first waiter that has none, or free it."""
        for waiting in self._queue:
            if not waiting.lead:
                waiting.lead = True
                waiting.wake.set()
                return
        self._running -= 1

    async def _send_next(self) -> None:
        jobs: list[_Creates] = []
        keys: set[str] = set()
        count = 0
        while self._queue:
            job = self._queue[0]
            if jobs and (
                count + len(job.items) > self.batch or any(k in keys for k, _, _ in job.items)
            ):
                break
            self._queue.popleft()
            jobs.append(job)
            keys.update(k for k, _, _ in job.items)
            count += len(job.items)
        merged = [item for job in jobs for item in job.items]
        self.requests += 1
        try:
            # shielded: the answer belongs to every caller in it, not only to this one;
            # the store's own timeout bounds it
            with anyio.CancelScope(shield=True):
                outcomes = await self.store.create_many(merged)
        except Exception as exc:  # each caller raises it (the store failed them all)
            for job in jobs:
                job.error = exc
                job.wake.set()
            return
        except BaseException as exc:
            for job in jobs:
                job.error = exc
                job.wake.set()
            raise
        start = 0
        for job in jobs:
            job.outcomes = outcomes[start : start + len(job.items)]
            start += len(job.items)
            job.wake.set()


@dataclass(frozen=True, slots=True)
class MembershipEvent:
    time: int  # ms since the epoch
    add: list[int]
    remove: list[int]


class PlacementDriver:
    """The PD over a store (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        prefix: str = DEFAULT_PREFIX,
        maintenance: MaintenanceConfig | None = None,
    ) -> None:
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise KoalaError(f"the PD key prefix must start and end with '/', got {prefix!r}")
        self.store = store
        self.prefix = prefix
        self.maintenance = maintenance or MaintenanceConfig()
        self._hosts: dict[int, HostInfo] = {}
        self._view_time = -1e18
        self._view_lock = anyio.Lock()
        self._advancing = anyio.Lock()  # id counters (_advance)
        self._has_view = False
        self._events: deque[tuple[float, MembershipEvent]] = deque(maxlen=MAX_EVENTS)
        self._blocks: OrderedDict[str, tuple[int, int]] = OrderedDict()  # key -> [next, end)
        self._placed: dict[int, tuple[int, int]] = {}  # server -> (renew_time seen, count)
        self._random = random.Random()
        self.creates = CreateCombiner(store)
        # load reports of renewals: server -> (load, activations, renew_time), this PD's own
        self._reports: dict[int, tuple[int, int, int]] = {}
        # membership versions: per PD (a random start, +1 per change this PD saw), so a
        # version from another PD (or before a restart) is unknown here: the whole table
        self._version = self._random.randrange(1 << 40, 1 << 52)
        self._changes: deque[tuple[int, frozenset[int]]] = deque(maxlen=MAX_VERSIONS)
        # store maintenance
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

    # ------------------------------------------------------------ keys

    def _host_key(self, server_id: int) -> str:
        return f"{self.prefix}hosts/{server_id}"

    def _position_key(self, actor_type: str, actor_id: str) -> str:
        return f"{self.prefix}placement/{actor_type}/{actor_id}"

    # ------------------------------------------------------------ ids

    async def _advance(self, key: str, step: int) -> int:
        """Add ``step`` to the counter at ``key`` atomically; the new value.

        One at a time in this PD: concurrent compare-and-swaps of one counter would
        fail each other (n callers cost n² store requests, and 503 contention), so
        only callers on other PDs can make one retry."""
        async with self._advancing:
            return await self._advance_now(key, step)

    async def _advance_now(self, key: str, step: int) -> int:
        for _ in range(CAS_RETRIES):
            kv = await self.store.get(key)
            current = int(kv.value) if kv is not None else 0
            revision = kv.mod_revision if kv is not None else 0
            new = current + step
            if await self.store.replace(key, str(new).encode(), mod_revision=revision):
                return new
        raise PDError(503, "contention", f"the counter {key} is too contended; retry")

    async def new_server_id(self) -> int:
        """A node id never handed out before (by any PD of this store)."""
        return await self._advance(f"{self.prefix}ids/server_id", 1)

    async def new_sequence(self, key: str, step: int) -> int:
        """The next id of sequence ``key``; the PD reserves ``step`` ids at a time.

        Ids are unique across PDs and restarts; they increase per PD, and a PD that
        stops leaves the rest of its block unused."""
        if not _SEQUENCE_KEY.match(key):
            raise PDError(
                400, "bad_request", "a sequence key is 1-128 characters of A-Z a-z 0-9 _ . : -"
            )
        if not 1 <= step <= MAX_SEQUENCE_STEP:
            raise PDError(400, "bad_request", f"step must be from 1 to {MAX_SEQUENCE_STEP}")
        block = self._blocks.get(key)
        if block is None or block[0] >= block[1]:
            end = await self._advance(f"{self.prefix}ids/seq/{key}", step)
            block = (end - step + 1, end + 1)
        self._blocks[key] = (block[0] + 1, block[1])
        self._blocks.move_to_end(key)
        while len(self._blocks) > MAX_SEQUENCES:
            self._blocks.popitem(last=False)
        return block[0]

    # ------------------------------------------------------------ membership

    async def register(self, info: HostInfo, *, owner: bytes | None = None) -> int:
        """Record a host under a new lease of ``info.ttl`` seconds; the lease id.

        ``owner``: the host's owner key (the API passes the one the request carries);
        the record keeps its hash, and later requests for this server id must carry
        the key (:meth:`_check_owner`). None: an in-process caller, bound to no key."""
        if info.server_id <= 0:
            raise PDError(400, "bad_request", "server_id must be a positive id from new_server_id")
        if not 1 <= info.ttl <= MAX_HOST_TTL:
            raise PDError(400, "bad_request", f"ttl must be from 1 to {MAX_HOST_TTL} seconds")
        if not info.address:
            raise PDError(400, "bad_request", "address (host:port of the host) is required")
        if info.placement_key and not _is_placement_key(info.placement_key):
            raise PDError(
                400,
                "bad_request",
                f"placement_key must be {2 * PLACEMENT_KEY_SIZE} hexadecimal digits",
            )
        if owner is not None:
            info.owner = owner_hash(owner)
        lease = await self.store.grant(info.ttl)
        info.start_time = info.renew_time = now_ms()
        info.lease_id = lease
        try:
            created, _ = await self.store.create(
                self._host_key(info.server_id), json.dumps(info.to_json()).encode(), lease=lease
            )
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await self.store.revoke(lease)
            raise
        if not created:
            await self.store.revoke(lease)
            kv = await self.store.get(self._host_key(info.server_id))
            if kv is not None and owner is not None:
                self._check_owner(_record(kv.value, info.server_id), owner)
            raise PDError(
                409,
                "already_registered",
                f"server_id {info.server_id} is already registered; ask new_server_id for a "
                "fresh id",
            )
        self._view_time = -1e18  # the next view reads the store
        log.info("host %d registered at %s (lease %d)", info.server_id, info.address, lease)
        return lease

    async def keep_alive(
        self,
        server_id: int,
        lease_id: int,
        load: int,
        activations: int | None = None,
        *,
        owner: bytes | None = None,
    ) -> None:
        """Renew a host's lease and record its load, in this PD's memory only.

        No write: the host must be registered under that lease in this PD's view of
        the store (read again if it is not, e.g. it registered through another PD),
        and ``owner`` must be its owner key; only then is the lease renewed."""
        if server_id <= 0 or lease_id == 0:
            raise PDError(400, "bad_request", "server_id and lease_id are required")
        info = await self._registered(server_id, lease_id)
        self._check_owner(info, owner)
        try:
            await self.store.keep_alive(lease_id)
        except LeaseNotFoundError:
            raise PDError(
                404,
                "lease_expired",
                f"the lease {lease_id} of server {server_id} expired: the host must stop "
                "serving and register again with a new server_id",
            ) from None
        if info.position_leases:
            await self._keep_alive_leases(server_id, info.position_leases)
        if activations is None:
            activations = info.activations
        self._reports[server_id] = (load, activations, now_ms())
        info.load, info.activations, info.renew_time = self._reports[server_id]
        self._placed.pop(server_id, None)

    async def _registered(self, server_id: int, lease_id: int) -> HostInfo:
        """The host ``server_id`` registered under ``lease_id`` in this PD's view (read
        again if it is not there); 404 if there is none. A registration whose lease
        expired has no record any more: that answers ``lease_expired``."""
        info = (await self.hosts()).get(server_id)
        if info is None or info.lease_id != lease_id:
            info = (await self.hosts(max_age=0.0)).get(server_id)
        if info is None:
            raise PDError(
                404,
                "lease_expired",
                f"server {server_id} has no registration (its lease {lease_id} expired, or it "
                "was deleted): the host must stop serving and register again with a new "
                "server_id",
            )
        if info.lease_id != lease_id:
            raise PDError(
                404,
                "not_registered",
                f"server {server_id} is not registered under lease {lease_id}; register again",
            )
        return info

    def _check_owner(self, info: HostInfo, owner: bytes | None) -> None:
        """403 unless ``owner`` is the key ``info`` was registered with (None: an
        in-process caller, trusted)."""
        if owner is None or owner_matches(info.owner, owner):
            return
        if not info.owner:
            message = (
                f"server {info.server_id} was registered without an owner key (by an older "
                "PD): nobody may change it through the API; it ends with its lease"
            )
        elif not owner:
            message = (
                f"server {info.server_id} is bound to its owner key: send it in the "
                "Koala-Owner header (64 hex digits), as at registration"
            )
        else:
            message = (
                f"the Koala-Owner key is not the one server {info.server_id} registered with: "
                "a host may renew, change or delete only its own registration"
            )
        raise PDError(403, "not_owner", message)

    async def _keep_alive_leases(self, server_id: int, leases: list[int]) -> None:
        """Renew a host's position leases, a few at a time; 404 if one is gone (its
        positions went with it: the host must fence as for its main lease)."""
        lost: list[int] = []
        limit = anyio.Semaphore(LEASE_RENEWALS)

        async def renew(lease: int) -> None:
            async with limit:
                try:
                    await self.store.keep_alive(lease)
                except LeaseNotFoundError:
                    lost.append(lease)

        async with anyio.create_task_group() as tg:
            for lease in leases:
                tg.start_soon(renew, lease)
        if lost:
            raise PDError(
                404,
                "lease_expired",
                f"the position lease {lost[0]} of server {server_id} expired: the host must "
                "stop serving and register again with a new server_id",
            )

    async def grow_leases(
        self, server_id: int, lease_id: int, count: int, *, owner: bytes | None = None
    ) -> list[int]:
        """Give host ``server_id`` (registered under ``lease_id``) ``count`` more leases
        for its positions (at most MAX_POSITION_LEASES in all); all of them, in order.

        A host asks as its positions grow, so that each lease holds a bounded number of
        keys: when the host dies, etcd deletes its positions lease by lease, and writes
        of the other hosts go on between them instead of waiting for one huge delete."""
        if not 1 <= count <= MAX_POSITION_LEASES:
            raise PDError(400, "bad_request", f"count must be from 1 to {MAX_POSITION_LEASES}")
        key = self._host_key(server_id)
        for _ in range(CAS_RETRIES):
            kv = await self.store.get(key)
            if kv is None or kv.lease != lease_id:
                raise PDError(
                    404,
                    "not_registered",
                    f"server {server_id} is not registered under lease {lease_id}; register again",
                )
            info = _record(kv.value, server_id)
            self._check_owner(info, owner)
            count = min(count, MAX_POSITION_LEASES - len(info.position_leases))
            if count <= 0:
                return info.position_leases
            ttl = info.ttl * POSITION_LEASE_TTL
            new = [await self.store.grant(ttl) for _ in range(count)]
            info.position_leases = [*info.position_leases, *new]
            try:
                ok = await self.store.replace(
                    key,
                    json.dumps(info.to_json()).encode(),
                    mod_revision=kv.mod_revision,
                    lease=lease_id,
                )
            except BaseException:
                await self._revoke_quietly(new)
                raise
            if ok:
                self._view_time = -1e18  # placements use them from the next view
                return info.position_leases
            await self._revoke_quietly(new)  # raced with another grow: read again
        raise PDError(503, "contention", f"the record of server {server_id} is too contended")

    async def _revoke_quietly(self, leases: list[int]) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            for lease in leases:
                await self.store.revoke(lease)

    async def delete(self, server_id: int, *, owner: bytes | None = None) -> bool:
        """Remove a host now: its leases are revoked, which drops its positions too, one
        lease at a time (other writes go on in between). ``owner``: as for keep_alive."""
        kv = await self.store.get(self._host_key(server_id))
        if kv is None:
            return False
        info = _record(kv.value, server_id)
        self._check_owner(info, owner)
        for lease in info.position_leases:
            await self.store.revoke(lease)
        if kv.lease:
            await self.store.revoke(kv.lease)
        else:
            await self.store.delete(kv.key)
        self._view_time = -1e18
        return True

    async def hosts(self, max_age: float = VIEW_MAX_AGE) -> dict[int, HostInfo]:
        """The registered hosts, read from the store at most ``max_age`` seconds ago."""
        if max_age > 0 and anyio.current_time() - self._view_time <= max_age:
            return self._hosts
        async with self._view_lock:
            if max_age > 0 and anyio.current_time() - self._view_time <= max_age:
                return self._hosts
            started = anyio.current_time()
            found: dict[int, HostInfo] = {}
            for kv in await self.store.get_prefix(f"{self.prefix}hosts/"):
                try:
                    info = HostInfo.from_json(json.loads(kv.value))
                except (ValueError, TypeError):
                    log.warning("ignoring a malformed host record at %s", kv.key)
                    continue
                info.lease_id = kv.lease
                report = self._reports.get(info.server_id)
                if report is not None:  # the record holds the load of its registration
                    info.load, info.activations, info.renew_time = report
                found[info.server_id] = info
            self._note_changes(found)
            self._hosts = found
            self._view_time = started
            self._has_view = True
        return found

    def _note_changes(self, new: dict[int, HostInfo]) -> None:
        add = sorted(set(new) - set(self._hosts))
        remove = sorted(set(self._hosts) - set(new))
        if self._has_view and (add or remove):
            self._events.append((anyio.current_time(), MembershipEvent(now_ms(), add, remove)))
            self._version += 1
            self._changes.append((self._version, frozenset(add) | frozenset(remove)))
        for server_id in remove:
            self._placed.pop(server_id, None)
            self._reports.pop(server_id, None)
            gone = self._hosts[server_id].position_leases
            if gone:  # its registration ended: revoke them one by one (reap)
                self._reaping.extend(gone)
                self._reap_wanted.set()

    def membership(self, since: int | None = None) -> MembershipView:
        """The current view (as last read by :meth:`hosts`) as a delta from version
        ``since``, or the whole table when ``since`` is None or unknown to this PD."""
        current = self._version
        oldest = self._changes[0][0] - 1 if self._changes else current
        counts = [h.activations for h in self._hosts.values()]
        mean = sum(counts) / len(counts) if counts else 0.0
        least = min(counts, default=0)
        if since is None or not oldest <= since <= current:
            return MembershipView(current, True, dict(self._hosts), [], mean, least)
        touched: set[int] = set()
        for version, ids in self._changes:
            if version > since:
                touched |= ids
        added = {s: self._hosts[s] for s in sorted(touched) if s in self._hosts}
        gone = sorted(touched - set(self._hosts))
        return MembershipView(current, False, added, gone, mean, least)

    def recent_events(self) -> list[MembershipEvent]:
        """Hosts added and removed in the last minute, as this PD saw them."""
        horizon = anyio.current_time() - EVENT_LIFETIME
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()
        return [event for _, event in self._events]

    # ------------------------------------------------------------ store maintenance

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

    def maintenance_statistics(self) -> MaintenanceStatistics:
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
        cfg = self.maintenance
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

    def stop_maintenance(self) -> None:
        """End :meth:`maintain` (it returns; nothing else is cancelled)."""
        self._maintaining.cancel()

    async def _maintain(
        self, period: float, marks: deque[tuple[float, int]], next_compaction: float
    ) -> None:
        cfg = self.maintenance
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
        quota = self.maintenance.quota_bytes
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

    # ------------------------------------------------------------ placement

    def _effective_load(self, info: HostInfo) -> int:
        seen = self._placed.get(info.server_id)
        if seen is None or seen[0] != info.renew_time:
            return info.load
        return info.load + seen[1]

    def _count_placement(self, info: HostInfo) -> None:
        seen = self._placed.get(info.server_id)
        count = seen[1] if seen is not None and seen[0] == info.renew_time else 0
        self._placed[info.server_id] = (info.renew_time, count + 1)

    def choose(self, candidates: list[HostInfo], extra: dict[int, int] | None = None) -> HostInfo:
        """Power of two choices: two hosts at random, the less loaded one wins.

        The load is what the host last reported plus what this PD placed on it since
        (and ``extra``: what this batch chose for it so far), so a burst of placements
        spreads before the next report arrives."""
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._random.sample(candidates, 2)
        load_a, load_b = self._effective_load(a), self._effective_load(b)
        if extra:
            load_a += extra.get(a.server_id, 0)
            load_b += extra.get(b.server_id, 0)
        return a if load_a <= load_b else b

    async def find_position(self, actor_type: str, actor_id: str, ttl: int = 0) -> Position:
        """Where the actor lives, placing it first if it lives nowhere."""
        (answer,) = await self.find_positions([(actor_type, actor_id)], ttl)
        if isinstance(answer, PDError):
            raise answer
        return answer

    async def find_positions(
        self, actors: Sequence[tuple[str, str]], ttl: int = 0
    ) -> list[Position | PDError]:
        """:meth:`find_position` for many ``(actor_type, actor_id)`` at once: one answer
        per actor, in order, a Position or the PDError of that actor (bad name, no host).

        The actors not placed yet are placed together: one batch create in the store
        (one etcd txn per 128 keys) that writes each key only if absent, bound to its
        chosen host's lease, and answers whoever won. Keys whose host died meanwhile
        are placed again on the remaining hosts."""
        if len(actors) > MAX_BATCH:
            raise PDError(400, "bad_request", f"at most {MAX_BATCH} actors per request")
        answers: list[Position | PDError | None] = [None] * len(actors)
        where: dict[str, list[int]] = {}  # store key -> indexes of the actors asking for it
        names: dict[str, tuple[str, str]] = {}
        for i, (actor_type, actor_id) in enumerate(actors):
            error = _check_names(actor_type, actor_id)
            if error is not None:
                answers[i] = error
                continue
            key = self._position_key(actor_type, actor_id)
            if key not in where:
                where[key] = []
                names[key] = (actor_type, actor_id)
            where[key].append(i)

        def answer(key: str, value: Position | PDError) -> None:
            for i in where[key]:
                answers[i] = value

        todo = list(where)
        dead: set[int] = set()
        for attempt in range(PLACEMENT_ATTEMPTS):
            if not todo:
                break
            hosts = await self.hosts(max_age=0.0 if attempt else VIEW_MAX_AGE)
            serving: dict[str, list[HostInfo]] = {}
            extra: dict[int, int] = {}
            chosen: dict[str, HostInfo] = {}
            entries: list[tuple[str, bytes, int]] = []
            homeless: list[str] = []
            for key in todo:
                actor_type = names[key][0]
                candidates = serving.get(actor_type)
                if candidates is None:
                    candidates = serving[actor_type] = [
                        h for s, h in hosts.items() if actor_type in h.services and s not in dead
                    ]
                if not candidates:
                    homeless.append(key)
                    continue
                host = chosen[key] = self.choose(candidates, extra)
                extra[host.server_id] = extra.get(host.server_id, 0) + 1
                record = {
                    "server_id": host.server_id,
                    "server_address": host.address,
                    "create_time": now_ms(),
                }
                entries.append((key, json.dumps(record).encode(), host.lease_for(key)))
            again: list[str] = []
            if homeless:  # no live host: only an existing position can answer
                for key, kv in zip(homeless, await self.store.get_many(homeless), strict=True):
                    actor_type, actor_id = names[key]
                    if kv is not None:
                        answer(key, self._position(actor_type, actor_id, ttl, kv, False, hosts))
                    elif attempt == 0:
                        again.append(key)  # read the store again: a host may have just registered
                    else:
                        answer(key, _no_host(actor_type))
            if entries:
                try:
                    outcomes: list[CreateOutcome | PDError] = list(
                        await self.creates.create_many(entries)
                    )
                except StoreFullError as exc:
                    outcomes = await self._read_when_full(entries, exc)
                for (key, _, _), outcome in zip(entries, outcomes, strict=True):
                    if isinstance(outcome, PDError):
                        answer(key, outcome)
                        continue
                    if isinstance(outcome, LeaseNotFoundError):
                        dead.add(chosen[key].server_id)  # it died since the view was read
                        again.append(key)
                        continue
                    created, kv = outcome
                    if created:
                        self._count_placement(chosen[key])
                    actor_type, actor_id = names[key]
                    answer(key, self._position(actor_type, actor_id, ttl, kv, created, hosts))
            todo = again
        for key in todo:
            actor_type, actor_id = names[key]
            answer(
                key,
                PDError(
                    503, "no_host", f"could not place {actor_type}/{actor_id}: hosts keep dying"
                ),
            )
        done = [a for a in answers if a is not None]
        assert len(done) == len(actors)
        return done

    async def _read_when_full(
        self, entries: list[tuple[str, bytes, int]], exc: StoreFullError
    ) -> list[CreateOutcome | PDError]:
        """The store refused the create for lack of space: the positions that exist are
        answered (a read still works), the others fail at once with 507 store_full."""
        self.store_full(exc)
        found = await self.store.get_many([key for key, _, _ in entries])
        return [(False, kv) if kv is not None else _store_full() for kv in found]

    def _position(
        self,
        actor_type: str,
        actor_id: str,
        ttl: int,
        kv: KeyValue,
        created: bool,
        hosts: dict[int, HostInfo],
    ) -> Position:
        record = json.loads(kv.value)
        server_id = int(record["server_id"])
        host = hosts.get(server_id)
        ticket = ""
        if host is not None and host.placement_key and kv.lease in host.leases():
            key = bytes.fromhex(host.placement_key)
            ticket = make_ticket(key, actor_type, actor_id, server_id, kv.mod_revision).hex()
        return Position(
            actor_type=actor_type,
            actor_id=actor_id,
            server_id=server_id,
            server_address=str(record["server_address"]),
            create_time=int(record["create_time"]),
            lease_id=kv.lease,
            ttl=ttl,
            created=created,
            revision=kv.mod_revision,
            ticket=ticket,
        )

    async def held(
        self,
        server_id: int,
        lease_id: int,
        lease: int,
        after: str = "",
        limit: int = MAX_BATCH,
        *,
        owner: bytes | None = None,
    ) -> tuple[list[Position], str]:
        """The positions bound to ``lease``, one of the leases of host ``server_id``
        (registered under ``lease_id``), in key order after the key ``after``: at most
        ``limit``, and the key to ask after next ("" when there are no more). A host
        compares them with what it holds, to give back those it never took."""
        if not 1 <= limit <= MAX_BATCH:
            raise PDError(400, "bad_request", f"limit must be from 1 to {MAX_BATCH}")
        info = (await self.hosts()).get(server_id)
        if info is None or info.lease_id != lease_id or lease not in info.leases():
            info = (await self.hosts(max_age=0.0)).get(server_id)
        if info is None or info.lease_id != lease_id:
            raise PDError(404, "not_registered", f"server {server_id} is not registered")
        self._check_owner(info, owner)
        if lease not in info.leases():
            raise PDError(400, "bad_request", f"lease {lease} is not one of server {server_id}")
        keys = await self.store.lease_keys(lease)
        if keys is None:
            raise PDError(404, "lease_expired", f"the lease {lease} of server {server_id} expired")
        prefix = f"{self.prefix}placement/"
        keys = [k for k in keys if k.startswith(prefix) and k > (after or prefix)]
        page = keys[:limit]
        found: list[Position] = []
        for key, kv in zip(page, await self.store.get_many(page), strict=True):
            actor_type, _, actor_id = key[len(prefix) :].partition("/")
            if kv is not None and kv.lease == lease:
                found.append(self._position(actor_type, actor_id, 0, kv, False, {}))
        return found, page[-1] if len(keys) > limit else ""

    async def release(
        self,
        server_id: int,
        positions: Sequence[tuple[str, str, int]],
        *,
        owner: bytes | None = None,
    ) -> list[bool]:
        """Delete positions whose activation ended on host ``server_id``: each
        ``(actor_type, actor_id, revision)`` only if the stored position is still that
        revision and names that host (a newer placement of the same actor, or another
        host's, is never touched); one answer per position, True if it was deleted
        (False: already gone, placed anew, or not the host's). ``owner``: as for
        keep_alive; a host that is not registered any more answers 404 (its positions
        went with its leases)."""
        if len(positions) > MAX_BATCH:
            raise PDError(400, "bad_request", f"at most {MAX_BATCH} positions per request")
        wanted: dict[str, int] = {}
        keys: list[str] = []
        for actor_type, actor_id, revision in positions:
            error = _check_names(actor_type, actor_id)
            if error is not None:
                raise error
            if isinstance(revision, bool) or not isinstance(revision, int) or revision <= 0:
                raise PDError(400, "bad_request", "revision must be a positive integer")
            key = self._position_key(actor_type, actor_id)
            keys.append(key)
            if wanted.setdefault(key, revision) != revision:
                raise PDError(400, "bad_request", f"{actor_type}/{actor_id} is named twice")
        if owner is not None:
            info = (await self.hosts()).get(server_id)
            if info is None:
                info = (await self.hosts(max_age=0.0)).get(server_id)
            if info is None:
                raise PDError(404, "not_registered", f"server {server_id} is not registered")
            self._check_owner(info, owner)
        # only positions that name this host: one host cannot give back another's
        stored = await self.store.get_many(list(wanted))
        items = [
            (key, revision)
            for (key, revision), kv in zip(wanted.items(), stored, strict=True)
            if kv is not None and kv.mod_revision == revision and _names(kv.value, server_id)
        ]
        done = dict.fromkeys(wanted, False)
        if items:
            deleted = await self.store.delete_many(items)
            done.update(zip([key for key, _ in items], deleted, strict=True))
        released = sum(done.values())
        if released:
            seen = self._placed.get(server_id)
            if seen is not None:  # placements counted since its report are fewer now
                self._placed[server_id] = (seen[0], max(0, seen[1] - released))
        return [done[key] for key in keys]


def _record(value: bytes, server_id: int) -> HostInfo:
    """A host record as stored (a malformed one: a record bound to no owner key)."""
    try:
        return HostInfo.from_json(json.loads(value))
    except (ValueError, TypeError):
        return HostInfo(server_id)


def _names(value: bytes, server_id: int) -> bool:
    """Whether the stored position ``value`` is on host ``server_id``."""
    try:
        return bool(json.loads(value).get("server_id") == server_id)
    except (ValueError, TypeError, AttributeError):
        return False


def _is_placement_key(text: str) -> bool:
    if len(text) != 2 * PLACEMENT_KEY_SIZE:
        return False
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _no_host(actor_type: str) -> PDError:
    return PDError(
        503,
        "no_host",
        f"no live host serves actor type {actor_type!r}; start a host whose app defines it",
    )


def _check_names(actor_type: str, actor_id: str) -> PDError | None:
    for name, value in (("actor_type", actor_type), ("actor_id", actor_id)):
        if not isinstance(value, str) or not value or len(value) > MAX_NAME:
            return PDError(400, "bad_request", f"{name} must be 1-{MAX_NAME} characters")
        if _CONTROL.search(value):
            return PDError(400, "bad_request", f"{name} must not contain control characters")
    if "/" in actor_type:
        return PDError(400, "bad_request", "actor_type must not contain '/'")
    return None
