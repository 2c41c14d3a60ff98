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

The parts: :class:`~koala.pd.server._membership.HostTable` (the hosts and their
load), :class:`~koala.pd.server._combiner.CreateCombiner` (placements sharing store
requests), :class:`~koala.pd.server._maintenance.StoreKeeper` (the store's upkeep);
ids and the placement itself are here.

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
import random
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from ... import _metrics
from ..._errors import KoalaError
from .._records import HostInfo, HostStats
from .._ticket import make_ticket
from ._combiner import CreateCombiner
from ._errors import PDError, now_ms, store_full_error
from ._maintenance import MaintenanceConfig, MaintenanceStatistics, StoreKeeper
from ._membership import CAS_RETRIES, VIEW_MAX_AGE, HostTable, MembershipEvent, MembershipView
from ._store import CreateOutcome, KeyValue, LeaseNotFoundError, Store, StoreFullError

if TYPE_CHECKING:
    from prometheus_client.core import Metric

DEFAULT_PREFIX = "/koala/"
MAX_SEQUENCE_STEP = 1_000_000
MAX_SEQUENCES = 10_000  # named sequences whose unspent block a PD remembers
PLACEMENT_ATTEMPTS = 4
MAX_NAME = 256
MAX_BATCH = 1024  # actors in one find_positions request
_SEQUENCE_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


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
        self.keeper = StoreKeeper(store, maintenance)
        self.maintenance = self.keeper.config
        self.table = HostTable(store, prefix, self.keeper)
        self.creates = CreateCombiner(store)
        self._advancing = anyio.Lock()  # id counters (_advance)
        self._blocks: OrderedDict[str, tuple[int, int]] = OrderedDict()  # key -> [next, end)
        self._random = random.Random()
        self._asked = 0  # positions asked for
        self._placed = 0  # of them, placed by this PD (the rest existed)
        self._lookup_seconds = _metrics.Histogram()  # per find_positions request
        _metrics.report(self, _driver_metrics)

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

    # ------------------------------------------------------------ membership (HostTable)

    async def register(self, info: HostInfo, *, owner: bytes | None = None) -> int:
        """Record a host under a new lease of ``info.ttl`` seconds; the lease id.
        ``owner``: the host's owner key (None: an in-process caller, bound to none)."""
        return await self.table.register(info, owner=owner)

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
        """Renew a host's lease and record its load, in this PD's memory only."""
        await self.table.keep_alive(
            server_id, lease_id, load, activations, owner=owner, stats=stats
        )

    async def grow_leases(
        self, server_id: int, lease_id: int, count: int, *, owner: bytes | None = None
    ) -> list[int]:
        """Give host ``server_id`` ``count`` more leases for its positions; all of them."""
        return await self.table.grow_leases(server_id, lease_id, count, owner=owner)

    async def delete(self, server_id: int, *, owner: bytes | None = None) -> bool:
        """Remove a host now (its leases, and so its positions, go too)."""
        return await self.table.delete(server_id, owner=owner)

    async def hosts(self, max_age: float = VIEW_MAX_AGE) -> dict[int, HostInfo]:
        """The registered hosts, read from the store at most ``max_age`` seconds ago."""
        return await self.table.hosts(max_age)

    def membership(self, since: int | None = None) -> MembershipView:
        """The current view as a delta from version ``since`` (None: the whole table)."""
        return self.table.membership(since)

    def recent_events(self) -> list[MembershipEvent]:
        """Hosts added and removed in the last minute, as this PD saw them."""
        return self.table.recent_events()

    # ------------------------------------------------------------ store maintenance (StoreKeeper)

    def store_full(self, exc: StoreFullError) -> None:
        """A write was refused for lack of space: say so, and look at the store now."""
        self.keeper.store_full(exc)

    def maintenance_statistics(self) -> MaintenanceStatistics:
        return self.keeper.statistics()

    async def maintain(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Look after the store until cancelled (or :meth:`stop_maintenance`)."""
        await self.keeper.maintain(task_status=task_status)

    def stop_maintenance(self) -> None:
        """End :meth:`maintain` (it returns; nothing else is cancelled)."""
        self.keeper.stop()

    # ------------------------------------------------------------ placement

    def choose(self, candidates: list[HostInfo], extra: dict[int, int] | None = None) -> HostInfo:
        """Power of two choices: two hosts at random, the less loaded one wins.

        The load is what the host last reported plus what this PD placed on it since
        (and ``extra``: what this batch chose for it so far), so a burst of placements
        spreads before the next report arrives."""
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._random.sample(candidates, 2)
        load_a, load_b = self.table.effective_load(a), self.table.effective_load(b)
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

    @property
    def placements(self) -> int:
        """Actors this PD placed since it started (positions it created)."""
        return self._placed

    async def find_positions(
        self, actors: Sequence[tuple[str, str]], ttl: int = 0
    ) -> list[Position | PDError]:
        """See :meth:`_find_positions` (this counts them for the metrics)."""
        start = time.perf_counter()
        try:
            return await self._find_positions(actors, ttl)
        finally:
            self._asked += len(actors)
            self._lookup_seconds.observe(time.perf_counter() - start)

    async def _find_positions(
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
                        self._placed += 1
                        self.table.count_placement(chosen[key])
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
        return [(False, kv) if kv is not None else store_full_error() for kv in found]

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
        self.table.check_owner(info, owner)
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
            self.table.check_owner(info, owner)
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
            self.table.placements_released(server_id, released)
        return [done[key] for key in keys]


def _names(value: bytes, server_id: int) -> bool:
    """Whether the stored position ``value`` is on host ``server_id``."""
    try:
        return bool(json.loads(value).get("server_id") == server_id)
    except (ValueError, TypeError, AttributeError):
        return False


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


def _driver_metrics(pd: PlacementDriver) -> list[Metric]:
    c, g = _metrics.counter, _metrics.gauge
    upkeep = pd.maintenance_statistics()
    lookups = pd._lookup_seconds.family(
        "koala_pd_lookup_seconds", "Time to answer a request for positions (placing included)"
    )
    return [
        c("koala_pd_positions_asked_total", "Positions asked of this PD", pd._asked),
        c("koala_pd_placements_total", "Actors this PD placed (positions it created)", pd._placed),
        lookups,
        g("koala_pd_hosts", "Registered hosts in this PD's view", len(pd.table)),
        c("koala_pd_compactions_total", "etcd compactions this PD asked for", upkeep.compactions),
        c("koala_pd_store_recoveries_total", "Times the store was found full", upkeep.recoveries),
        g("koala_pd_store_full", "1 while the store refuses writes for lack of space", upkeep.full),
    ]
