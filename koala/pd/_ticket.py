"""Placement tickets: the PD's proof, checkable by the named host alone, that it placed
an actor there at a given revision.

A ticket is 32 bytes: the server id and the position's etcd revision (two unsigned
64-bit big-endian integers), then the first 16 bytes of an HMAC-SHA256, keyed with the
placement key the host chose when it registered (known to the host and the PDs only),
over a domain string, the actor's type and id and those two numbers. A caller forwards
the ticket its lookup returned with its request (REQUEST's ``placement``), so the host
can serve a first call without asking the PD again, and a peer cannot forge one.
docs/pd.md ("Fencing") says why a valid ticket can be trusted, and when it cannot.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

TICKET_SIZE = 32
PLACEMENT_KEY_SIZE = 32  # bytes of a host's placement key (sent as 64 hex digits)
_TAG_SIZE = 16
_HEAD = struct.Struct(">QQ")
_DOMAIN = b"koala-placement-ticket-v1\0"


def _tag(key: bytes, actor_type: str, actor_id: str, head: bytes) -> bytes:
    message = b"".join((_DOMAIN, actor_type.encode(), b"\0", actor_id.encode(), b"\0", head))
    return hmac.new(key, message, hashlib.sha256).digest()[:_TAG_SIZE]


def make_ticket(key: bytes, actor_type: str, actor_id: str, server_id: int, revision: int) -> bytes:
    """The ticket for (actor_type, actor_id) placed on ``server_id`` at ``revision``."""
    head = _HEAD.pack(server_id, revision)
    return head + _tag(key, actor_type, actor_id, head)


def ticket_server(ticket: bytes) -> int:
    """The server id a ticket names (0 for anything that is not a ticket); unverified."""
    if len(ticket) != TICKET_SIZE:
        return 0
    server_id: int = _HEAD.unpack_from(ticket)[0]
    return server_id


def check_ticket(
    key: bytes, ticket: bytes, actor_type: str, actor_id: str
) -> tuple[int, int] | None:
    """(server id, revision) of a ticket made with ``key`` for this actor, else None."""
    if len(ticket) != TICKET_SIZE or not key:
        return None
    head = ticket[: _HEAD.size]
    if not hmac.compare_digest(ticket[_HEAD.size :], _tag(key, actor_type, actor_id, head)):
        return None
    server_id, revision = _HEAD.unpack(head)
    return server_id, revision
