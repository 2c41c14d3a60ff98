"""Gateway settings: a frozen record validated on construction."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any

from .._errors import ConfigError
from ._replay import MAX_FIRST_PACKETS_SEEN

KEY_ENV = "KOALA_GATEWAY_KEY"
DEV_KEY = "koala-dev-key"  # the documented development key: loopback only
# A first packet may be this far off the gateway's clock, either way. Short, because a
# copy of a packet is replayable to another gateway for that long (each gateway keeps
# its own replay cache), and because the cache holds every packet accepted within it:
# at 60 s, MAX_FIRST_PACKETS_SEEN (100,000) allows 1,666 new sessions a second before it
# fails closed (300 s: 333). NTP-synced clients are within a second; 60 s leaves room.
DEFAULT_TIMESTAMP_WINDOW = 60.0
CHECKSUM_MODES = ("sha256", "hmac-sha256")
_INTS = (
    "max_frame_size",
    "max_first_packet",
    "max_connections",
    "send_queue_size",
    "burst",
    "unacked_frames",
    "unacked_bytes",
    "replay_cache_size",
)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Settings of a gateway. Bad values fail here, at start, with a clear error.

    - ``private_key``: the key first packets are signed with (never logged, never sent).
    - ``checksum``: ``"sha256"`` (the seed's scheme: SHA-256 of the signing text followed
      by the key) or ``"hmac-sha256"`` (HMAC-SHA256 of the signing text keyed by the key).
    - ``timestamp_window``: a first packet's timestamp may be this many seconds off the
      gateway's clock, either way (``DEFAULT_TIMESTAMP_WINDOW``, 60 s).
    - ``replay_cache_size``: most first packets remembered within the window (a replay
      of one is refused with 4006; a full cache refuses new packets with 4007).
    - ``auth_timeout``: seconds a client has to send its first packet.
    - ``max_first_packet`` / ``max_frame_size``: bytes.
    - ``rate`` / ``burst``: the token bucket of each client (frames per second, and the
      most frames at once).
    - ``idle_timeout``: a client that sends nothing for this long is closed.
    - ``max_connections``: most clients at once.
    - ``send_queue_size``: frames queued toward one client; a client that lets it fill up
      (it does not read) is closed.
    - ``account_method``: the method of the account interface that names a client's
      actor (the interface itself is given to the link; ``IAccount`` by default);
      ``account_actor_type``: its actor type, for a cluster gateway, which does not
      import the application.
    - ``bind_timeout``: seconds to find an actor and bind the session (the account call
      included); ``failover_timeout``: seconds to re-bind a session whose host died.
    - ``unacked_frames`` / ``unacked_bytes``: a cluster gateway keeps each session's
      frames until the host acknowledges them (their turn ran), to send them again after
      a failover; a client that gets this far ahead of its actor is closed (4012).
    """

    private_key: str
    checksum: str = "sha256"
    timestamp_window: float = DEFAULT_TIMESTAMP_WINDOW
    auth_timeout: float = 10.0
    max_first_packet: int = 4096
    max_frame_size: int = 65536
    rate: float = 200.0
    burst: int = 400
    idle_timeout: float = 300.0
    max_connections: int = 10_000
    send_queue_size: int = 256
    account_method: str = "find_actor"
    account_actor_type: str = "Account"
    bind_timeout: float = 10.0
    failover_timeout: float = 30.0
    unacked_frames: int = 1024
    unacked_bytes: int = 1024 * 1024
    replay_cache_size: int = MAX_FIRST_PACKETS_SEEN

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, str) or not self.private_key:
            raise ConfigError(
                f"GatewayConfig.private_key must be a non-empty string; set {KEY_ENV} (the key "
                "your clients sign their first packet with)"
            )
        if self.checksum not in CHECKSUM_MODES:
            raise ConfigError(
                f"GatewayConfig.checksum must be one of {', '.join(CHECKSUM_MODES)}, "
                f"got {self.checksum!r}"
            )
        for name in ("account_method", "account_actor_type"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"GatewayConfig.{name} must be a non-empty string")
        for f in fields(self):
            if f.type not in ("float", "int"):
                continue
            value = getattr(self, f.name)
            integral = f.name in _INTS
            if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
                kind = "an integer" if integral else "a number"
                raise ConfigError(f"GatewayConfig.{f.name} must be {kind}, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(
                    f"GatewayConfig.{f.name} must be a positive number, got {value!r}"
                )
        if self.max_first_packet > self.max_frame_size:
            raise ConfigError("GatewayConfig.max_first_packet must not exceed max_frame_size")
        if self.unacked_bytes < self.max_frame_size:
            raise ConfigError("GatewayConfig.unacked_bytes must be at least max_frame_size")

    @classmethod
    def from_env(cls, **overrides: Any) -> GatewayConfig:
        """Settings with the key from KOALA_GATEWAY_KEY, then ``overrides``."""
        values: dict[str, Any] = {}
        key = os.environ.get(KEY_ENV)
        if key:
            values["private_key"] = key
        values.update(overrides)
        if "private_key" not in values:
            raise ConfigError(
                f"the gateway needs the key clients sign their first packet with: set {KEY_ENV}"
            )
        return cls(**values)
