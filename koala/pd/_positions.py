"""The positions a host holds, and the ones it is giving back: pure state, no I/O.

A position (an actor placed on this host at an etcd revision) lives in etcd from its
placement until this host deletes it, which it does once the activation ends, or until
the host's lease ends. :class:`OwnPositions` is the host's record of that life cycle,
which the directory (:class:`~koala.pd._directory.ClusterDirectory`) drives:

``own`` (resolved or claimed) -> ``ended`` (the activation left the catalog; waits to be
sent) -> ``take_batch`` (sent to the PD as a guarded delete) -> ``sent`` (deleted, or
found gone). A position whose activation comes back before its release is sent is taken
back (``take_back``) and never deleted.

Every position ever given back is remembered as *released*, so that a request naming it
(a stale cache, a replayed ticket) is not trusted: ``stale(ident, revision)`` holds for
the revisions released here. The memory of releases is bounded: when an entry is
dropped, ``watermark`` rises to its revision, and every revision at or below the
watermark counts as released. etcd's revisions only increase, so positions placed after
that are trusted again; older ones make the host ask the PD, which is always safe.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from .._messages import Key

# (actor type, key as text): one position, whether the actor is called with 5 or "5"
Ident = tuple[str, Key]

RELEASED_MEMORY = 100_000  # releases remembered one by one before the watermark rises


class OwnPositions:
    """This host's positions, by state: owned, ended (release not sent), being sent."""

    __slots__ = ("_ended", "_owned", "_released", "_sending", "memory", "watermark")

    def __init__(self, memory: int = RELEASED_MEMORY) -> None:
        self.memory = memory
        self._owned: dict[Ident, int] = {}
        self._ended: dict[Ident, int] = {}
        self._sending: dict[Ident, int] = {}
        self._released: OrderedDict[Ident, int] = OrderedDict()
        self.watermark = 0

    def __len__(self) -> int:
        return len(self._owned)

    @property
    def unreleased(self) -> int:
        """Positions whose activation ended and whose delete is not confirmed yet."""
        return len(self._ended) + len(self._sending)

    def owned(self, ident: Ident) -> int | None:
        """The revision of the position this host holds for ``ident``, if any."""
        return self._owned.get(ident)

    def stale(self, ident: Ident, revision: int) -> bool:
        """True if the position (ident, revision) was given back here (or may have been)."""
        return revision <= self.watermark or self.given_back(ident, revision)

    def given_back(self, ident: Ident, revision: int) -> bool:
        """True if this host remembers releasing (ident, revision) or a newer position."""
        return self._released.get(ident, 0) >= revision

    def sending(self, ident: Ident) -> bool:
        return ident in self._sending

    def own(self, ident: Ident, revision: int) -> None:
        """This host holds the position (ident, revision) now: the PD said so, with no
        release of ``ident`` unconfirmed meanwhile, or a ticket that is not stale did."""
        self._owned[ident] = revision

    def ended(self, ident: Ident) -> bool:
        """The activation of ``ident`` ended: its position waits to be released. False if
        this host held no position for it."""
        revision = self._owned.pop(ident, None)
        if revision is None:
            return False
        self._ended[ident] = revision
        self._released[ident] = revision
        self._released.move_to_end(ident)
        while len(self._released) > self.memory:
            _, dropped = self._released.popitem(last=False)
            self.watermark = max(self.watermark, dropped)
        return True

    def disown(self, ident: Ident, revision: int) -> bool:
        """Give back a position this host holds in the store but never took (the first
        call it was placed for never came): released, as if its activation had ended.
        False, doing nothing, if the host knows the actor in any state."""
        if ident in self._owned or ident in self._ended or ident in self._sending:
            return False
        if self.stale(ident, revision):
            return False  # given back already (its delete may not have landed yet)
        self._owned[ident] = revision
        return self.ended(ident)

    def take_back(self, ident: Ident, revision: int | None = None) -> bool:
        """Keep a position whose release was not sent yet (its actor is active here
        again); ``revision``, if given, must be the one waiting. True if taken back."""
        waiting = self._ended.get(ident)
        if waiting is None or (revision is not None and revision != waiting):
            return False
        del self._ended[ident]
        if self._released.get(ident) == waiting:
            del self._released[ident]
        self._owned[ident] = waiting  # never deleted: it is live and still ours
        return True

    def take_batch(self, limit: int, active: Callable[[Ident], bool]) -> list[tuple[Ident, int]]:
        """Up to ``limit`` ended positions to release now, marked as being sent. Those
        whose actor is ``active`` again are taken back instead."""
        batch: list[tuple[Ident, int]] = []
        while self._ended and len(batch) < limit:
            ident = next(iter(self._ended))
            if active(ident) and self.take_back(ident):
                continue
            revision = self._ended.pop(ident)
            self._sending[ident] = revision
            batch.append((ident, revision))
        return batch

    def sent(self, batch: list[tuple[Ident, int]]) -> None:
        """The PD confirmed these releases (deleted, or already gone)."""
        for ident, revision in batch:
            if self._sending.get(ident) == revision:
                del self._sending[ident]

    def clear(self) -> None:
        """The host's lease ended (fenced, or left): every position went with it."""
        self._owned.clear()
        self._ended.clear()
        self._sending.clear()
        self._released.clear()
        self.watermark = 0
