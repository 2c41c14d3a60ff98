"""The first packet: parsing, the two checksum schemes, the timestamp window.

Pure functions, no I/O: bytes or text in, a :class:`FirstPacket` or an
:class:`AuthError` (with the close code to send) out. Clients use :func:`sign`.

The signing text is every field but ``check_sum``, keys sorted by code point, written
``key1value1key2value2...``; a value is written as it appears in JSON when it is a
string, in decimal when it is an integer. Scheme ``sha256`` (the seed's) is
``sha256(signing_text + private_key)``; scheme ``hmac-sha256`` is
``HMAC-SHA256(private_key, signing_text)``. Both are compared as lowercase hex.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._messages import Key
from ._codes import ClientCloseCode

REQUIRED = ("open_id", "server_id", "timestamp", "check_sum")
MS_THRESHOLD = 100_000_000_000  # a timestamp this large is in milliseconds (year 5138 in s)


class AuthError(Exception):
    """The first packet was refused; ``code`` is the close code to send, ``str()`` the
    reason (safe to log and to send: it never holds the key)."""

    def __init__(self, code: ClientCloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class FirstPacket:
    """An authenticated first packet. ``fields`` holds every signed field as text."""

    open_id: str
    server_id: str
    timestamp: float  # seconds since the epoch
    actor_type: str | None
    actor_id: Key | None
    fields: dict[str, str]
    digest: bytes = b""  # the checksum as bytes: the packet's identity for replay checks


def _text(name: str, value: Any) -> str:
    if type(value) is str:
        return value
    if type(value) is int:
        return str(value)
    raise AuthError(
        ClientCloseCode.BAD_FIELD,
        f"field {name!r} must be a string or an integer, got {type(value).__name__}",
    )


def signing_text(fields: Mapping[str, Any]) -> str:
    """``key1value1key2value2...`` over every field but check_sum, keys by code point."""
    return "".join(k + _text(k, fields[k]) for k in sorted(fields) if k != "check_sum")


def seed_checksum(fields: Mapping[str, Any], private_key: str) -> str:
    """The seed's scheme: SHA-256 hex of the signing text followed by the key."""
    return hashlib.sha256((signing_text(fields) + private_key).encode()).hexdigest()


def hmac_checksum(fields: Mapping[str, Any], private_key: str) -> str:
    """HMAC-SHA256 hex of the signing text, keyed by the private key."""
    return hmac.new(private_key.encode(), signing_text(fields).encode(), hashlib.sha256).hexdigest()


def checksum(fields: Mapping[str, Any], private_key: str, mode: str = "sha256") -> str:
    if mode == "sha256":
        return seed_checksum(fields, private_key)
    if mode == "hmac-sha256":
        return hmac_checksum(fields, private_key)
    raise ValueError(f"unknown checksum mode {mode!r}: use 'sha256' or 'hmac-sha256'")


def sign(fields: Mapping[str, Any], private_key: str, mode: str = "sha256") -> dict[str, Any]:
    """``fields`` with its ``check_sum`` added: what a client sends as its first packet."""
    packet = {k: v for k, v in fields.items() if k != "check_sum"}
    packet["check_sum"] = checksum(packet, private_key, mode)
    return packet


def _timestamp(value: Any) -> float:
    if type(value) is str and value.isascii() and value.isdigit() and len(value) <= 20:
        value = int(value)
    if type(value) is not int or value < 0:
        raise AuthError(
            ClientCloseCode.BAD_FIELD,
            "field 'timestamp' must be a whole number of seconds (or milliseconds) since the epoch",
        )
    return value / 1000 if value >= MS_THRESHOLD else float(value)


def check_first_packet(
    data: str | bytes,
    *,
    private_key: str,
    mode: str,
    now: float,
    window: float,
    max_size: int,
) -> FirstPacket:
    """Parse and authenticate a first packet; AuthError (code, reason) if refused.

    The checks run in this order: size, text and JSON object, required fields and their
    types, the checksum, then the timestamp window. Replays are the gateway's to refuse
    (:class:`koala.gateway._replay.ReplayCache`, keyed by ``FirstPacket.digest``).
    """
    if isinstance(data, bytes):
        raise AuthError(
            ClientCloseCode.BAD_FIRST_PACKET, "the first packet must be a text frame (JSON)"
        )
    if len(data) > max_size or len(data.encode("utf-8", "surrogatepass")) > max_size:
        raise AuthError(
            ClientCloseCode.MESSAGE_TOO_BIG,
            f"the first packet is larger than {max_size} bytes",
        )
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise AuthError(
            ClientCloseCode.BAD_FIRST_PACKET, "the first packet is not valid JSON"
        ) from None
    if not isinstance(obj, dict):
        raise AuthError(
            ClientCloseCode.BAD_FIRST_PACKET,
            f"the first packet must be a JSON object, got a JSON {type(obj).__name__}",
        )
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise AuthError(
            ClientCloseCode.BAD_FIELD, f"the first packet lacks {', '.join(map(repr, missing))}"
        )
    given = obj["check_sum"]
    if type(given) is not str:
        raise AuthError(ClientCloseCode.BAD_FIELD, "field 'check_sum' must be a hex string")
    fields = {k: _text(k, v) for k, v in obj.items() if k != "check_sum"}
    if not fields["open_id"]:
        raise AuthError(ClientCloseCode.BAD_FIELD, "field 'open_id' must not be empty")
    timestamp = _timestamp(obj["timestamp"])
    actor_type, actor_id = obj.get("actor_type"), obj.get("actor_id")
    if (actor_type is None) != (actor_id is None):
        raise AuthError(
            ClientCloseCode.BAD_FIELD, "'actor_type' and 'actor_id' come together, or neither"
        )
    if actor_type is not None and (type(actor_type) is not str or not actor_type):
        raise AuthError(ClientCloseCode.BAD_FIELD, "field 'actor_type' must be a non-empty string")
    if actor_id is not None and type(actor_id) not in (str, int):
        raise AuthError(ClientCloseCode.BAD_FIELD, "field 'actor_id' must be a string or integer")
    expected = checksum(fields, private_key, mode)
    if not hmac.compare_digest(expected.encode(), given.strip().lower().encode("ascii", "replace")):
        raise AuthError(ClientCloseCode.BAD_CHECKSUM, f"wrong check_sum (scheme {mode})")
    if abs(now - timestamp) > window:
        raise AuthError(
            ClientCloseCode.STALE_TIMESTAMP,
            f"timestamp {obj['timestamp']} is {now - timestamp:+.0f} s from the gateway's "
            f"clock (window {window:g} s)",
        )
    return FirstPacket(
        open_id=fields["open_id"],
        server_id=fields["server_id"],
        timestamp=timestamp,
        actor_type=actor_type,
        actor_id=actor_id,
        fields=fields,
        digest=bytes.fromhex(expected),
    )
