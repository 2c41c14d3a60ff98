"""The records the PD and its clients share: a host, the membership, a position.

The host record is defined once. :class:`Member` is a host as anyone may see it (what
the PD answers in a membership, and the client's view of it); :class:`HostInfo` is the
same record as the PD stores it, with the secrets no answer ever carries (the host's
placement key, its owner key's hash) and the leases its positions are spread over.
``Member.to_json`` writes only the public fields, even for a ``HostInfo``, so a secret
can leave the PD only through :meth:`HostInfo.stored_json` (into the store).

Pure data: no I/O, no import of the client or the server.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

DEFAULT_HOST_TTL = 15
# leases a host's positions may be spread over besides its registration's (grow_leases)
MAX_POSITION_LEASES = 256


@dataclass(slots=True)
class Member:
    """A host as the PD reports it (the original PD's fields, then Koala's additions)."""

    server_id: int
    load: int = 0
    start_time: int = 0  # when the PD registered it, ms since the epoch
    ttl: int = 0
    address: str = ""
    services: dict[str, str] = field(default_factory=dict)  # actor type -> implementation
    desc: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    lease_id: int = 0
    activations: int = 0
    renew_time: int = 0  # the last keep-alive, ms since the epoch

    def to_json(self) -> dict[str, Any]:
        """The public fields only (a HostInfo's secrets are not among them)."""
        return {name: getattr(self, name) for name in _MEMBER_FIELDS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Member:
        """The member ``data`` describes; fields this version does not know are ignored."""
        return cls(**{k: v for k, v in data.items() if k in _MEMBER_FIELDS})


_MEMBER_FIELDS = tuple(f.name for f in fields(Member))

MAX_REPORTED_TYPES = 1024  # actor types one host reports activations of


@dataclass(frozen=True, slots=True)
class HostStats:
    """What a host reports with each renewal for the cluster page (PD memory only):
    calls it served since it started, their total time, its activations by type."""

    calls: int = 0
    call_seconds: float = 0.0
    activations_by_type: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class HostInfo(Member):
    """A host as registered in the PD's store: the member, and what only the PD sees."""

    ttl: int = DEFAULT_HOST_TTL
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

    def stored_json(self) -> dict[str, Any]:
        """Every field, secrets included: the record as the store keeps it."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostInfo:
        """The record as stored (``stored_json``); unknown fields are ignored."""
        return cls(**{k: v for k, v in data.items() if k in _HOST_FIELDS})


_HOST_FIELDS = frozenset(f.name for f in fields(HostInfo))


@dataclass(frozen=True, slots=True)
class Membership:
    """The hosts of the cluster as a PD answered them: the whole table (``full``), or
    the hosts added and the server ids ``removed`` since the version the caller sent;
    ``version`` is what to send next time. ``events``: adds and removes the PD saw
    recently (with the whole table only)."""

    hosts: dict[int, Member]
    events: list[dict[str, Any]]
    now: int  # the PD's clock, ms since the epoch
    version: int = 0
    full: bool = True
    removed: list[int] = field(default_factory=list)
    mean_activations: float = 0.0  # per host, over the whole cluster (rebalancing)
    min_activations: int = 0


@dataclass(frozen=True, slots=True)
class ActorPosition:
    """Where an actor lives, as the PD answered a host."""

    actor_type: str
    actor_id: str
    server_id: int
    server_address: str
    create_time: int
    created: bool = False
    revision: int = 0  # the position's revision in the store (what a release names)
    ticket: bytes = b""  # the named host's proof of this answer (koala.pd._ticket)
