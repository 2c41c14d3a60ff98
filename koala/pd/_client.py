"""The host's side of the placement driver: the HTTP client, membership and the directory.

:class:`PDClient` speaks the PD's HTTP/JSON API. :class:`ClusterDirectory` is what a
host plugs into its :class:`~koala.Runtime`: it registers the host (a fresh node id
from the PD, a lease with a TTL), renews the lease every TTL/3 reporting the host's
load, keeps the membership view, and answers "where does this actor live" from a
bounded LRU cache with a TTL, asking the PD on a miss.

Self-fencing: a host whose lease it could not renew for ``TTL - fence_margin`` seconds
stops serving on its own: it forgets every position, deactivates its activations and
refuses requests, before the lease can expire in the store (the store counts the TTL
from when it received the last renewal, which is after the host sent it). Only then
can the PD place the host's actors elsewhere. The host then registers again, as a
new node with a new id.

This module never imports the PD server.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._errors import (
    ConfigError,
    DeadlineExceededError,
    HostUnavailableError,
    KoalaError,
    ShuttingDownError,
    WrongHostError,
)
from .._messages import Key, Request
from .._runtime import LOCAL
from ._auth import OWNER_HEADER, OWNER_KEY_SIZE, authorization, new_owner_key, request_key
from ._positions import Ident, OwnPositions
from ._rebalance import RebalanceConfig, to_shed
from ._ticket import PLACEMENT_KEY_SIZE, check_ticket

if TYPE_CHECKING:
    from .._interface import MethodSpec
    from .._runtime import Runtime
    from .._tls import TLSConfig
    from ..transport import Transport

# Connections kept per client; requests beyond wait on a semaphore, because httpx's
# pool scans every connection for every queued request (quadratic under load).
HTTP_POOL = 16

log = logging.getLogger("koala.pd.client")

DEFAULT_PD_TIMEOUT = 5.0
# An idle pooled connection is dropped after this long, well before the PD server closes
# it (hypercorn's keep_alive_timeout, 5 s): a renewal never reuses a connection the
# server is closing. Whatever still breaks is retried (PDClient._post).
KEEPALIVE_EXPIRY = 2.0
RETRY_ROUNDS = 3  # rounds over the PDs for a repeatable request after transient failures
RETRY_PAUSE = 0.05  # seconds between two rounds; doubles
MAX_DEPARTED = 10_000  # ids of hosts seen leaving, remembered to drop their positions
# owner keys of the registrations a client made, remembered to prove them (the oldest
# are forgotten: a host's earlier registrations ended when it registered again)
MAX_OWNER_KEYS = 64

# Position lookups of a host go to the PD in batches: while LOOKUP_BATCHES batches are
# in flight, new lookups wait in a queue (at most LOOKUP_QUEUE; a caller beyond waits
# for room) and leave together, at most LOOKUP_BATCH in one request, as soon as a batch
# returns. No timer: alone, a lookup leaves at once as a batch of one.
LOOKUP_BATCHES = 2
LOOKUP_BATCH = 256
LOOKUP_QUEUE = 10_000
# Positions whose activation ended go back to the PD in batches of RELEASE_BATCH, from
# RELEASE_TASKS tasks; a failed release is sent again (after RELEASE_RETRY_MAX at most).
# A host wants one more lease for its positions per POSITIONS_PER_LEASE it holds (so
# that etcd deletes at most about that many keys in one step when it dies), asked
# for GROW_LEASES_STEP at a time, at most MAX_POSITION_LEASES in all.
POSITIONS_PER_LEASE = 4096
GROW_LEASES_STEP = 16
MAX_POSITION_LEASES = 256
RELEASE_TASKS = 2
RELEASE_BATCH = 256
RELEASE_RETRY_MAX = 2.0


class PDRequestError(KoalaError):
    """The PD refused a request; ``status`` and ``code`` say why (see docs/pd.md)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"the PD answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class PDUnavailableError(HostUnavailableError):
    """The PD cannot be reached, did not answer in time, or cannot reach its store."""


