"""The placement driver's HTTP/JSON API (FastAPI), with the original Koala PD's paths.

Every answer is JSON. Failures have a non-200 status and the body
``{"error": CODE, "message": TEXT}`` (see docs/pd.md for every path and code).

In front of the routes, a pure ASGI middleware (:class:`_Guard`) reads the body once
(bounded: 413 beyond ``AuthConfig.max_body``), checks the request's signature when
the PD has a cluster secret (401), and the rate of registrations and new server ids
(429), all before anything is parsed and without touching the store
(:class:`koala.pd._auth.Gate`). Requests naming a server id must carry that host's
owner key (403 otherwise). Bodies are validated strictly: no coercion, no unknown
field, bounded values; a 422 names the field.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..._errors import KoalaError
from .._auth import OWNER_HEADER, AuthConfig, AuthError, Gate, parse_owner
from .._records import (
    DEFAULT_HOST_TTL,
    MAX_POSITION_LEASES,
    MAX_REPORTED_TYPES,
    HostInfo,
    HostStats,
)
from ._driver import MAX_BATCH, MAX_NAME, PlacementDriver
from ._errors import STORE_FULL_FIX, PDError, now_ms
from ._membership import MAX_HOST_TTL, MembershipView
from ._store import StoreError, StoreFullError, StoreUnavailableError

API_VERSION = "koala-pd/2"

INT64_MAX = 2**63 - 1
MAX_LOAD = 1_000_000_000  # a host's load or activation count, as reported
MAX_TEXT = 4096  # desc, label values, held's `after`
MAX_ENTRIES = 1024  # services or labels of one host
MAX_ADDRESS = 261  # "[" 253 "]:65535" at most
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # tab, newline ok
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (or lone surrogates)")
    return value


def _text(value: str) -> str:
    if _TEXT_CONTROL.search(value):
        raise ValueError("must not contain control characters other than tab and newline")
    return value


def _actor_type(value: str) -> str:
    if "/" in value:
        raise ValueError("must not contain '/'")
    return value


def check_address(value: str) -> str:
    """``HOST:PORT``: HOST a DNS name, an IPv4 literal or a bracketed IPv6 literal,
    PORT 1-65535; printable ASCII only. ValueError says what is wrong."""
    if not (value.isascii() and value.isprintable()) or " " in value:
        raise ValueError("must be printable ASCII without spaces, as HOST:PORT")
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT (e.g. 10.0.0.7:7001 or [::1]:7001)")
    if not (port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise ValueError(f"the port must be a number from 1 to 65535, got {port!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 address") from None
        return value
    try:
        ipaddress.IPv4Address(host)
        return value
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ValueError(f"{host!r} is neither an IP address nor a DNS name")
    if labels[-1].isdigit():
        raise ValueError(f"{host!r} is not an IPv4 address (and a DNS name cannot end in digits)")
    return value


ServerId = Annotated[int, Field(ge=1, le=INT64_MAX)]
LeaseId = Annotated[int, Field(ge=1, le=INT64_MAX)]
Count = Annotated[int, Field(ge=0, le=MAX_LOAD)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME), AfterValidator(_no_control)]
ActorType = Annotated[Name, AfterValidator(_actor_type)]
Text = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(_text)]
Address = Annotated[str, Field(min_length=3, max_length=MAX_ADDRESS), AfterValidator(check_address)]


class _Strict(BaseModel):
    """A request body: no coercion (a string is not a number), no unknown field."""

    model_config = ConfigDict(strict=True, extra="forbid")


class NewIdResponse(BaseModel):
    id: int


class RegisterRequest(_Strict):
    server_id: ServerId
    load: Count = 0
    start_time: Annotated[int, Field(ge=0, le=INT64_MAX)] = 0
    ttl: Annotated[int, Field(ge=1, le=MAX_HOST_TTL)] = DEFAULT_HOST_TTL
    address: Address
    services: Annotated[dict[ActorType, Name], Field(max_length=MAX_ENTRIES)] = {}
    desc: Text = ""
    labels: Annotated[dict[Name, Text], Field(max_length=MAX_ENTRIES)] = {}
    placement_key: Annotated[str, Field(pattern=r"^(?:[0-9a-fA-F]{64})?$")] = ""


class RegisterResponse(BaseModel):
    lease_id: int
    server_id: int
    ttl: int


MAX_CALLS = 2**53  # calls a host reports (exact in a JSON number, ~285 years at 1e6/s)
MAX_CALL_SECONDS = 1e15


class StatsModel(_Strict):
    """What a host reports for the cluster page with a renewal (koala.pd._records.HostStats)."""

    calls: Annotated[int, Field(ge=0, le=MAX_CALLS)] = 0
    # finite: pydantic refuses inf and nan in JSON for a float with bounds
    call_seconds: Annotated[float, Field(ge=0.0, le=MAX_CALL_SECONDS, allow_inf_nan=False)] = 0.0
    activations_by_type: Annotated[
        dict[ActorType, Count], Field(max_length=MAX_REPORTED_TYPES)
    ] = {}

    def to_stats(self) -> HostStats:
        return HostStats(self.calls, self.call_seconds, dict(self.activations_by_type))


class KeepAliveRequest(_Strict):
    server_id: ServerId
    lease_id: LeaseId
    load: Count = 0
    activations: Count | None = None
    stats: StatsModel | None = None  # for the cluster page (koala.dashboard)
    # the membership version the host holds: answer a delta (one never given: the table)
    version: Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)] | None = None


class GrowLeasesRequest(_Strict):
    server_id: ServerId
    lease_id: LeaseId
    count: Annotated[int, Field(ge=1, le=MAX_POSITION_LEASES)]


class GrowLeasesResponse(BaseModel):
    position_leases: list[int]


class EventModel(BaseModel):
    time: int
    add: list[int]
    remove: list[int]


class MembershipResponse(BaseModel):
    version: int
    full: bool
    hosts: dict[str, dict[str, Any]]  # Member.to_json() each (koala.pd._records)
    removed: list[int]
    events: list[EventModel]
    now: int
    mean_activations: float = 0.0
    min_activations: int = 0


class DeleteRequest(_Strict):
    server_id: ServerId
    address: Annotated[str, Field(max_length=MAX_ADDRESS)] = ""  # accepted and ignored


class DeleteResponse(BaseModel):
    server_id: int
    deleted: bool


class FindPositionRequest(_Strict):
    actor_type: ActorType
    actor_id: Name
    ttl: Annotated[int, Field(ge=0, le=INT64_MAX)] = 0


class FindPositionResponse(BaseModel):
    actor_type: str
    actor_id: str
    ttl: int
    create_time: int
    server_id: int
    server_address: str
    lease_id: int
    created: bool
    revision: int
    ticket: str


class ActorName(_Strict):
    # names are checked per actor by the PD, so one bad name fails only its own answer
    actor_type: Annotated[str, Field(max_length=4 * MAX_NAME)]
    actor_id: Annotated[str, Field(max_length=4 * MAX_NAME)]


class FindPositionsRequest(_Strict):
    positions: Annotated[list[ActorName], Field(max_length=MAX_BATCH)]
    ttl: Annotated[int, Field(ge=0, le=INT64_MAX)] = 0


class ReleasedPosition(_Strict):
    actor_type: ActorType
    actor_id: Name
    revision: Annotated[int, Field(ge=1, le=INT64_MAX)]


class ReleaseRequest(_Strict):
    server_id: ServerId
    positions: Annotated[list[ReleasedPosition], Field(max_length=MAX_BATCH)]


class ReleaseResponse(BaseModel):
    released: list[bool]


class HeldRequest(_Strict):
    server_id: ServerId
    lease_id: LeaseId
    lease: LeaseId
    after: Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(_no_control)] = ""
    limit: Annotated[int, Field(ge=1, le=MAX_BATCH)] = MAX_BATCH


class HeldPosition(BaseModel):
    actor_type: str
    actor_id: str
    revision: int
    create_time: int


class HeldResponse(BaseModel):
    positions: list[HeldPosition]
    next: str


class VersionResponse(BaseModel):
    version: str


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


def _owner(request: Request) -> bytes:
    """The owner key the request carries (b"": none, which owns nothing)."""
    return parse_owner(request.headers.get(OWNER_HEADER))


# ---------------------------------------------------------------- the guard (ASGI)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Disconnected(Exception):
    """The client went away before its body was read: nothing to answer."""


class _Guard:
    """Pure ASGI middleware: the body read once and bounded, then :class:`Gate`'s
    checks, before the application sees the request."""

    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gate = self.gate
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers") or ():
            headers.setdefault(bytes(name).lower(), bytes(value))
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > gate.config.max_body:
            await _refuse(send, gate.too_large())  # said so before sending it: not read
            return
        try:
            body = await self._body(receive)
        except _Disconnected:
            return
        if body is None:
            await _refuse(send, gate.too_large())
            return
        target = bytes(scope.get("raw_path") or str(scope["path"]).encode())
        query = bytes(scope.get("query_string") or b"")
        if query:
            target += b"?" + query
        auth = headers.get(b"authorization")
        refused = gate.check(
            str(scope["method"]),
            target,
            str(scope["path"]),
            auth.decode("latin-1") if auth is not None else None,
            body,
            now_ms=now_ms(),
            now=anyio.current_time(),
        )
        if refused is not None:
            await _refuse(send, refused)
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _body(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it is over the limit (the rest is not read)."""
        limit = self.gate.config.max_body
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = bytes(message.get("body") or b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)


