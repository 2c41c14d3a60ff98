"""The hosts a PD knows: registration, renewal, the membership view, and their load.

A host record is written once, at registration; a renewal is a lease keep-alive and
nothing else in the store (the load it reports stays in this PD's memory), so a
cluster at rest makes no writes. :class:`HostTable` reads the records again at most
every VIEW_MAX_AGE seconds, numbers the changes it sees (a per-PD version, so a host
can ask for a delta), and counts the placements this PD made on each host since its
last report, so a burst of placements spreads before the next report arrives.

Keys under the PD's prefix: ``ids/server_id`` and ``hosts/{server_id}`` (a host's
record, JSON, bound to the host's lease).
"""

from __future__ import annotations

import json
import logging
import random
from collections import deque
from dataclasses import dataclass

import anyio

from .._auth import owner_hash, owner_matches
from .._records import MAX_POSITION_LEASES, HostInfo, HostStats
from .._ticket import PLACEMENT_KEY_SIZE
from ._errors import PDError, now_ms
from ._maintenance import StoreKeeper
from ._store import LeaseNotFoundError, Store

log = logging.getLogger("koala.pd")

MAX_HOST_TTL = 3600
EVENT_LIFETIME = 60.0  # seconds a membership event is reported
MAX_EVENTS = 256
VIEW_MAX_AGE = 0.2  # seconds a membership view is reused before the store is read again
CAS_RETRIES = 64
LEASE_RENEWALS = 8  # position leases (MAX_POSITION_LEASES at most) renewed at once
# Position leases live POSITION_LEASE_TTL times the host's TTL, so that when a host's
# registration lease expires (it fenced itself by then), its position leases are still
# there for the PD to revoke one at a time (StoreKeeper.reap), not expire all at once.
POSITION_LEASE_TTL = 3
MAX_VERSIONS = 1024  # membership changes remembered to answer deltas; older: the whole table


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


@dataclass(frozen=True, slots=True)
class MembershipEvent:
    time: int  # ms since the epoch
    add: list[int]
    remove: list[int]


_NO_STATS = HostStats()


class HostTable:
    """The registered hosts of one store, as this PD sees them (see the module docstring)."""

    def __init__(self, store: Store, prefix: str, keeper: StoreKeeper) -> None:
        self.store = store
        self.prefix = prefix
        self.keeper = keeper  # reaps the position leases of hosts that left
        self._hosts: dict[int, HostInfo] = {}
        self._view_time = -1e18
        self._view_lock = anyio.Lock()
        self._has_view = False
        self._events: deque[tuple[float, MembershipEvent]] = deque(maxlen=MAX_EVENTS)
        self._placed: dict[int, tuple[int, int]] = {}  # server -> (renew_time seen, count)
        # load reports of renewals: server -> (load, activations, renew_time), this PD's own
        self._reports: dict[int, tuple[int, int, int]] = {}
        self._stats: dict[int, HostStats] = {}  # the rest of those reports (the cluster page)
        # membership versions: per PD (a random start, +1 per change this PD saw), so a
        # version from another PD (or before a restart) is unknown here: the whole table
        self._version = random.Random().randrange(1 << 40, 1 << 52)
        self._changes: deque[tuple[int, frozenset[int]]] = deque(maxlen=MAX_VERSIONS)

    def _host_key(self, server_id: int) -> str:
        return f"{self.prefix}hosts/{server_id}"

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
                self._host_key(info.server_id), json.dumps(info.stored_json()).encode(), lease=lease
            )
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await self.store.revoke(lease)
            raise
        if not created:
            await self.store.revoke(lease)
            kv = await self.store.get(self._host_key(info.server_id))
            if kv is not None and owner is not None:
                self.check_owner(_record(kv.value, info.server_id), owner)
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
        stats: HostStats | None = None,
    ) -> None:
        """Renew a host's lease and record its load (and ``stats``), in this PD's memory only.

        No write: the host must be registered under that lease in this PD's view of
        the store (read again if it is not, e.g. it registered through another PD),
        and ``owner`` must be its owner key; only then is the lease renewed."""
        if server_id <= 0 or lease_id == 0:
            raise PDError(400, "bad_request", "server_id and lease_id are required")
        info = await self.registered(server_id, lease_id)
        self.check_owner(info, owner)
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
        if stats is not None:
            self._stats[server_id] = stats
        self._placed.pop(server_id, None)

    async def registered(self, server_id: int, lease_id: int) -> HostInfo:
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

    def check_owner(self, info: HostInfo, owner: bytes | None) -> None:
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
            self.check_owner(info, owner)
            count = min(count, MAX_POSITION_LEASES - len(info.position_leases))
            if count <= 0:
                return info.position_leases
            ttl = info.ttl * POSITION_LEASE_TTL
            new = [await self.store.grant(ttl) for _ in range(count)]
            info.position_leases = [*info.position_leases, *new]
            try:
                ok = await self.store.replace(
                    key,
                    json.dumps(info.stored_json()).encode(),
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
        self.check_owner(info, owner)
        for lease in info.position_leases:
            await self.store.revoke(lease)
        if kv.lease:
            await self.store.revoke(kv.lease)
        else:
            await self.store.delete(kv.key)
        self._view_time = -1e18
        return True

    def __len__(self) -> int:
        """Hosts in the view last read (no store access)."""
        return len(self._hosts)

    def last_view(self) -> list[tuple[HostInfo, HostStats]]:
        """The hosts of the view last read, each with what it reported last (no store
        access: for the cluster page)."""
        return [(info, self._stats.get(sid, _NO_STATS)) for sid, info in self._hosts.items()]

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
            self._stats.pop(server_id, None)
            gone = self._hosts[server_id].position_leases
            if gone:  # its registration ended: revoke them one by one (reap)
                self.keeper.reap(gone)

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

    # ------------------------------------------------------------ load

    def effective_load(self, info: HostInfo) -> int:
        """What the host last reported, plus what this PD placed on it since."""
        seen = self._placed.get(info.server_id)
        if seen is None or seen[0] != info.renew_time:
            return info.load
        return info.load + seen[1]

    def count_placement(self, info: HostInfo) -> None:
        """This PD placed an actor on the host (counted until its next report)."""
        seen = self._placed.get(info.server_id)
        count = seen[1] if seen is not None and seen[0] == info.renew_time else 0
        self._placed[info.server_id] = (info.renew_time, count + 1)

    def placements_released(self, server_id: int, count: int) -> None:
        """``count`` positions of the host were given back: the placements counted since
        its report are fewer now."""
        seen = self._placed.get(server_id)
        if seen is not None:
            self._placed[server_id] = (seen[0], max(0, seen[1] - count))


def _record(value: bytes, server_id: int) -> HostInfo:
    """A host record as stored (a malformed one: a record bound to no owner key)."""
    try:
        return HostInfo.from_json(json.loads(value))
    except (ValueError, TypeError):
        return HostInfo(server_id)


def _is_placement_key(text: str) -> bool:
    if len(text) != 2 * PLACEMENT_KEY_SIZE:
        return False
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True
