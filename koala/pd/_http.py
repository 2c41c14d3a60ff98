"""The PD's HTTP/JSON API as a client: :class:`PDClient`, and the errors it raises.

One method per path of docs/pd.md, each answering the records of
:mod:`koala.pd._records`. Signing (the cluster secret) and owner keys come from
:mod:`koala.pd._auth`; retries over several PDs are here (:meth:`PDClient._post`).

This module never imports the PD server.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from .._errors import (
    ConfigError,
    LeaseExpiredError,
    PDRequestError,
    PDUnavailableError,
)
from ._auth import OWNER_HEADER, OWNER_KEY_SIZE, authorization, new_owner_key, request_key
from ._records import ActorPosition, HostStats, Member, Membership

if TYPE_CHECKING:
    from .._tls import TLSConfig

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
# owner keys of the registrations a client made, remembered to prove them (the oldest
# are forgotten: a host's earlier registrations ended when it registered again)
MAX_OWNER_KEYS = 64


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
        stats: HostStats | None = None,
    ) -> Membership:
        """Renew; the membership since ``version`` (None: the whole table). ``stats``:
        what the cluster page shows of this host (kept in the PD's memory only)."""
        body: dict[str, Any] = {"server_id": server_id, "lease_id": lease_id, "load": load}
        if activations is not None:
            body["activations"] = activations
        if version is not None:
            body["version"] = version
        if stats is not None:
            body["stats"] = stats.to_json()
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