async def _refuse(send: Send, exc: AuthError) -> None:
    body = json.dumps({"error": exc.code, "message": exc.message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if exc.retry_after:
        headers.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- the application


def _invalid(exc: RequestValidationError, request: Request) -> JSONResponse:
    """422 naming the first field at fault (its path in the body, e.g. ``positions.3.actor_id``)."""
    errors = exc.errors()
    parts: list[str] = []
    fields: list[str] = []
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in ("body", "path", "query", "header"):
            loc = loc[1:]
        if err.get("type") == "json_invalid":
            loc = []
        where = ".".join(loc) or "body"
        fields.append(where)
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    message = "; ".join(parts) or "the request is malformed"
    if "json" not in request.headers.get("content-type", ""):
        message += " (send the body as JSON with Content-Type: application/json)"
    field = fields[0] if fields else "body"
    return JSONResponse(
        {"error": "invalid_request", "field": field, "message": message}, status_code=422
    )


def create_app(pd: PlacementDriver, auth: AuthConfig | None = None) -> FastAPI:
    """The PD's FastAPI application over ``pd``, guarded as ``auth`` says (default: no
    secret, so requests are not signed; bodies and registrations are still bounded).
    ``app.state.gate`` is the guard (its ``statistics()``: requests refused)."""
    gate = Gate(auth or AuthConfig())
    app = FastAPI(title="Koala placement driver", version=API_VERSION)
    app.state.gate = gate
    app.add_middleware(_Guard, gate=gate)

    @app.exception_handler(PDError)
    async def pd_error(request: Request, exc: PDError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(StoreFullError)
    async def store_full(request: Request, exc: StoreFullError) -> JSONResponse:
        pd.store_full(exc)
        return _error(507, "store_full", STORE_FULL_FIX)

    @app.exception_handler(StoreUnavailableError)
    async def store_down(request: Request, exc: StoreUnavailableError) -> JSONResponse:
        return _error(503, "store_unavailable", f"the PD cannot reach its store: {exc}")

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        return _error(500, "store_error", f"the PD's store failed: {exc}")

    @app.exception_handler(KoalaError)
    async def koala_error(request: Request, exc: KoalaError) -> JSONResponse:
        return _error(500, "internal", str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid(exc, request)

    def membership(view: MembershipView) -> MembershipResponse:
        # events only with the whole table: a delta names its removals itself
        events = pd.recent_events() if view.full else []
        return MembershipResponse(
            version=view.version,
            full=view.full,
            hosts={str(s): h.to_json() for s, h in view.hosts.items()},
            removed=view.removed,
            events=[EventModel(time=e.time, add=e.add, remove=e.remove) for e in events],
            now=now_ms(),
            mean_activations=view.mean_activations,
            min_activations=view.min_activations,
        )

    @app.get("/pd/api/v1/version")
    async def version() -> VersionResponse:
        return VersionResponse(version=API_VERSION)

    @app.post("/pd/api/v1/id/new_server_id")
    async def new_server_id() -> NewIdResponse:
        return NewIdResponse(id=await pd.new_server_id())

    @app.post("/pd/api/v1/id/new_sequence/{key}/{step}")
    async def new_sequence(key: str, step: int) -> NewIdResponse:
        return NewIdResponse(id=await pd.new_sequence(key, step))

    @app.post("/pd/api/v1/membership/register")
    async def register(body: RegisterRequest, request: Request) -> JSONResponse:
        owner = _owner(request)
        if not owner:
            return JSONResponse(
                {
                    "error": "invalid_request",
                    "field": "Koala-Owner",
                    "message": "register needs a Koala-Owner header: a fresh random 32-byte "
                    "key as 64 hex digits, which later requests for this server id repeat",
                },
                status_code=422,
            )
        info = HostInfo(**body.model_dump())
        lease = await pd.register(info, owner=owner)
        answer = RegisterResponse(lease_id=lease, server_id=info.server_id, ttl=info.ttl)
        return JSONResponse(answer.model_dump())

    @app.post("/pd/api/v1/membership/keep_alive")
    async def keep_alive(body: KeepAliveRequest, request: Request) -> MembershipResponse:
        await pd.keep_alive(
            body.server_id,
            body.lease_id,
            body.load,
            body.activations,
            owner=_owner(request),
            stats=body.stats.to_stats() if body.stats is not None else None,
        )
        await pd.hosts()
        return membership(pd.membership(body.version))

    @app.post("/pd/api/v1/membership/grow_leases")
    async def grow_leases(body: GrowLeasesRequest, request: Request) -> GrowLeasesResponse:
        leases = await pd.grow_leases(
            body.server_id, body.lease_id, body.count, owner=_owner(request)
        )
        return GrowLeasesResponse(position_leases=leases)

    @app.post("/pd/api/v1/membership/fetch_all")
    async def fetch_all() -> MembershipResponse:
        await pd.hosts()
        return membership(pd.membership())

    @app.post("/pd/api/v1/membership/delete")
    async def delete(body: DeleteRequest, request: Request) -> DeleteResponse:
        deleted = await pd.delete(body.server_id, owner=_owner(request))
        if not deleted:
            raise PDError(404, "not_registered", f"server {body.server_id} is not registered")
        return DeleteResponse(server_id=body.server_id, deleted=True)

    @app.post("/pd/api/v1/placement/find_position")
    async def find_position(body: FindPositionRequest) -> FindPositionResponse:
        pos = await pd.find_position(body.actor_type, body.actor_id, body.ttl)
        return FindPositionResponse(**_fields(pos))

    @app.post("/pd/api/v1/placement/find_positions")
    async def find_positions(body: FindPositionsRequest) -> JSONResponse:
        actors = [(a.actor_type, a.actor_id) for a in body.positions]
        answers = await pd.find_positions(actors, body.ttl)
        out: list[dict[str, Any]] = []
        for (actor_type, actor_id), answer in zip(actors, answers, strict=True):
            if isinstance(answer, PDError):
                out.append(
                    {
                        "actor_type": actor_type,
                        "actor_id": actor_id,
                        "status": answer.status,
                        "error": answer.code,
                        "message": answer.message,
                    }
                )
            else:
                out.append(_fields(answer))
        return JSONResponse({"positions": out})

    @app.post("/pd/api/v1/placement/held")
    async def held(body: HeldRequest, request: Request) -> HeldResponse:
        found, after = await pd.held(
            body.server_id, body.lease_id, body.lease, body.after, body.limit, owner=_owner(request)
        )
        return HeldResponse(
            positions=[
                HeldPosition(
                    actor_type=p.actor_type,
                    actor_id=p.actor_id,
                    revision=p.revision,
                    create_time=p.create_time,
                )
                for p in found
            ],
            next=after,
        )

    @app.post("/pd/api/v1/placement/release")
    async def release(body: ReleaseRequest, request: Request) -> ReleaseResponse:
        items = [(p.actor_type, p.actor_id, p.revision) for p in body.positions]
        released = await pd.release(body.server_id, items, owner=_owner(request))
        return ReleaseResponse(released=released)

    return app


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}
