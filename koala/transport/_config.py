"""Transport settings: a frozen record validated on construction."""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass, fields
from typing import Any

from .._errors import ConfigError
from .._tls import TLSConfig
from ..wire._protocol import MAX_ID_BYTES, MIN_FRAME_SIZE, MIN_SECRET_SIZE
from ..wire._wire import DEFAULT_MAX_FRAME_SIZE, MAX_FRAME_LIMIT

SECRET_ENV = "KOALA_CLUSTER_SECRET"
CLUSTER_ENV = "KOALA_CLUSTER_ID"

_INTS = (
    "max_frame_size",
    "max_in_flight",
    "write_queue_size",
    "max_connections",
    "max_unauthenticated",
    "read_size",
)


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """Settings of a node's transport. Bad values fail here, at start.

    - ``cluster_id``: peers of another cluster are refused in the handshake.
    - ``node_id``: this node's name in handshakes and errors ("" = a random one).
    - ``secret``: the cluster secret (str or bytes, at least 16 bytes). Without one (and
      without mutual TLS), a listener accepts loopback peers only and cannot bind a
      non-loopback address.
    - ``tls``: TLS on host links (``koala._tls.TLSConfig``; None: plain TCP). With a
      certificate the listener demands one from every peer, signed by ``tls.ca``
      (mutual TLS), and the dialler presents its own and checks the listener's against
      ``tls.ca`` and the host part of the address. It accompanies the secret's
      handshake when both are set; alone, it is proof enough to bind beyond loopback.
    - ``max_frame_size``: the largest frame sent or accepted once a peer is proven
      (bytes); before, frames are bounded by ``MAX_HANDSHAKE_FRAME`` (4 KiB).
    - ``max_in_flight``: most requests outstanding on one connection, each way.
    - ``write_queue_size``: most frames queued for writing on one connection.
    - ``max_connections``: most inbound connections from proven peers a listener holds.
    - ``max_unauthenticated``: most inbound connections still in their (TLS and Koala)
      handshake; a new one beyond it displaces the oldest of them (see
      ``Transport``), never a proven peer's.
    - ``handshake_timeout``: seconds an inbound connection has to finish its
      handshake (TLS included), and a dialler to finish its side.
    - ``connect_timeout``: seconds to open a TCP connection.
    - ``heartbeat_interval``: a PING is sent this often; ``heartbeat_timeout``: a peer
      from which no whole frame arrived this long is declared dead and its pending
      calls fail (bytes of a frame that never ends do not count; the check runs every
      interval, so it fires within one interval past the timeout).
    - ``reconnect_min`` / ``reconnect_max``: backoff between failed connects to a host.
    - ``read_size``: bytes asked of the socket per read.
    - ``direct_io``: on asyncio (and uvloop), a channel drives its socket's transport
      itself once the handshake is done, rather than through anyio's stream (fewer
      trips through the event loop per frame; see ``koala.transport._pipe``). False
      keeps the stream, e.g. to wrap it in a test. TLS channels always keep it.
    """

    cluster_id: str = "koala"
    node_id: str = ""
    secret: bytes | None = None
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_in_flight: int = 10_000
    write_queue_size: int = 10_000
    max_connections: int = 1_024
    max_unauthenticated: int = 64
    handshake_timeout: float = 5.0
    connect_timeout: float = 5.0
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 10.0
    reconnect_min: float = 0.05
    reconnect_max: float = 5.0
    read_size: int = 65_536
    direct_io: bool = True
    tls: TLSConfig | None = None

    def __post_init__(self) -> None:
        secret: Any = self.secret
        if isinstance(secret, str):
            secret = secret.encode()
            object.__setattr__(self, "secret", secret)
        if secret is not None:
            if not isinstance(secret, bytes):
                raise ConfigError(f"TransportConfig.secret must be str or bytes, got {secret!r}")
            if len(secret) < MIN_SECRET_SIZE:
                raise ConfigError(
                    f"the cluster secret must be at least {MIN_SECRET_SIZE} bytes; make one "
                    "with: openssl rand -hex 32"
                )
        if not isinstance(self.cluster_id, str):
            raise ConfigError("TransportConfig.cluster_id must be a string")
        if not isinstance(self.node_id, str):
            raise ConfigError("TransportConfig.node_id must be a string")
        if not self.node_id:
            object.__setattr__(self, "node_id", f"node-{secrets.token_hex(6)}")
        for name in ("cluster_id", "node_id"):
            size = len(getattr(self, name).encode("utf-8", "surrogatepass"))
            if size > MAX_ID_BYTES:
                raise ConfigError(
                    f"TransportConfig.{name} takes {size} bytes in UTF-8; at most "
                    f"{MAX_ID_BYTES} fit in a handshake: choose a shorter one"
                )
        tls: Any = self.tls
        if tls is not None and not isinstance(tls, TLSConfig):
            raise ConfigError(f"TransportConfig.tls must be a TLSConfig or None, got {tls!r}")
        if tls is not None and tls.cert is None and tls.ca is None:
            object.__setattr__(self, "tls", None)  # TLSConfig() with no files: plain TCP
        elif tls is not None and tls.cert is not None and tls.ca is None:
            raise ConfigError(
                "TLS on host links is mutual: every node checks its peers' certificates "
                "against the cluster's CA, so set --tls-ca (KOALA_TLS_CA) beside "
                "--tls-cert and --tls-key"
            )
        if not isinstance(self.direct_io, bool):
            raise ConfigError(
                f"TransportConfig.direct_io must be True or False, got {self.direct_io!r}"
            )
        for f in fields(self):
            if f.name in ("cluster_id", "node_id", "secret", "direct_io", "tls"):
                continue
            value = getattr(self, f.name)
            integral = f.name in _INTS
            if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
                kind = "an integer" if integral else "a number"
                raise ConfigError(f"TransportConfig.{f.name} must be {kind}, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(
                    f"TransportConfig.{f.name} must be a positive number, got {value!r}"
                )
        if not MIN_FRAME_SIZE <= self.max_frame_size <= MAX_FRAME_LIMIT:
            raise ConfigError(
                f"TransportConfig.max_frame_size must be from {MIN_FRAME_SIZE} to "
                f"{MAX_FRAME_LIMIT} bytes, got {self.max_frame_size}"
            )
        if self.heartbeat_interval >= self.heartbeat_timeout:
            raise ConfigError(
                "TransportConfig.heartbeat_interval must be shorter than heartbeat_timeout "
                f"(got {self.heartbeat_interval} and {self.heartbeat_timeout})"
            )
        if self.reconnect_min > self.reconnect_max:
            raise ConfigError("TransportConfig.reconnect_min must not exceed reconnect_max")

    @property
    def proves_peers(self) -> bool:
        """Whether a listener makes every peer prove itself: with the cluster secret, or
        with a certificate of the cluster's CA (mutual TLS). Only then may it bind, and
        accept peers, beyond loopback."""
        return self.secret is not None or (self.tls is not None and self.tls.enabled)

    @classmethod
    def from_env(cls, **overrides: Any) -> TransportConfig:
        """Settings from KOALA_CLUSTER_SECRET, KOALA_CLUSTER_ID and KOALA_TLS_CERT/KEY/CA
        (``TLSConfig.from_env``), then ``overrides``."""
        values: dict[str, Any] = {"tls": TLSConfig.from_env()}
        secret = os.environ.get(SECRET_ENV)
        if secret:
            values["secret"] = secret
        cluster = os.environ.get(CLUSTER_ENV)
        if cluster:
            values["cluster_id"] = cluster
        values.update(overrides)
        return cls(**values)
