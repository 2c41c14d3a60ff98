"""The placement driver's store: a small typed key-value interface with leases.

Two implementations behave the same (one contract test suite runs against both):
:class:`~koala.pd.server.EtcdStore` (etcd's v3 JSON gateway, the cluster's consensus store)
and :class:`MemoryStore` (one process, for ``koala pd --store memory`` and tests).

The operations are exactly what the PD needs: read a key or a prefix, write, create a
key only if it is absent (returning whoever won), compare-and-swap on a key's
modification revision, delete, leases (grant, keep alive, revoke, time to live)
whose expiry deletes the keys attached to them, and maintenance (status, compaction
of old revisions, defragmentation, clearing a "no space" alarm).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeAlias

import anyio

from ..._errors import ConfigError, KoalaError

MAX_KEY_SIZE = 4096
MAX_LEASE_TTL = 9_000_000_000  # etcd's own limit (seconds)


class StoreError(KoalaError):
    """The store refused an operation (bad input, or a failure it reported)."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached or did not answer in time; try again later."""


class LeaseNotFoundError(StoreError):
    """The lease does not exist (it expired or was revoked): register again."""


class StoreFullError(StoreError):
    """The store is out of space (etcd's NOSPACE alarm): it refuses writes, while reads,
    deletes and lease keep-alives still work, until space is freed (compaction,
    defragmentation) and the alarm is cleared (:meth:`Store.disarm`)."""