class LeaseExpiredError(PDRequestError):
    """This host's lease is gone: it must stop serving and register again."""


@dataclass(frozen=True, slots=True)
class Member:
    """A host as the PD reports it."""

    server_id: int
    address: str
    load: int = 0
    activations: int = 0
    services: dict[str, str] = field(default_factory=dict)
    start_time: int = 0
    renew_time: int = 0
    ttl: int = 0
    lease_id: int = 0
    desc: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Member:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


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
    actor_type: str
    actor_id: str
    server_id: int
    server_address: str
    create_time: int
    created: bool = False
    revision: int = 0  # the position's revision in the store (what a release names)
    ticket: bytes = b""  # the named host's proof of this answer (koala.pd._ticket)


_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class _OneChunk(httpx.AsyncByteStream):
    """A request body sent in one chunk, by an iterator rather than httpx's async
    generator: a send that breaks half-way leaves no generator to finalize (trio warns
    about each one, and the retries make that common)."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _OneChunk:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


class PDClient:
    """The PD's HTTP API. Every request has a deadline (``timeout``).

    With the cluster ``secret``, every request is signed (a retry too, with a fresh
    nonce: docs/pd.md, "Authentication"). Each registration gets a fresh owner key,
    which this client remembers and sends with every later request naming that server
    id (renewals, leases, releases, delete): the PD lets only its holder touch the
    registration.

    Requests that are safe to repeat (renewal, lookups, fetch_all, delete) are retried
    on a fresh connection and the other PDs, a few rounds within the deadline: a
    connection that broke (e.g. a pooled one the server closed) or a PD that could not
    reach its store does not fail them at once. PDs that all refuse the connection do:
    nobody listens, and waiting would only delay the error. The other requests (new
    ids, register) go to the next PD only when they surely were not sent (the
    connection could not be opened): a repeat would burn an id, or register a host
    twice."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_PD_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        secret: bytes | str | None = None,
        tls: TLSConfig | None = None,
    ) -> None:
        """``transport`` replaces the network (e.g. ``httpx.ASGITransport`` over the PD's
        app in this process: the embedded PD of ``koala dev``). ``secret``: the cluster
        secret (KOALA_CLUSTER_SECRET) to sign with; ``tls``: whom to trust for
        ``https://`` PD URLs (and the certificate to present)."""
        urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
        if not urls:
            raise ConfigError("the PD URL is empty; pass e.g. --pd http://127.0.0.1:9000")
        for one in urls:
            if not one.startswith(("http://", "https://")):
                raise ConfigError(
                    "a PD URL must start with http:// or https:// (e.g. http://127.0.0.1:9000), "
                    f"got {one!r}"
                )
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"the PD timeout must be a positive number, got {timeout!r}")
        self.urls = urls
        self.url = urls[0]
        self.timeout = float(timeout)
        self._current = 0
        self._slots = anyio.Semaphore(HTTP_POOL)
        self._key = request_key(secret) if secret is not None else None
        self._owners: OrderedDict[int, bytes] = OrderedDict()
        verify: Any = tls.client_context() if tls is not None else True
        self._http = httpx.AsyncClient(
            transport=transport,
            verify=verify,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=HTTP_POOL,
                max_keepalive_connections=HTTP_POOL,
                keepalive_expiry=KEEPALIVE_EXPIRY,
            ),
        )
        self.retries = 0  # attempts made again after a failure (statistics, tests)

    async def aclose(self) -> None:
        await self._http.aclose()

    def owner_key(self, server_id: int) -> bytes | None:
        """The owner key of registration ``server_id`` made through this client (None:
        not made here, or forgotten: MAX_OWNER_KEYS are kept)."""
        return self._owners.get(server_id)

    def adopt(self, server_id: int, owner_key: bytes) -> None:
        """Act for registration ``server_id`` with its owner key (e.g. from another
        client's :meth:`owner_key`): later requests naming it carry the key."""
        if not isinstance(owner_key, bytes) or len(owner_key) != OWNER_KEY_SIZE:
            raise ConfigError(f"an owner key is {OWNER_KEY_SIZE} bytes, got {owner_key!r:.80}")
        self._owners[server_id] = owner_key
        self._owners.move_to_end(server_id)
        while len(self._owners) > MAX_OWNER_KEYS:
            self._owners.popitem(last=False)

    def _headers(self, request: httpx.Request, data: bytes, owner: bytes | None) -> None:
        """Sign ``request`` (a fresh nonce each time) and add the owner's key."""
        if self._key is not None:
            request.headers["Authorization"] = authorization(
                self._key, request.method, request.url.raw_path, data
            )
        if owner is not None:
            request.headers[OWNER_HEADER] = owner.hex()

    async def _post(
        self,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        repeatable: bool = False,
        server_id: int | None = None,
    ) -> dict[str, Any]:
        """POST to the current PD; after a failure, to the next (see the class docstring).

        Every PD is tried once per round. A request that is not repeatable moves on only
        while it surely was not sent. A repeatable one also moves on after a connection
        that broke and after a PD's 502-504 (it cannot reach its store, or is
        overloaded), and when a round saw such a transient failure, another round
        follows after a short pause (at most RETRY_ROUNDS, within ``timeout``); a round
        where every PD refused the connection ends it: nobody is listening.

        ``server_id``: the registration the request names; its owner key goes with it.
        Each attempt is signed anew (a fresh nonce: the PD refuses a nonce twice)."""
        failures: list[str] = []
        data = json.dumps(body or {}, separators=(",", ":"), allow_nan=False).encode()
        owner = self._owners.get(server_id) if server_id is not None else None
        deadline = anyio.current_time() + self.timeout
        pause = RETRY_PAUSE
        for _ in range(RETRY_ROUNDS if repeatable else 1):
            transient = False
            for _ in range(len(self.urls)):
                url = self.urls[self._current]
                left = deadline - anyio.current_time() if repeatable else self.timeout
                if left <= 0:
                    break
                try:
                    request = self._http.build_request(
                        "POST",
                        url + path,
                        content=data,
                        headers={"Content-Type": "application/json"},
                    )
                    self._headers(request, data, owner)
                    request.stream = _OneChunk(data)
                    with anyio.fail_after(left):
                        async with self._slots:  # queue here, not in httpx's pool (slow scans)
                            resp = await self._http.send(request)
                    return self._answer(url, path, resp)
                except (httpx.TransportError, TimeoutError) as exc:
                    failures.append(f"{url}: {type(exc).__name__} {exc}".rstrip())
                    if not isinstance(exc, _NOT_SENT):
                        if not repeatable:
                            break  # it may have run: the caller decides
                        transient = True
                except PDUnavailableError as exc:
                    if not repeatable:
                        raise
                    failures.append(str(exc))
                    transient = True
                self._current = (self._current + 1) % len(self.urls)
                self.retries += 1
            if not transient or anyio.current_time() + pause >= deadline:
                break
            await anyio.sleep(pause)
            pause *= 2
        hint = "is `koala pd` running there?"
        if any(u.startswith("https://") for u in self.urls):
            hint += (
                " Over HTTPS, a PD that closes at once may have refused this process's TLS "
                "certificate: it must be signed by the CA the PD trusts (--tls-cert, --tls-ca)"
            )
        raise PDUnavailableError(f"no PD can be reached ({'; '.join(failures[-4:])}); {hint}")

    def _answer(self, url: str, path: str, resp: httpx.Response) -> dict[str, Any]:
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise PDUnavailableError(
                f"the PD at {url} answered {path} with HTTP {resp.status_code} and no JSON "
                "object; is that URL a Koala PD?"
            )
        if resp.status_code != 200:
            code = str(data.get("error", "unknown"))
            message = str(data.get("message", data))
            if code in ("lease_expired", "not_registered"):
                raise LeaseExpiredError(resp.status_code, code, message)
            if resp.status_code in (502, 503, 504) and code != "no_host":
                raise PDUnavailableError(f"the PD at {url} is unavailable: {message}")
            raise PDRequestError(resp.status_code, code, message)
        return data

    async def new_server_id(self) -> int:
        return int((await self._post("/pd/api/v1/id/new_server_id"))["id"])

    async def new_sequence(self, key: str, step: int) -> int:
        return int((await self._post(f"/pd/api/v1/id/new_sequence/{key}/{step}"))["id"])

    async def register(
        self,
        server_id: int,
        address: str,
        services: dict[str, str],
        *,
        ttl: int,
        load: int = 0,
        desc: str = "",
        labels: dict[str, str] | None = None,
        placement_key: bytes = b"",
    ) -> int:
        """``placement_key``: the secret the PD keys this host's placement tickets with
        (koala.pd._ticket); a new one per registration. A fresh owner key binds the
        registration to this client (remembered before it is sent: the registration
        may land even if the answer is lost)."""
        body = {
            "server_id": server_id,
            "address": address,
            "services": services,
            "ttl": ttl,
            "load": load,
            "desc": desc,
            "labels": labels or {},
            "placement_key": placement_key.hex(),
        }
        self.adopt(server_id, new_owner_key())
        path = "/pd/api/v1/membership/register"
        return int((await self._post(path, body, server_id=server_id))["lease_id"])

    async def keep_alive(
        self,
        server_id: int,
        lease_id: int,
        load: int,
        activations: int | None = None,
        *,
        version: int | None = None,
    ) -> Membership:
        """Renew; the membership since ``version`` (None: the whole table)."""
        body: dict[str, Any] = {"server_id": server_id, "lease_id": lease_id, "load": load}
        if activations is not None:
            body["activations"] = activations
        if version is not None:
            body["version"] = version
        path = "/pd/api/v1/membership/keep_alive"
        return _membership(await self._post(path, body, repeatable=True, server_id=server_id))

    async def fetch_all(self) -> Membership:
        return _membership(await self._post("/pd/api/v1/membership/fetch_all", repeatable=True))

    async def grow_leases(self, server_id: int, lease_id: int, count: int) -> list[int]:
        """Ask for ``count`` more leases to bind this host's positions to; all of them.
        Not repeated on a broken connection (it grants leases)."""
        body = {"server_id": server_id, "lease_id": lease_id, "count": count}
        path = "/pd/api/v1/membership/grow_leases"
        data = await self._post(path, body, server_id=server_id)
        leases = data.get("position_leases")
        if not isinstance(leases, list):
            raise PDUnavailableError(f"the PD answered grow_leases with {data!r:.200}")
        return [int(x) for x in leases]

    async def delete(self, server_id: int) -> None:
        """Deregister; repeated after a broken connection, a delete that had landed
        answers not_registered (LeaseExpiredError): the host is gone either way."""
        path = "/pd/api/v1/membership/delete"
        await self._post(path, {"server_id": server_id}, repeatable=True, server_id=server_id)

    async def find_positions(
        self, actors: Sequence[tuple[str, str]], ttl: int = 0
    ) -> list[ActorPosition | PDRequestError]:
        """Where each ``(actor_type, actor_id)`` lives, placing those placed nowhere, in
        one request: one answer per actor, in order, its position or the error the PD
        gave for that actor alone (``no_host``, ``bad_request``)."""
        body = {
            "positions": [{"actor_type": t, "actor_id": a} for t, a in actors],
            "ttl": ttl,
        }
        data = await self._post("/pd/api/v1/placement/find_positions", body, repeatable=True)
        answers = data.get("positions")
        if not isinstance(answers, list) or len(answers) != len(actors):
            raise PDUnavailableError(
                f"the PD answered find_positions for {len(actors)} actors with "
                f"{len(answers) if isinstance(answers, list) else 'no list of'} positions"
            )
        out: list[ActorPosition | PDRequestError] = []
        for (actor_type, actor_id), item in zip(actors, answers, strict=True):
            try:
                if "error" in item:
                    code = str(item["error"])
                    status = int(item.get("status", 500))
                    out.append(PDRequestError(status, code, str(item.get("message", code))))
                else:
                    out.append(_position(actor_type, actor_id, item))
            except (TypeError, KeyError, ValueError, AttributeError):
                raise PDUnavailableError(
                    f"the PD answered find_positions with a malformed position: {item!r:.200}"
                ) from None
        return out

    async def release(
        self, server_id: int, positions: Sequence[tuple[str, str, int]]
    ) -> list[bool]:
        """Give back positions whose activation ended on this host: each
        ``(actor_type, actor_id, revision)`` is deleted only if it is still that revision;
        one answer per position, True if it was deleted."""
        body = {
            "server_id": server_id,
            "positions": [{"actor_type": t, "actor_id": a, "revision": r} for t, a, r in positions],
        }
        path = "/pd/api/v1/placement/release"
        data = await self._post(path, body, repeatable=True, server_id=server_id)
        released = data.get("released")
        if not isinstance(released, list) or len(released) != len(positions):
            raise PDUnavailableError(
                f"the PD answered a release of {len(positions)} positions with {released!r:.200}"
            )
        return [bool(x) for x in released]

    async def held(
        self, server_id: int, lease_id: int, lease: int, after: str = ""
    ) -> tuple[list[tuple[str, str, int, int]], str]:
        """A page of the positions bound to ``lease`` (one of this host's):
        ``(actor_type, actor_id, revision, create_time)`` each, and where the next page
        starts ("" for none)."""
        body = {"server_id": server_id, "lease_id": lease_id, "lease": lease, "after": after}
        path = "/pd/api/v1/placement/held"
        data = await self._post(path, body, repeatable=True, server_id=server_id)
        try:
            found = [
                (
                    str(p["actor_type"]),
                    str(p["actor_id"]),
                    int(p["revision"]),
                    int(p["create_time"]),
                )
                for p in data["positions"]
            ]
            return found, str(data["next"])
        except (KeyError, TypeError, ValueError):
            raise PDUnavailableError(f"the PD answered held with {data!r:.200}") from None

    async def find_position(self, actor_type: str, actor_id: str, ttl: int = 0) -> ActorPosition:
        data = await self._post(
            "/pd/api/v1/placement/find_position",
            {"actor_type": actor_type, "actor_id": actor_id, "ttl": ttl},
            repeatable=True,
        )
        return _position(actor_type, actor_id, data)


