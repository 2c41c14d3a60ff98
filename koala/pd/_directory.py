"""Where actors live, as a host sees it: the runtime's directory of a cluster.

:class:`ClusterDirectory` is what a host plugs into its :class:`~koala.Runtime`. It
is a :class:`~koala.pd._membership.MembershipAgent` (registration, renewal,
self-fencing) that also answers "where does this actor live": from the positions this
host holds (:class:`~koala.pd._positions.OwnPositions`), from a bounded LRU cache with
a TTL of positions on other hosts, and else from the PD, in batched lookups. It gives
positions back once their activation ends, trusts placement tickets made for it
(:meth:`ClusterDirectory.claim`), asks for more leases as its positions grow, gives
back positions it never took (reconciliation) and sheds activations when it holds
more than its share (koala.pd._rebalance).

This module never imports the PD server.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .. import _metrics
from .._errors import (
    HostUnavailableError,
    KoalaError,
    LeaseExpiredError,
    PDRequestError,
    PDUnavailableError,
    WrongHostError,
)
from .._messages import Key
from .._seams import LOCAL
from ._http import PDClient
from ._membership import MemberConfig, MembershipAgent
from ._positions import Ident, OwnPositions
from ._rebalance import to_shed
from ._records import MAX_POSITION_LEASES, ActorPosition
from ._ticket import check_ticket

if TYPE_CHECKING:
    from prometheus_client.core import Metric

log = logging.getLogger("koala.pd.client")

# Position lookups of a host go to the PD in batches: while LOOKUP_BATCHES batches are
# in flight, new lookups wait in a queue (at most LOOKUP_QUEUE; a caller beyond waits
# for room) and leave together, at most LOOKUP_BATCH in one request, as soon as a batch
# returns. No timer: alone, a lookup leaves at once as a batch of one.
LOOKUP_BATCHES = 2
LOOKUP_BATCH = 256
LOOKUP_QUEUE = 10_000
# Positions whose activation ended go back to the PD in batches of RELEASE_BATCH, from
# RELEASE_TASKS tasks; a failed release is sent again (after RELEASE_RETRY_MAX at most).
# More leases for the positions (MemberConfig.positions_per_lease) are asked for
# GROW_LEASES_STEP at a time, at most MAX_POSITION_LEASES in all.
GROW_LEASES_STEP = 16
RELEASE_TASKS = 2
RELEASE_BATCH = 256
RELEASE_RETRY_MAX = 2.0


@dataclass(frozen=True, slots=True)
class DirectoryStatistics:
    server_id: int
    serving: bool
    cached: int
    members: int
    registrations: int
    fences: int
    renewals: int
    failed_renewals: int
    resolves: int  # positions asked of the PD
    lookup_batches: int = 0  # requests they took
    owned: int = 0  # positions this host holds (its live activations, mostly)
    unreleased: int = 0  # positions whose activation ended, not yet deleted
    releases: int = 0  # positions given back to the PD
    release_batches: int = 0  # requests they took
    claims: int = 0  # first calls served on a peer's ticket, without a lookup
    shed: int = 0  # activations given up to even the hosts out (rebalancing)
    hits: int = 0  # lookups answered from this host's own positions or its cache
    misses: int = 0  # lookups the cache could not answer (a resolve follows)


class _Pending:
    """One position being looked up; every concurrent caller for that actor waits on it."""

    __slots__ = ("done", "error", "ident", "result")

    def __init__(self, ident: tuple[str, Key]) -> None:
        self.ident = ident
        self.done = anyio.Event()
        self.result: ActorPosition | None = None
        self.error: KoalaError | None = None

    def failure(self) -> KoalaError:
        """A fresh exception per waiter (one instance raised in many tasks would pile up
        their tracebacks)."""
        error = self.error
        assert error is not None
        if isinstance(error, PDRequestError):
            return type(error)(error.status, error.code, error.message)
        return PDUnavailableError(f"finding {self.ident[0]}/{self.ident[1]!r} failed: {error}")


class ClusterDirectory(MembershipAgent):
    """A host's membership in the cluster and its :class:`~koala._runtime.Directory`.

    Give it to ``Runtime(directory=...)``, then ``attach(runtime)`` and run
    ``await task_group.start(directory.run)``: it returns once the host is registered.
    ``address`` is where this host's transport listens; ``services`` maps each actor
    type it serves to its implementation's name.
    """

    def __init__(
        self,
        pd: PDClient,
        address: str,
        services: dict[str, str],
        config: MemberConfig | None = None,
        *,
        labels: dict[str, str] | None = None,
    ) -> None:
        super().__init__(pd, address, services, config, labels=labels)
        # positions on other hosts: ident -> (server id, address, expiry, ticket)
        self._cache: OrderedDict[Ident, tuple[int, str, float, bytes]] = OrderedDict()
        self._positions = OwnPositions()  # this host's own, and those it gives back
        self._release_wanted = anyio.Event()
        self._releases_moved = anyio.Event()  # set (and renewed) as each release returns
        self._releases = 0
        self._release_batches = 0
        self._claims = 0
        self._grow_wanted = anyio.Event()
        self._rebalance_wanted = anyio.Event()
        self._shed = 0
        self._pending: dict[tuple[str, Key], _Pending] = {}
        self._lookups_in: MemoryObjectSendStream[_Pending] | None = None  # while run() runs
        self._lookup_batches = 0
        self._resolves = 0
        self._hits = 0
        self._misses = 0
        _metrics.report(self, _directory_metrics)

    def statistics(self) -> DirectoryStatistics:
        return DirectoryStatistics(
            server_id=self.server_id,
            serving=self.serving,
            cached=len(self._cache),
            members=len(self.members),
            registrations=self._registrations,
            fences=self._fences,
            renewals=self._renewals,
            failed_renewals=self._failed_renewals,
            resolves=self._resolves,
            lookup_batches=self._lookup_batches,
            owned=len(self._positions),
            unreleased=self._positions.unreleased,
            releases=self._releases,
            release_batches=self._release_batches,
            claims=self._claims,
            shed=self._shed,
            hits=self._hits,
            misses=self._misses,
        )

    # ------------------------------------------------------------ Directory

    def lookup(self, actor_type: str, key: Key) -> str | None:
        if not self.serving:
            return None
        ident = (actor_type, str(key))
        if self._positions.owned(ident) is not None:
            self._hits += 1
            return LOCAL
        entry = self._cache.get(ident)
        if entry is None:
            self._misses += 1
            return None
        server_id, address, expires, _ = entry
        if expires <= anyio.current_time() or server_id in self._departed:
            del self._cache[ident]
            self._misses += 1
            return None
        self._cache.move_to_end(ident)
        self._hits += 1
        return LOCAL if server_id == self.server_id else address

    async def resolve(self, actor_type: str, key: Key) -> str:
        if not self.serving:
            with anyio.move_on_after(self.config.rejoin_wait):
                await self._rejoined.wait()
            if not self.serving:
                raise WrongHostError(
                    "this host lost its lease with the placement driver and has not rejoined "
                    "the cluster yet; retry shortly"
                )
        ident = (actor_type, str(key))
        positions = self._positions
        if positions.owned(ident) is not None or positions.take_back(ident):
            return LOCAL
        if positions.sending(ident):  # ended here: ask once the PD has deleted it
            with anyio.move_on_after(self.pd.timeout):
                while positions.sending(ident):
                    await self._releases_moved.wait()
            if positions.sending(ident):
                raise PDUnavailableError(
                    f"{actor_type}/{key!r} is being given back to the PD, which does not "
                    "answer; retry shortly"
                )
            if positions.owned(ident) is not None or positions.take_back(ident):
                return LOCAL
        pending = self._pending.get(ident)
        if pending is None:
            pending = self._pending[ident] = _Pending(ident)
            self._resolves += 1
            try:
                queue = self._lookups_in
                if queue is None:
                    raise PDUnavailableError("the directory is not running (start its run())")
                await queue.send(pending)  # waits while the queue is full
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                error = PDUnavailableError("the directory stopped")
                self._finish(pending, error=error)
                raise error from None
            except BaseException as exc:
                # not queued (or queued, and answered meanwhile: then this does nothing)
                self._finish(
                    pending, error=PDUnavailableError(f"the lookup was abandoned: {exc!r}")
                )
                raise
        await pending.done.wait()
        if pending.error is not None:
            raise pending.failure()
        assert pending.result is not None
        position = pending.result
        server_id = position.server_id
        if not self.serving:
            raise WrongHostError("this host was fenced while the placement was looked up; retry")
        if server_id == self.server_id:
            return self._own_answer(ident, position.revision)
        if server_id in self._departed:
            raise HostUnavailableError(
                f"{actor_type}/{key!r} is placed on server {server_id}, which is gone; its "
                "lease has not expired yet, after which the actor is placed again: retry shortly"
            )
        self._remember(ident, server_id, position.server_address, position.ticket)
        return position.server_address

    def _own_answer(self, ident: Ident, revision: int) -> str:
        """The PD placed ``ident`` on this host at ``revision``. While the lookup was out,
        no release of ``ident`` was unconfirmed (resolve waits for them first) and no
        claim took it (claims wait for a lookup in flight), so the position is live, even
        below the watermark: a release confirmed before the lookup left cannot be in the
        PD's answer."""
        positions = self._positions
        if positions.owned(ident) is not None or positions.take_back(ident, revision):
            return LOCAL
        if positions.sending(ident) or revision <= 0 or positions.given_back(ident, revision):
            raise HostUnavailableError(
                f"{ident[0]}/{ident[1]!r}: the PD answered a position this host gave back "
                f"(revision {revision}); retry shortly"
            )
        positions.own(ident, revision)
        self._cache.pop(ident, None)
        return LOCAL

    def forget(self, actor_type: str, key: Key) -> None:
        self._cache.pop((actor_type, str(key)), None)

    def ticket_of(self, actor_type: str, key: Key) -> bytes:
        """The ticket of the cached position on another host (empty: none), for
        ``Request.placement``; a stale one is harmless (the named host checks it)."""
        entry = self._cache.get((actor_type, str(key)))
        return b"" if entry is None else entry[3]

    def claim(self, actor_type: str, key: Key, ticket: bytes) -> bool:
        """True if ``ticket`` proves that the PD placed the actor on this host, in its
        current registration, at a revision that is still live (docs/pd.md, "Fencing").

        The ticket is checked with this registration's placement key (a fenced host
        rejoins with a new one, so its old tickets fail). A position is deleted only by
        this host's own release, and every release is remembered (OwnPositions.stale),
        so a valid ticket whose revision was not released names a live position."""
        if not self.serving or not ticket:
            return False
        ident = (actor_type, str(key))
        if ident in self._pending:  # a lookup is out: its answer decides
            return False
        checked = check_ticket(self._placement_key, ticket, actor_type, str(key))
        if checked is None or checked[0] != self.server_id:
            return False
        revision = checked[1]
        positions = self._positions
        if positions.owned(ident) is not None or positions.take_back(ident, revision):
            return True
        if positions.sending(ident) or positions.stale(ident, revision):
            return False
        positions.own(ident, revision)
        self._cache.pop(ident, None)  # what this host thought of it was stale
        self._claims += 1
        return True

    def released(self, actor_type: str, key: Key) -> None:
        """The activation ended: its position goes back to the PD (in a batch, soon),
        unless the actor is active here again before the batch leaves."""
        if self._positions.ended((actor_type, str(key))):
            self._release_wanted.set()

    def _releases_changed(self) -> None:
        self._releases_moved.set()
        self._releases_moved = anyio.Event()

    def _active(self, ident: Ident) -> bool:
        """Whether an activation of the position's actor is live here: under the key as
        text, or as the integer that text spells (both map to one position)."""
        runtime = self.runtime
        if runtime is None:
            return False
        actor_type, text = ident[0], str(ident[1])
        if runtime.is_active(actor_type, text):
            return True
        try:
            number = int(text)
        except ValueError:
            return False
        return str(number) == text and runtime.is_active(actor_type, number)

    async def _release_positions(self) -> None:
        """Send ended positions to the PD (guarded deletes), until cancelled."""
        while True:
            await self._release_wanted.wait()
            self._release_wanted = anyio.Event()
            while self.serving:
                batch = self._positions.take_batch(RELEASE_BATCH, self._active)
                if not batch:
                    break
                try:
                    await self._send_release(batch)
                finally:
                    self._positions.sent(batch)
                    self._releases_changed()

    async def _send_release(self, batch: list[tuple[Ident, int]]) -> None:
        """One release request, sent again until the PD answers or the lease is gone (the
        positions went with it). Until then the actors wait: resolve() does not ask the
        PD for a position whose delete may still land."""
        server_id = self.server_id
        items = [(t, str(k), revision) for (t, k), revision in batch]
        delay = 0.05
        while True:
            try:
                await self.pd.release(server_id, items)
            except LeaseExpiredError:
                return
            except PDRequestError as exc:
                if exc.status >= 500:
                    pass
                else:  # refused as malformed: a bug; the positions stay until the lease ends
                    log.error("server %d: the PD refused a release: %s", server_id, exc)
                    return
            except PDUnavailableError as exc:
                log.warning("server %d: releasing positions failed: %s", server_id, exc)
            else:
                self._releases += len(batch)
                self._release_batches += 1
                return
            if not self.serving or self.server_id != server_id:
                return  # fenced meanwhile: the positions died with the lease
            await anyio.sleep(delay)
            delay = min(delay * 2, RELEASE_RETRY_MAX)

    def _finish(
        self,
        pending: _Pending,
        result: ActorPosition | None = None,
        error: KoalaError | None = None,
    ) -> None:
        if pending.done.is_set():
            return
        pending.result, pending.error = result, error
        if self._pending.get(pending.ident) is pending:
            del self._pending[pending.ident]
        pending.done.set()

    async def _lookups(self, queue: MemoryObjectReceiveStream[_Pending]) -> None:
        """Send queued lookups to the PD, as many as are waiting (up to LOOKUP_BATCH) in
        one request; LOOKUP_BATCHES of these run at once."""
        async for first in queue:
            batch = [first]
            while len(batch) < LOOKUP_BATCH:
                try:
                    batch.append(queue.receive_nowait())
                except anyio.WouldBlock:
                    break
            batch = [p for p in batch if not p.done.is_set()]
            if not batch:
                continue
            self._lookup_batches += 1
            try:
                answers = await self.pd.find_positions(
                    [(p.ident[0], str(p.ident[1])) for p in batch]
                )
            except KoalaError as exc:
                for pending in batch:
                    self._finish(pending, error=exc)
                continue
            except BaseException:
                for pending in batch:
                    self._finish(pending, error=PDUnavailableError("the directory stopped"))
                raise
            for pending, answer in zip(batch, answers, strict=True):
                if isinstance(answer, PDRequestError):
                    self._finish(pending, error=answer)
                else:
                    self._finish(pending, result=answer)

    def _fail_queued(self, queue: MemoryObjectReceiveStream[_Pending]) -> None:
        """The directory stops: no lookup still queued will be answered."""
        while True:
            try:
                pending = queue.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            self._finish(pending, error=PDUnavailableError("the directory stopped"))
        for pending in list(self._pending.values()):
            self._finish(pending, error=PDUnavailableError("the directory stopped"))

    def _remember(self, ident: Ident, server_id: int, address: str, ticket: bytes) -> None:
        self._cache[ident] = (
            server_id,
            address,
            anyio.current_time() + self.config.cache_ttl,
            ticket,
        )
        self._cache.move_to_end(ident)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    # ------------------------------------------------------------ membership
    # ------------------------------------------------------------ membership's hooks

    def _renewed(self) -> None:
        if self._leases_wanted() > len(self._position_leases):
            self._grow_wanted.set()
        if self.config.rebalance.enabled:
            self._rebalance_wanted.set()

    def _drop_positions(self) -> None:
        self._cache.clear()
        self._positions.clear()
        self._releases_changed()

    # ------------------------------------------------------------ background

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Register, renew, fence and register again, and look positions up, until
        cancelled."""
        if self._lookups_in is not None:
            raise RuntimeError("ClusterDirectory.run() is already running")
        send, receive = anyio.create_memory_object_stream[_Pending](LOOKUP_QUEUE)
        self._lookups_in = send
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(LOOKUP_BATCHES):
                    tg.start_soon(self._lookups, receive)
                for _ in range(RELEASE_TASKS):
                    tg.start_soon(self._release_positions)
                tg.start_soon(self._grow_leases)
                tg.start_soon(self._rebalance)
                if self.config.reconcile_interval:
                    tg.start_soon(self._reconcile)
                await self._membership(task_status)
        finally:
            self._lookups_in = None
            send.close()
            self._fail_queued(receive)
            receive.close()

    async def _reconcile(self) -> None:
        """Every ``reconcile_interval``, give back the positions the store holds for this
        host that it never took, older than ``reconcile_grace``: placed for a first call
        that never came (its caller died or gave up). Safe even if the call comes after
        all: the position is remembered as given back, so its ticket is refused and the
        caller's host asks the PD again."""
        while True:
            await anyio.sleep(self.config.reconcile_interval)
            if not self.serving:
                continue
            server_id, lease_id = self.server_id, self.lease_id
            try:
                found = await self._disown_stray(server_id, lease_id)
            except (PDUnavailableError, PDRequestError) as exc:
                log.warning("server %d: listing its positions failed: %s", server_id, exc)
                continue
            if found:
                log.info("server %d gives back %d positions it never took", server_id, found)
                self._release_wanted.set()

    async def _disown_stray(self, server_id: int, lease_id: int) -> int:
        """One pass of :meth:`_reconcile` over every lease of this registration; how
        many positions it marked to give back."""
        horizon = time.time() * 1000 - self.config.reconcile_grace * 1000
        disowned = 0
        for lease in [lease_id, *self._position_leases]:
            after = ""
            while True:
                page, after = await self.pd.held(server_id, lease_id, lease, after)
                if self.server_id != server_id or not self.serving:
                    return disowned
                for actor_type, actor_id, revision, create_time in page:
                    ident = (actor_type, actor_id)
                    if create_time > horizon or ident in self._pending or self._active(ident):
                        continue
                    disowned += self._positions.disown(ident, revision)
                if not after:
                    break
        return disowned

    async def _rebalance(self) -> None:
        """After each renewal, give up a step of activations if this host holds more
        than its share (koala.pd._rebalance), until cancelled. Their next calls place
        them anew, by load; ``Runtime.shed`` takes idle ones, at turn boundaries."""
        while True:
            await self._rebalance_wanted.wait()
            self._rebalance_wanted = anyio.Event()
            runtime = self.runtime
            if runtime is None or not self.serving:
                continue
            mean, least = self._cluster_load
            mine = runtime.statistics().activations
            count = to_shed(mine, mean, least, self.config.rebalance)
            if count:
                started = await runtime.shed(count)
                self._shed += started
                log.info(
                    "server %d holds %d activations against a mean of %.0f: gave up %d",
                    self.server_id,
                    mine,
                    mean,
                    started,
                )

    def _leases_wanted(self) -> int:
        """Position leases this host should have for what it holds (koala.pd grow_leases):
        one per ``positions_per_lease`` positions beyond the first, at most
        MAX_POSITION_LEASES."""
        per_lease = self.config.positions_per_lease
        if not per_lease:
            return 0
        return min(MAX_POSITION_LEASES, len(self._positions) // per_lease)

    async def _grow_leases(self) -> None:
        """Ask the PD for more position leases when a renewal finds too few, until
        cancelled; a failure waits for the next renewal's word."""
        while True:
            await self._grow_wanted.wait()
            self._grow_wanted = anyio.Event()
            have = len(self._position_leases)
            count = min(GROW_LEASES_STEP, self._leases_wanted() - have)
            if count <= 0 or not self.serving:
                continue
            server_id, lease_id = self.server_id, self.lease_id
            try:
                leases = await self.pd.grow_leases(server_id, lease_id, count)
            except (PDUnavailableError, PDRequestError) as exc:
                log.warning("server %d: could not get more leases: %s", server_id, exc)
                continue
            if self.lease_id == lease_id:  # not re-registered meanwhile
                self._position_leases = leases


def _directory_metrics(directory: ClusterDirectory) -> list[Metric]:
    st = directory.statistics()
    c, g = _metrics.counter, _metrics.gauge
    return [
        c("koala_directory_hits_total", "Lookups answered by this host's cache", st.hits),
        c("koala_directory_misses_total", "Lookups the cache could not answer", st.misses),
        c("koala_directory_resolves_total", "Positions asked of the PD", st.resolves),
        c("koala_directory_lookup_requests_total", "PD requests they took", st.lookup_batches),
        c("koala_directory_claims_total", "First calls served on a ticket", st.claims),
        c("koala_directory_releases_total", "Positions given back to the PD", st.releases),
        c("koala_directory_shed_total", "Activations shed by the rebalancer", st.shed),
        g("koala_directory_cached_positions", "Positions of other hosts cached", st.cached),
        g("koala_directory_owned_positions", "Positions this host holds", st.owned),
        g("koala_membership_members", "Hosts in this host's membership view", st.members),
        g("koala_membership_serving", "1 while registered and not fenced", float(st.serving)),
        c("koala_membership_registrations_total", "Registrations", st.registrations),
        c("koala_membership_fences_total", "Times this host fenced itself", st.fences),
        c("koala_membership_renewals_total", "Lease renewals", st.renewals),
        c("koala_membership_failed_renewals_total", "Failed renewals", st.failed_renewals),
    ]
