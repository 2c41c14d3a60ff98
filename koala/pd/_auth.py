"""Who may ask the PD what: signed requests, owner keys, a replay cache, rate limits.

Pure code, no I/O and no framework: the client (:class:`~koala.pd.PDClient`) signs with
it, the PD's HTTP API (``koala.pd.server._api``) checks with it. docs/pd.md, "Authentication",
is the specification, with a worked example (tests/test_pd_auth.py checks it).

- **Request signature** (with a cluster secret): ``Authorization: Koala-HMAC
  ts=MS,nonce=HEX32,sig=HEX64`` where ``sig`` is HMAC-SHA256, keyed by
  HMAC-SHA256(secret, ``koala-pd-request/1``), over the canonical string
  (:func:`canonical`): the label, the method, the request target (path and query, as
  sent), the timestamp, the nonce and the SHA-256 of the body, joined by ``\\n``.
- **Owner key** (always): a host sends ``Koala-Owner: HEX64``, a random 32-byte key of
  its own, at registration and with every later request naming its server id; the
  PD keeps only the key's SHA-256 (in the host record in etcd) and compares.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from .._errors import ConfigError

SECRET_ENV = "KOALA_CLUSTER_SECRET"
SCHEME = "Koala-HMAC"
LABEL = b"koala-pd-request/1"  # what the request key is derived with (domain separation)
AUTH_HEADER = "authorization"
OWNER_HEADER = "koala-owner"
MIN_SECRET_SIZE = 16  # bytes, as for host links (koala.transport)
NONCE_SIZE = 16  # bytes; sent as 32 hex digits
OWNER_KEY_SIZE = 32  # bytes; sent as 64 hex digits
DEFAULT_WINDOW = 30.0  # seconds a timestamp may be off the PD's clock, either way
# Nonces remembered (each for twice the window: as long as its timestamp can be
# accepted); about 200 bytes each. Full within the window, the PD refuses signed
# requests (503 replay_cache_full) rather than forget a nonce that could be replayed.
DEFAULT_MAX_NONCES = 100_000
DEFAULT_MAX_BODY = 4 * 1024 * 1024  # bytes of a request body; beyond, 413
# Registrations and new server ids: a token bucket each (per second, and the burst).
DEFAULT_REGISTER_RATE = 20.0
DEFAULT_REGISTER_BURST = 40

_AUTHORIZATION = re.compile(
    r"^Koala-HMAC ts=(0|[1-9][0-9]{0,15}),nonce=([0-9a-f]{32}),sig=([0-9a-f]{64})$"
)
_OWNER = re.compile(r"^[0-9a-f]{64}$")


class AuthError(Exception):
    """A request the PD refuses before reading it: ``status``, ``code``, ``message``
    (the JSON body of the answer), ``retry_after`` (seconds, for 429/503)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def _secret_bytes(secret: Any) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes):
        raise ConfigError(f"the cluster secret must be str or bytes, got {type(secret).__name__}")
    if len(secret) < MIN_SECRET_SIZE:
        raise ConfigError(
            f"the cluster secret must be at least {MIN_SECRET_SIZE} bytes; make one with: "
            "openssl rand -hex 32"
        )
    return secret


def request_key(secret: bytes | str) -> bytes:
    """The key requests are signed with: HMAC-SHA256(secret, ``koala-pd-request/1``), so
    the cluster secret itself keys nothing else the same way (host links use it too)."""
    return hmac.new(_secret_bytes(secret), LABEL, hashlib.sha256).digest()


def canonical(method: str, target: bytes, ts: int, nonce: str, body: bytes) -> bytes:
    """What is signed: label, method, target (path and ``?query`` as sent), timestamp
    (decimal ms), nonce (hex) and hex SHA-256 of the body, joined by ``\\n`` (no
    trailing newline). All of it is ASCII (the target is sent percent-encoded)."""
    return b"\n".join(
        [
            LABEL,
            method.upper().encode("ascii"),
            target,
            str(ts).encode("ascii"),
            nonce.encode("ascii"),
            hashlib.sha256(body).hexdigest().encode("ascii"),
        ]
    )


def signature(key: bytes, method: str, target: bytes, ts: int, nonce: str, body: bytes) -> str:
    """Hex HMAC-SHA256 of :func:`canonical` under ``key`` (:func:`request_key`)."""
    return hmac.new(key, canonical(method, target, ts, nonce, body), hashlib.sha256).hexdigest()