def _position(actor_type: str, actor_id: str, data: dict[str, Any]) -> ActorPosition:
    return ActorPosition(
        actor_type=actor_type,
        actor_id=actor_id,
        server_id=int(data["server_id"]),
        server_address=str(data["server_address"]),
        create_time=int(data.get("create_time", 0)),
        created=bool(data.get("created", False)),
        revision=int(data.get("revision", 0)),
        ticket=bytes.fromhex(str(data.get("ticket", ""))),
    )


def _membership(data: dict[str, Any]) -> Membership:
    try:
        hosts = {int(k): Member.from_json(v) for k, v in (data.get("hosts") or {}).items()}
        return Membership(
            hosts,
            list(data.get("events") or []),
            int(data.get("now", 0)),
            version=int(data.get("version", 0)),
            full=bool(data.get("full", True)),  # a PD without deltas sends the whole table
            removed=[int(s) for s in data.get("removed") or []],
            mean_activations=float(data.get("mean_activations", 0.0)),
            min_activations=int(data.get("min_activations", 0)),
        )
    except (TypeError, ValueError, AttributeError):
        raise PDUnavailableError(
            f"the PD answered with a malformed membership: {data!r:.200}"
        ) from None


# ---------------------------------------------------------------- the directory


@dataclass(frozen=True, slots=True)
class MemberConfig:
    """Settings of a host's membership and position cache. Validated on construction.

    - ``ttl``: the lease, in whole seconds; renewed every ``ttl / 3``.
    - ``fence_margin``: a host that has not renewed for ``ttl - fence_margin`` seconds
      fences itself (default ``ttl / 4``); deactivation must fit in the margin.
    - ``cache_size`` / ``cache_ttl``: positions of actors remembered, and for how long.
    - ``rejoin_wait``: how long a call on a fenced host waits for it to rejoin.
    - ``positions_per_lease``: the host asks for one more lease for its positions per
      this many it holds, so that etcd deletes at most about that many keys in one
      step when the host dies (0: every position on the registration's lease).
    - ``rebalance``: when the host gives activations up so that hosts even out
      (koala.pd._rebalance; ``RebalanceConfig(threshold=0)`` turns it off).
    - ``reconcile_interval``: how often the host lists the positions the store holds
      for it and gives back those it never took (0: never); ``reconcile_grace``: how
      old such a position must be (its first call may still be on its way).
    """

    ttl: int = 15
    fence_margin: float = 0.0
    cache_size: int = 100_000
    cache_ttl: float = 60.0
    rejoin_wait: float = 5.0
    desc: str = ""
    positions_per_lease: int = POSITIONS_PER_LEASE
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)
    reconcile_interval: float = 300.0
    reconcile_grace: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.ttl, bool) or not isinstance(self.ttl, int) or self.ttl < 1:
            raise ConfigError(
                f"MemberConfig.ttl must be a whole number of seconds >= 1, got {self.ttl!r}"
            )
        if not self.fence_margin:
            object.__setattr__(self, "fence_margin", self.ttl / 4)
        if not 0 < self.fence_margin < self.ttl * 2 / 3:
            raise ConfigError(
                "MemberConfig.fence_margin must be positive and below 2/3 of the TTL (a host "
                f"renews every TTL/3), got {self.fence_margin!r}"
            )
        if isinstance(self.cache_size, bool) or not isinstance(self.cache_size, int):
            raise ConfigError("MemberConfig.cache_size must be an integer")
        per_lease = self.positions_per_lease
        if isinstance(per_lease, bool) or not isinstance(per_lease, int) or per_lease < 0:
            raise ConfigError(
                f"MemberConfig.positions_per_lease must be an integer >= 0, got {per_lease!r}"
            )
        interval = self.reconcile_interval
        if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval >= 0):
            raise ConfigError(
                f"MemberConfig.reconcile_interval must be a number >= 0, got {interval!r}"
            )
        for name in ("cache_size", "cache_ttl", "rejoin_wait", "reconcile_grace"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"MemberConfig.{name} must be a positive number, got {value!r}")


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


