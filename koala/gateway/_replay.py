"""Replay protection: the first packets a gateway accepted within the timestamp window.

Sans-IO: the gateway passes the clock in. A first packet is accepted only while its
timestamp is within ``window`` of the gateway's clock, so a copy of it can be replayed
until ``timestamp + window`` and never after: that is when its entry expires. Only
packets that passed the checksum enter the cache (a client without the key cannot
fill it). When the cache is full of entries still inside the window, new first packets
are refused (fail closed) rather than an entry forgotten that could then be replayed.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from ._auth import AuthError
from ._codes import ClientCloseCode

MAX_FIRST_PACKETS_SEEN = 100_000  # entries; about 18 MB when full (measured)
DIGEST_SIZE = 16  # bytes of a packet's checksum kept as its identity (128 bits)


@dataclass(frozen=True, slots=True)
class ReplayCacheStatistics:
    size: int  # entries held (packets still replayable)
    capacity: int
    replays: int  # first packets refused as replays
    full: int  # first packets refused because the cache was full


class ReplayCache:
    """Digests of accepted first packets, each until its packet would be stale anyway."""

    def __init__(self, capacity: int = MAX_FIRST_PACKETS_SEEN) -> None:
        if capacity <= 0:
            raise ValueError(f"a replay cache needs a positive capacity, got {capacity}")
        self.capacity = capacity
        self._seen: set[bytes] = set()
        self._expiries: list[tuple[float, bytes]] = []  # a heap, earliest expiry first
        self._replays = 0
        self._full = 0

    def __len__(self) -> int:
        return len(self._seen)

    def statistics(self) -> ReplayCacheStatistics:
        return ReplayCacheStatistics(len(self._seen), self.capacity, self._replays, self._full)

    def admit(self, digest: bytes, expires: float, now: float) -> None:
        """Record a first packet seen at ``now`` that is replayable until ``expires``;
        AuthError (REPLAYED, or REPLAY_CACHE_FULL) if it must be refused."""
        self.expire(now)
        key = digest[:DIGEST_SIZE]
        if key in self._seen:
            self._replays += 1
            raise AuthError(
                ClientCloseCode.REPLAYED,
                "this first packet was already used: sign a new one for every connection "
                "(a fresh timestamp in milliseconds, or a nonce field)",
            )
        if len(self._seen) >= self.capacity:
            self._full += 1
            raise AuthError(
                ClientCloseCode.REPLAY_CACHE_FULL,
                "the gateway accepts no new sessions for now (too many logins within its "
                "timestamp window); try again in a few seconds",
            )
        self._seen.add(key)
        heapq.heappush(self._expiries, (expires, key))

    def expire(self, now: float) -> None:
        """Forget the packets whose timestamp is out of the window by ``now``."""
        heap, seen = self._expiries, self._seen
        while heap and heap[0][0] < now:
            seen.discard(heapq.heappop(heap)[1])