def authorization(
    key: bytes,
    method: str,
    target: bytes,
    body: bytes,
    *,
    ts: int | None = None,
    nonce: str | None = None,
) -> str:
    """The ``Authorization`` header of one request: a fresh nonce and the time now,
    unless given (test vectors)."""
    if ts is None:
        ts = int(time.time() * 1000)
    if nonce is None:
        nonce = secrets.token_hex(NONCE_SIZE)
    sig = signature(key, method, target, ts, nonce, body)
    return f"{SCHEME} ts={ts},nonce={nonce},sig={sig}"


def new_owner_key() -> bytes:
    return secrets.token_bytes(OWNER_KEY_SIZE)


def owner_hash(key: bytes) -> str:
    """What the PD keeps of an owner key: hex SHA-256 (the key itself is never stored)."""
    return hashlib.sha256(key).hexdigest()


def parse_owner(value: str | None) -> bytes:
    """The owner key in a ``Koala-Owner`` header; b"" when absent or malformed."""
    if value is None or not _OWNER.match(value):
        return b""
    return bytes.fromhex(value)


def owner_matches(stored: str, key: bytes) -> bool:
    """True if ``key`` is the owner key whose hash is ``stored`` (constant time)."""
    if not stored or len(key) != OWNER_KEY_SIZE:
        return False
    return hmac.compare_digest(stored, owner_hash(key))


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """How the PD's API guards itself. Validated on construction.

    - ``secret``: the cluster secret (str or bytes, >= 16 bytes). With it every request
      must be signed (docs/pd.md, "Authentication"); None: requests are not signed
      (then the PD must listen on loopback only).
    - ``window``: seconds a request's timestamp may differ from the PD's clock.
    - ``max_nonces``: nonces the replay cache holds (each for ``2 * window``).
    - ``max_body``: bytes of a request body (413 beyond).
    - ``register_rate`` / ``register_burst``: registrations (and, separately, new
      server ids) per second, and how many may come at once (429 beyond).
    """

    secret: bytes | str | None = None  # kept as bytes
    window: float = DEFAULT_WINDOW
    max_nonces: int = DEFAULT_MAX_NONCES
    max_body: int = DEFAULT_MAX_BODY
    register_rate: float = DEFAULT_REGISTER_RATE
    register_burst: int = DEFAULT_REGISTER_BURST

    def __post_init__(self) -> None:
        if self.secret is not None:
            object.__setattr__(self, "secret", _secret_bytes(self.secret))
        for name in ("window", "register_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"AuthConfig.{name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"AuthConfig.{name} must be a positive number, got {value!r}")
        for name in ("max_nonces", "max_body", "register_burst"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"AuthConfig.{name} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_env(cls, **overrides: Any) -> AuthConfig:
        """Settings with the secret from KOALA_CLUSTER_SECRET (if set), then ``overrides``."""
        values: dict[str, Any] = {}
        secret = os.environ.get(SECRET_ENV)
        if secret:
            values["secret"] = secret
        values.update(overrides)
        return cls(**values)


class ReplayCache:
    """Nonces seen recently, each kept ``lifetime`` seconds after it arrived, at most
    ``size`` of them. :meth:`add` refuses a nonce seen before (``replayed``) and, when
    full of nonces still alive, any new one (``replay_cache_full``): forgetting one
    early would let it be replayed."""

    def __init__(self, size: int, lifetime: float) -> None:
        self.size = size
        self.lifetime = lifetime
        self._seen: set[str] = set()
        self._order: deque[tuple[float, str]] = deque()  # (expiry, nonce), oldest first

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, nonce: str, now: float) -> None:
        """Remember ``nonce`` (``now``: a monotonic clock, seconds)."""
        order = self._order
        while order and order[0][0] <= now:
            self._seen.discard(order.popleft()[1])
        if nonce in self._seen:
            raise AuthError(
                401,
                "replayed",
                "this request's nonce was already used: every request (a retry too) needs a "
                "fresh random nonce",
            )
        if len(self._seen) >= self.size:
            wait = max(0.0, order[0][0] - now) if order else self.lifetime
            raise AuthError(
                503,
                "replay_cache_full",
                f"the PD's replay cache holds {self.size} nonces of the last "
                f"{self.lifetime:g} s: too many signed requests; retry shortly",
                retry_after=wait,
            )
        self._seen.add(nonce)
        order.append((now + self.lifetime, nonce))


class Verifier:
    """Checks the ``Authorization`` header of requests against the cluster secret."""

    def __init__(self, config: AuthConfig) -> None:
        if config.secret is None:
            raise ConfigError("a Verifier needs AuthConfig.secret")
        self.window_ms = int(config.window * 1000)
        self._key = request_key(config.secret)
        # a nonce may be accepted while its timestamp is within the window: at most
        # 2 * window after it arrived (a timestamp up to `window` ahead of the PD)
        self.nonces = ReplayCache(config.max_nonces, 2 * config.window)

    def verify(
        self,
        method: str,
        target: bytes,
        header: str | None,
        body: bytes,
        *,
        now_ms: int,
        now: float,
    ) -> None:
        """Raise :class:`AuthError` unless the request is signed, in time and new.
        ``now_ms``: the wall clock (ms since the epoch); ``now``: a monotonic clock (s)."""
        if header is None:
            raise AuthError(
                401,
                "unsigned",
                "this PD requires signed requests: give this process the cluster's secret "
                f"({SECRET_ENV}); see docs/pd.md, Authentication",
            )
        match = _AUTHORIZATION.match(header)
        if match is None:
            raise AuthError(
                401,
                "bad_signature",
                "the Authorization header must be 'Koala-HMAC ts=MS,nonce=32 hex,sig=64 hex' "
                "(docs/pd.md, Authentication)",
            )
        ts, nonce, sig = int(match.group(1)), match.group(2), match.group(3)
        skew = ts - now_ms
        if abs(skew) > self.window_ms:
            raise AuthError(
                401,
                "expired",
                f"the request's timestamp is {skew / 1000:+.1f} s from the PD's clock, beyond "
                f"±{self.window_ms / 1000:g} s: sign with the time now, and keep the clocks "
                "synchronised (NTP)",
            )
        expected = signature(self._key, method, target, ts, nonce, body)
        if not hmac.compare_digest(expected, sig):
            raise AuthError(
                401,
                "bad_signature",
                "the request's signature does not match: this process and the PD have "
                f"different cluster secrets ({SECRET_ENV}), or the request was altered",
            )
        self.nonces.add(nonce, now)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last: float | None = None

    def take(self, now: float) -> float:
        """Take a token (``now``: a monotonic clock, s): 0.0, or the seconds until one is
        there (and nothing is taken)."""
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


# paths whose requests each take a token of their own bucket (PD API under /pd/api/v1)
RATE_LIMITED = ("/pd/api/v1/membership/register", "/pd/api/v1/id/new_server_id")


@dataclass(frozen=True, slots=True)
class GateStatistics:
    refused: dict[str, int]  # requests refused before they were read, by code
    nonces: int  # in the replay cache now


class Gate:
    """What the PD checks of a request before it parses it: body size, signature (with a
    secret), and the rate of registrations and new server ids. None of it touches the
    store, so a refused request costs a few microseconds."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.verifier = Verifier(config) if config.secret is not None else None
        self.buckets = {
            path: TokenBucket(config.register_rate, config.register_burst) for path in RATE_LIMITED
        }
        self._refused: dict[str, int] = {}

    def too_large(self) -> AuthError:
        """The refusal of a body over ``max_body`` bytes."""
        return self.refuse(
            AuthError(
                413,
                "too_large",
                f"the request body is over {self.config.max_body} bytes: send less at once "
                "(find_positions and release take at most 1 024 actors)",
            )
        )

    def check(
        self,
        method: str,
        target: bytes,
        path: str,
        header: str | None,
        body: bytes,
        *,
        now_ms: int,
        now: float,
    ) -> AuthError | None:
        """The refusal of this request, or None to serve it. ``target``: the path and
        query as sent; ``path``: the decoded path; ``header``: its Authorization."""
        try:
            if self.verifier is not None:
                self.verifier.verify(method, target, header, body, now_ms=now_ms, now=now)
            bucket = self.buckets.get(path)
            if bucket is not None:
                wait = bucket.take(now)
                if wait:
                    raise AuthError(
                        429,
                        "rate_limited",
                        f"more than {self.config.register_rate:g} a second "
                        f"(burst {self.config.register_burst}) of {path.rsplit('/', 1)[-1]}: "
                        "retry after the Retry-After seconds",
                        retry_after=wait,
                    )
        except AuthError as exc:
            return self.refuse(exc)
        return None

    def refuse(self, exc: AuthError) -> AuthError:
        self._refused[exc.code] = self._refused.get(exc.code, 0) + 1
        return exc

    def statistics(self) -> GateStatistics:
        nonces = len(self.verifier.nonces) if self.verifier is not None else 0
        return GateStatistics(refused=dict(self._refused), nonces=nonces)