class ClusterDirectory:
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
        self.pd = pd
        self.address = address
        self.services = dict(services)
        self.config = config or MemberConfig()
        self.labels = dict(labels or {})
        self.runtime: Runtime | None = None
        self.server_id = 0
        self.lease_id = 0
        self.serving = False
        self.members: dict[int, Member] = {}
        self._version: int | None = None  # of the membership the PD last answered
        # positions on other hosts: ident -> (server id, address, expiry, ticket)
        self._cache: OrderedDict[Ident, tuple[int, str, float, bytes]] = OrderedDict()
        self._positions = OwnPositions()  # this host's own, and those it gives back
        self._placement_key = b""  # this registration's (koala.pd._ticket)
        self._release_wanted = anyio.Event()
        self._releases_moved = anyio.Event()  # set (and renewed) as each release returns
        self._releases = 0
        self._release_batches = 0
        self._claims = 0
        self._position_leases: list[int] = []  # this registration's (grow_leases)
        self._grow_wanted = anyio.Event()
        self._cluster_load = (0.0, 0)  # mean and least activations per host, last renewal
        self._rebalance_wanted = anyio.Event()
        self._shed = 0
        self._departed: OrderedDict[int, None] = OrderedDict()
        self._pending: dict[tuple[str, Key], _Pending] = {}
        self._lookups_in: MemoryObjectSendStream[_Pending] | None = None  # while run() runs
        self._lookup_batches = 0
        self._rejoined = anyio.Event()
        self._registrations = 0
        self._fences = 0
        self._renewals = 0
        self._failed_renewals = 0
        self._resolves = 0

    def attach(self, runtime: Runtime) -> None:
        """The runtime whose load is reported and whose activations a fence evicts."""
        self.runtime = runtime

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
        )

    # ------------------------------------------------------------ Directory

    def lookup(self, actor_type: str, key: Key) -> str | None:
        if not self.serving:
            return None
        ident = (actor_type, str(key))
        if self._positions.owned(ident) is not None:
            return LOCAL
        entry = self._cache.get(ident)
        if entry is None:
            return None
        server_id, address, expires, _ = entry
        if expires <= anyio.current_time() or server_id in self._departed:
            del self._cache[ident]
            return None
        self._cache.move_to_end(ident)
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

    def _load(self) -> tuple[int, int]:
        if self.runtime is None:
            return 0, 0
        stats = self.runtime.statistics()
        return stats.activations + stats.inflight, stats.activations

    def _update_view(self, view: Membership) -> None:
        """Apply a renewal's answer: the whole table replaces the view, a delta adds the
        hosts it names and drops the ones it removes."""
        if view.full:
            gone = [server_id for server_id in self.members if server_id not in view.hosts]
            self.members = dict(view.hosts)
        else:
            gone = list(view.removed)
            for server_id in gone:
                self.members.pop(server_id, None)
            self.members.update(view.hosts)
        for server_id in gone:
            self._departed[server_id] = None
        for event in view.events:
            for server_id in event.get("remove") or []:
                self._departed[int(server_id)] = None
        while len(self._departed) > MAX_DEPARTED:
            self._departed.popitem(last=False)
        self._version = view.version

    async def _register(self) -> float:
        """Register as a new node, retrying until the PD answers; when the lease began."""
        delay = 0.1
        while True:
            try:
                server_id = await self.pd.new_server_id()
                load, _ = self._load()
                key = secrets.token_bytes(PLACEMENT_KEY_SIZE)
                sent = anyio.current_time()
                lease = await self.pd.register(
                    server_id,
                    self.address,
                    self.services,
                    ttl=self.config.ttl,
                    load=load,
                    desc=self.config.desc,
                    labels=self.labels,
                    placement_key=key,
                )
            except (PDUnavailableError, PDRequestError) as exc:
                log.warning("cannot register with the PD (%s); retrying in %.1f s", exc, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self.server_id, self.lease_id = server_id, lease
            self._placement_key = key
            self._position_leases = []
            self._registrations += 1
            log.info(
                "registered as server %d (lease %d, TTL %d s)", server_id, lease, self.config.ttl
            )
            return sent

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

    async def _membership(self, task_status: TaskStatus[None]) -> None:
        started = False
        while True:
            last_ok = await self._register()
            self.serving = True
            self._rejoined.set()
            if not started:
                started = True
                task_status.started()
            await self._renew_until_lost(last_ok)
            await self._fence()

    async def _renew_until_lost(self, last_ok: float) -> None:
        cfg = self.config
        interval = cfg.ttl / 3
        fence_after = cfg.ttl - cfg.fence_margin
        next_renewal = last_ok + interval
        while True:
            now = anyio.current_time()
            fence_at = last_ok + fence_after
            await anyio.sleep(max(0.0, min(next_renewal, fence_at) - now))
            now = anyio.current_time()
            if now >= fence_at:
                log.error(
                    "server %d could not renew its lease for %.1f s: fencing itself",
                    self.server_id,
                    now - last_ok,
                )
                return
            load, activations = self._load()
            sent = now
            with anyio.move_on_after(fence_at - now):
                try:
                    view = await self.pd.keep_alive(
                        self.server_id, self.lease_id, load, activations, version=self._version
                    )
                except LeaseExpiredError as exc:
                    log.error("server %d: %s; fencing itself", self.server_id, exc.message)
                    return
                except (PDUnavailableError, PDRequestError) as exc:
                    self._failed_renewals += 1
                    log.warning("server %d: lease renewal failed: %s", self.server_id, exc)
                    next_renewal = anyio.current_time() + max(0.05, interval / 4)
                    continue
                self._renewals += 1
                last_ok = sent
                next_renewal = sent + interval
                self._update_view(view)
                if self._leases_wanted() > len(self._position_leases):
                    self._grow_wanted.set()
                self._cluster_load = (view.mean_activations, view.min_activations)
                if cfg.rebalance.enabled:
                    self._rebalance_wanted.set()

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

    async def _fence(self) -> None:
        """Stop serving: no position is LOCAL any more, and no activation stays live."""
        self.serving = False
        self._rejoined = anyio.Event()
        self._cache.clear()
        self._positions.clear()  # they die with the lease; evict_all's ends are no-ops
        self._releases_changed()
        self._fences += 1
        if self.server_id:
            self._departed[self.server_id] = None
        if self.runtime is not None:
            left = await self.runtime.evict_all(grace=self.config.fence_margin * 0.8)
            if left:
                log.error("%d activations were still running when the fence closed", left)

    async def leave(self) -> None:
        """Deregister (after the runtime drained): the PD may place our actors at once."""
        self.serving = False
        self._cache.clear()
        self._positions.clear()  # revoking the lease deletes what was not released yet
        self._releases_changed()
        if self.server_id:
            try:
                await self.pd.delete(self.server_id)
            except (PDUnavailableError, PDRequestError) as exc:
                log.warning("could not deregister from the PD (%s); the lease will expire", exc)


class PlacementRemote:
    """The runtime's ``RemoteDelivery``: the transport, with the directory kept honest.

    A host that cannot be reached before anything is sent (the connection cannot be
    opened) proves the request did not run there; its cached position is dropped and
    the PD asked again. If the actor now lives elsewhere (the host left, or its lease
    expired and the actor was placed again), the call is refused as "wrong host", which
    makes the runtime retry against the new position; if the PD still names the
    unreachable host (its lease is alive), the call fails with HostUnavailableError.
    Any failure that may mean a stale position drops the cached entry.
    """

    def __init__(self, transport: Transport, directory: ClusterDirectory) -> None:
        self.transport = transport
        self.directory = directory

    async def call(self, host: str, req: Request, spec: MethodSpec) -> Any:
        """``req.expires``: no cancel scope of the caller's holds the deadline; dialing and
        asking the PD again then run under one (the transport keeps it once sent)."""
        try:
            if req.expires:
                with anyio.fail_at(req.deadline):
                    await self._reach(host, req)
            else:
                await self._reach(host, req)
        except TimeoutError:
            raise DeadlineExceededError(
                f"{req.interface}.{req.method} on {req.actor_type}/{req.key!r}: the deadline "
                f"passed while reaching {host}",
                None,
                req.actor_type,
                req.key,
                req.method,
            ) from None
        req.placement = self.directory.ticket_of(req.actor_type, req.key)
        try:
            return await self.transport.call(host, req, spec)
        except (HostUnavailableError, ShuttingDownError, WrongHostError):
            self.directory.forget(req.actor_type, req.key)
            raise

    async def _reach(self, host: str, req: Request) -> None:
        """Open the channel to ``host``; if it cannot be reached, ask the PD whether the
        actor moved (WrongHostError) or not (HostUnavailableError)."""
        try:
            await self.transport.channel(host)
        except HostUnavailableError:
            self.directory.forget(req.actor_type, req.key)
            now = await self.directory.resolve(req.actor_type, req.key)
            if now == host:
                raise
            raise WrongHostError(
                f"{req.actor_type}/{req.key!r} moved from {host}, which cannot be reached"
            ) from None