NOSPACE = "NOSPACE"


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """What the store reports about itself.

    ``db_size`` is the size of the store's file (what etcd's quota is checked against;
    it shrinks only by defragmentation), ``db_size_in_use`` the part of it holding data
    (it shrinks when compaction frees old revisions); ``alarms`` names the raised alarms
    (``"NOSPACE"``)."""

    revision: int
    db_size: int
    db_size_in_use: int
    alarms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as stored: its value, revisions (etcd's meaning) and lease (0: none)."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


# One outcome of ``Store.create_many``: (created, the key as stored now), or the error of
# a key whose lease is gone (nothing was written for it).
CreateOutcome: TypeAlias = "tuple[bool, KeyValue] | LeaseNotFoundError"


class Store(Protocol):
    """What the placement driver needs from its consensus store.

    Every call either completes or raises :class:`StoreError` within the store's
    timeout; :class:`StoreUnavailableError` means the outcome of a write is unknown.
    """

    async def get(self, key: str) -> KeyValue | None:
        """The key, or None if absent."""
        ...

    async def get_prefix(self, prefix: str, *, limit: int = 0) -> list[KeyValue]:
        """Keys starting with ``prefix`` in key order (at most ``limit``; 0: all)."""
        ...

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write the key (bound to ``lease`` if not 0); the store's new revision."""
        ...

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> tuple[bool, KeyValue]:
        """Create the key only if absent, atomically; (created, the key as stored now).

        If the key exists it is returned unchanged (the earlier writer won)."""
        ...

    async def create_many(self, items: Sequence[tuple[str, bytes, int]]) -> list[CreateOutcome]:
        """:meth:`create` for many ``(key, value, lease)`` at once, in as few round trips
        as the store allows; one outcome per item, in order.

        Each key is created only if absent, bound to its lease, atomically (first writer
        wins, as with ``create``). A key whose lease is gone gets a
        :class:`LeaseNotFoundError` as its outcome and is not written; the others are
        not affected. Keys must be distinct (StoreError otherwise)."""
        ...

    async def get_many(self, keys: Sequence[str]) -> list[KeyValue | None]:
        """:meth:`get` for many keys at once; one answer per key, in order."""
        ...

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> bool:
        """Write the key only if its mod revision is ``mod_revision`` (0: only if absent)."""
        ...

    async def delete(self, key: str) -> bool:
        """Delete the key; True if it existed."""
        ...

    async def delete_many(self, items: Sequence[tuple[str, int]]) -> list[bool]:
        """Delete each ``(key, mod_revision)`` only if the key's mod revision is still
        that one, in as few round trips as the store allows; one answer per item, True
        if it was deleted. A key written again since (a newer value) is left alone, so a
        late delete never removes what replaced it. Keys must be distinct."""
        ...

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        ...

    async def keep_alive(self, lease: int) -> int:
        """Restart the lease's countdown; its TTL. LeaseNotFoundError if it is gone."""
        ...

    async def time_to_live(self, lease: int) -> int | None:
        """Seconds left on the lease, or None if it is gone."""
        ...

    async def lease_keys(self, lease: int) -> list[str] | None:
        """The keys bound to the lease, in key order, or None if it is gone."""
        ...

    async def revoke(self, lease: int) -> bool:
        """End the lease now, deleting its keys; False if it was already gone."""
        ...

    async def status(self) -> StoreStatus:
        """The current revision, the database's size and the alarms raised."""
        ...

    async def compact(self, revision: int) -> None:
        """Forget the history before ``revision`` (keys as they are now stay).

        A revision at or below one already compacted is not an error (several PDs may
        compact at once); a revision beyond the current one is a StoreError."""
        ...

    async def defragment(self) -> None:
        """Give the space compaction freed back to the file system (on every member)."""
        ...

    async def disarm(self) -> None:
        """Clear a NOSPACE alarm, so the store takes writes again (if they fit)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise StoreError(f"a store key must be a non-empty string, got {key!r}")
    if len(key.encode()) > MAX_KEY_SIZE:
        raise StoreError(f"a store key must be at most {MAX_KEY_SIZE} bytes")


def check_distinct(keys: Sequence[str]) -> None:
    for key in keys:
        check_key(key)
    if len(set(keys)) != len(keys):
        raise StoreError("the keys of one batch must be distinct")


def check_ttl(ttl: int) -> None:
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_LEASE_TTL:
        raise StoreError(f"a lease TTL must be a whole number of seconds >= 1, got {ttl!r}")


def check_revision(revision: int) -> None:
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
        raise StoreError(f"a revision must be a whole number >= 1, got {revision!r}")


def check_timeout(timeout: float) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ConfigError(f"the store timeout must be a number of seconds, got {timeout!r}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError(f"the store timeout must be positive, got {timeout!r}")


@dataclass(slots=True)
class _Lease:
    ttl: int
    expires: float
    keys: set[str]


# bytes a stored version takes beside its key and value (MemoryStore's size model)
_VERSION_OVERHEAD = 64
_MAX_HISTORY_ENTRIES = 10_000  # beyond, the oldest two are merged (bounded memory)


def _cost(key: str, value: bytes) -> int:
    return len(key.encode()) + len(value) + _VERSION_OVERHEAD


class MemoryStore:
    """The store in this process's memory, with etcd's semantics (revisions, leases).

    Leases expire on this process's clock; expiry is applied lazily, before each
    operation, so an expired lease's keys are never seen. Lease ids start at a fixed
    base so they look like etcd's (large, non-zero).

    Sizes follow etcd's model: every overwritten or deleted version is kept until
    :meth:`compact`, the "file" grows to the largest size used and shrinks only by
    :meth:`defragment`. With ``quota_bytes`` (0: none), a write that does not fit
    raises the NOSPACE alarm and :class:`StoreFullError`, as etcd's
    ``--quota-backend-bytes`` does; then every write (and lease grant) fails until
    :meth:`disarm`, while reads, deletes and keep-alives work.
    """

    def __init__(self, *, quota_bytes: int = 0) -> None:
        if isinstance(quota_bytes, bool) or not isinstance(quota_bytes, int) or quota_bytes < 0:
            raise ConfigError(f"quota_bytes must be a whole number >= 0, got {quota_bytes!r}")
        self._data: dict[str, KeyValue] = {}
        self._leases: dict[int, _Lease] = {}
        self._revision = 1
        self._next_lease = 7_000_000_000_000_000_001
        self.quota_bytes = quota_bytes
        self._live = 0  # bytes of the current versions
        self._history: deque[tuple[int, int]] = deque()  # (revision superseded at, bytes)
        self._history_bytes = 0
        self._compacted = 0
        self._file = 0  # the high-water mark of live + history
        self._full = False  # the NOSPACE alarm

    def _admit(self, cost: int) -> None:
        """Raise StoreFullError (and the alarm) if a write of ``cost`` bytes does not fit."""
        if self._full:
            raise StoreFullError("database space exceeded (the NOSPACE alarm is raised)")
        if self.quota_bytes and max(self._file, self._live + self._history_bytes) + cost >= (
            self.quota_bytes
        ):
            self._full = True
            raise StoreFullError("database space exceeded (the NOSPACE alarm is raised)")

    def _supersede(self, kv: KeyValue) -> None:
        """``kv`` is no longer current: it becomes history until compacted."""
        size = _cost(kv.key, kv.value)
        self._live -= size
        self._history.append((self._revision, size))
        self._history_bytes += size
        if len(self._history) > _MAX_HISTORY_ENTRIES:  # merged: compacted a bit later
            _, older = self._history.popleft()
            revision, newer = self._history.popleft()
            self._history.appendleft((revision, older + newer))

    def _grow(self) -> None:
        self._file = max(self._file, self._live + self._history_bytes)

    def _expire(self) -> None:
        now = anyio.current_time()
        for lease_id, lease in list(self._leases.items()):
            if lease.expires <= now:
                self._drop_lease(lease_id)

    def _drop_lease(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id)
        if lease.keys:
            self._revision += 1
            for key in lease.keys:
                old = self._data.pop(key, None)
                if old is not None:
                    self._supersede(old)

    def _write(self, key: str, value: bytes, lease: int, *, admit: bool = True) -> int:
        if lease and lease not in self._leases:
            raise LeaseNotFoundError(f"lease {lease} not found (it expired or was revoked)")
        if admit:
            self._admit(_cost(key, value))
        self._revision += 1
        old = self._data.get(key)
        if old is not None:
            self._supersede(old)
        if old is not None and old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        if old is None:
            kv = KeyValue(key, bytes(value), self._revision, self._revision, 1, lease)
        else:
            kv = replace(
                old,
                value=bytes(value),
                mod_revision=self._revision,
                version=old.version + 1,
                lease=lease,
            )
        self._data[key] = kv
        self._live += _cost(key, value)
        self._grow()
        if lease:
            self._leases[lease].keys.add(key)
        return self._revision

    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        await anyio.lowlevel.checkpoint()
        self._expire()
        return self._data.get(key)

    async def get_prefix(self, prefix: str, *, limit: int = 0) -> list[KeyValue]:
        check_key(prefix)
        await anyio.lowlevel.checkpoint()
        self._expire()
        found = sorted(
            (kv for k, kv in self._data.items() if k.startswith(prefix)), key=lambda kv: kv.key
        )
        return found[:limit] if limit > 0 else found

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        check_key(key)
        await anyio.lowlevel.checkpoint()
        self._expire()
        return self._write(key, value, lease)

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> tuple[bool, KeyValue]:
        check_key(key)
        await anyio.lowlevel.checkpoint()
        self._expire()
        self._admit(_cost(key, value))  # etcd refuses a txn that could write
        existing = self._data.get(key)
        if existing is not None:
            return False, existing
        self._write(key, value, lease, admit=False)
        return True, self._data[key]

    async def create_many(self, items: Sequence[tuple[str, bytes, int]]) -> list[CreateOutcome]:
        check_distinct([key for key, _, _ in items])
        await anyio.lowlevel.checkpoint()
        self._expire()
        if items:  # etcd refuses the whole txn (it could write), even if every key exists
            self._admit(sum(_cost(key, value) for key, value, _ in items))
        outcomes: list[CreateOutcome] = []
        for key, value, lease in items:
            existing = self._data.get(key)
            if existing is not None:
                outcomes.append((False, existing))
            elif lease and lease not in self._leases:
                outcomes.append(
                    LeaseNotFoundError(f"lease {lease} not found (it expired or was revoked)")
                )
            else:
                self._write(key, value, lease, admit=False)
                outcomes.append((True, self._data[key]))
        return outcomes

    async def get_many(self, keys: Sequence[str]) -> list[KeyValue | None]:
        check_distinct(keys)
        await anyio.lowlevel.checkpoint()
        self._expire()
        return [self._data.get(key) for key in keys]

    async def replace(self, key: str, value: bytes, *, mod_revision: int, lease: int = 0) -> bool:
        check_key(key)
        await anyio.lowlevel.checkpoint()
        self._expire()
        self._admit(_cost(key, value))  # etcd refuses a txn that could write
        existing = self._data.get(key)
        current = existing.mod_revision if existing is not None else 0
        if current != mod_revision:
            return False
        self._write(key, value, lease, admit=False)
        return True

    async def delete(self, key: str) -> bool:
        check_key(key)
        await anyio.lowlevel.checkpoint()
        self._expire()
        old = self._data.pop(key, None)
        if old is None:
            return False
        self._revision += 1
        self._supersede(old)
        if old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        return True

    async def delete_many(self, items: Sequence[tuple[str, int]]) -> list[bool]:
        check_distinct([key for key, _ in items])
        await anyio.lowlevel.checkpoint()
        self._expire()
        done: list[bool] = []
        for key, revision in items:
            old = self._data.get(key)
            if old is None or old.mod_revision != revision:
                done.append(False)
                continue
            del self._data[key]
            if old.lease in self._leases:
                self._leases[old.lease].keys.discard(key)
            done.append(True)
        if any(done):
            self._revision += 1  # one transaction, as etcd's
        return done

    async def grant(self, ttl: int) -> int:
        check_ttl(ttl)
        await anyio.lowlevel.checkpoint()
        self._expire()
        self._admit(_VERSION_OVERHEAD)  # etcd checks its quota for a grant too
        lease_id = self._next_lease
        self._next_lease += 1
        self._leases[lease_id] = _Lease(ttl, anyio.current_time() + ttl, set())
        return lease_id

    async def keep_alive(self, lease: int) -> int:
        await anyio.lowlevel.checkpoint()
        self._expire()
        found = self._leases.get(lease)
        if found is None:
            raise LeaseNotFoundError(f"lease {lease} not found (it expired or was revoked)")
        found.expires = anyio.current_time() + found.ttl
        return found.ttl

    async def time_to_live(self, lease: int) -> int | None:
        await anyio.lowlevel.checkpoint()
        self._expire()
        found = self._leases.get(lease)
        if found is None:
            return None
        return max(0, math.ceil(found.expires - anyio.current_time()))

    async def lease_keys(self, lease: int) -> list[str] | None:
        await anyio.lowlevel.checkpoint()
        self._expire()
        found = self._leases.get(lease)
        return None if found is None else sorted(found.keys)

    async def revoke(self, lease: int) -> bool:
        await anyio.lowlevel.checkpoint()
        self._expire()
        if lease not in self._leases:
            return False
        self._drop_lease(lease)
        return True

    async def status(self) -> StoreStatus:
        await anyio.lowlevel.checkpoint()
        self._expire()
        used = self._live + self._history_bytes
        return StoreStatus(self._revision, self._file, used, (NOSPACE,) if self._full else ())

    async def compact(self, revision: int) -> None:
        check_revision(revision)
        await anyio.lowlevel.checkpoint()
        self._expire()
        if revision > self._revision:
            raise StoreError(
                f"cannot compact at revision {revision}: it is a future revision "
                f"(the store is at {self._revision})"
            )
        self._compacted = max(self._compacted, revision)
        while self._history and self._history[0][0] <= self._compacted:
            self._history_bytes -= self._history.popleft()[1]

    async def defragment(self) -> None:
        await anyio.lowlevel.checkpoint()
        self._file = self._live + self._history_bytes

    async def disarm(self) -> None:
        await anyio.lowlevel.checkpoint()
        self._full = False

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()
