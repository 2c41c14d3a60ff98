"""The placement driver's HTTP/JSON API (FastAPI), with the original Koala PD's paths.

Every answer is JSON. Failures have a non-200 status and the body
``{"error": CODE, "message": TEXT}`` (see docs/pd.md for every path and code).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from .._errors import KoalaError
from ._service import (
    DEFAULT_HOST_TTL,
    MAX_BATCH,
    STORE_FULL_FIX,
    HostInfo,
    MembershipView,
    PDError,
    PlacementDriver,
    now_ms,
)
from ._store import StoreError, StoreFullError, StoreUnavailableError

API_VERSION = "koala-pd/1"

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Name = Annotated[str, Field(max_length=256)]
Labels = Annotated[dict[Name, Annotated[str, Field(max_length=4096)]], Field(max_length=1024)]


class NewIdResponse(BaseModel):
    id: int


class RegisterRequest(BaseModel):
    server_id: Int64
    load: Int64 = 0
    start_time: Int64 = 0
    ttl: Int64 = DEFAULT_HOST_TTL
    address: Name
    services: Labels = {}
    desc: Annotated[str, Field(max_length=4096)] = ""
    labels: Labels = {}
    placement_key: Annotated[str, Field(max_length=64)] = ""


class RegisterResponse(BaseModel):
    lease_id: int
    server_id: int
    ttl: int


class KeepAliveRequest(BaseModel):
    server_id: Int64
    lease_id: Int64
    load: Int64 = 0
    activations: Int64 | None = None
    version: Int64 | None = None  # the membership version the host holds: answer a delta


class GrowLeasesRequest(BaseModel):
    server_id: Int64
    lease_id: Int64
    count: Int64


class GrowLeasesResponse(BaseModel):
    position_leases: list[int]


class HostModel(BaseModel):
    server_id: int
    load: int
    start_time: int
    ttl: int
    address: str
    services: dict[str, str]
    desc: str
    labels: dict[str, str]
    lease_id: int
    activations: int
    renew_time: int


class EventModel(BaseModel):
    time: int
    add: list[int]
    remove: list[int]


class MembershipResponse(BaseModel):
    version: int
    full: bool
    hosts: dict[str, HostModel]
    removed: list[int]
    events: list[EventModel]
    now: int
    mean_activations: float = 0.0
    min_activations: int = 0


class DeleteRequest(BaseModel):
    server_id: Int64
    address: str = ""


class DeleteResponse(BaseModel):
    server_id: int
    deleted: bool


class FindPositionRequest(BaseModel):
    actor_type: Name
    actor_id: Name
    ttl: Int64 = 0


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


class ActorName(BaseModel):
    # lengths are checked per actor by the PD, so one bad name fails only its own answer
    actor_type: str
    actor_id: str


class FindPositionsRequest(BaseModel):
    positions: Annotated[list[ActorName], Field(max_length=MAX_BATCH)]
    ttl: Int64 = 0


class ReleasedPosition(BaseModel):
    actor_type: Name
    actor_id: Name
    revision: Int64


class ReleaseRequest(BaseModel):
    server_id: Int64
    positions: Annotated[list[ReleasedPosition], Field(max_length=MAX_BATCH)]


class ReleaseResponse(BaseModel):
    released: list[bool]


class HeldRequest(BaseModel):
    server_id: Int64
    lease_id: Int64
    lease: Int64
    after: Annotated[str, Field(max_length=4096)] = ""
    limit: Int64 = MAX_BATCH


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


def create_app(pd: PlacementDriver) -> FastAPI:
    """The PD's FastAPI application over ``pd``."""
    app = FastAPI(title="Koala placement driver", version=API_VERSION)

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
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
        message = "; ".join(parts) or "the request is malformed"
        if "json" not in request.headers.get("content-type", ""):
            message += " (send the body as JSON with Content-Type: application/json)"
        return _error(400, "bad_request", message)

    def membership(view: MembershipView) -> MembershipResponse:
        # events only with the whole table: a delta names its removals itself
        events = pd.recent_events() if view.full else []
        return MembershipResponse(
            version=view.version,
            full=view.full,
            hosts={str(s): HostModel(**h.to_json()) for s, h in view.hosts.items()},
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
    async def register(body: RegisterRequest) -> RegisterResponse:
        info = HostInfo(**body.model_dump())
        lease = await pd.register(info)
        return RegisterResponse(lease_id=lease, server_id=info.server_id, ttl=info.ttl)

    @app.post("/pd/api/v1/membership/keep_alive")
    async def keep_alive(body: KeepAliveRequest) -> MembershipResponse:
        await pd.keep_alive(body.server_id, body.lease_id, body.load, body.activations)
        await pd.hosts()
        return membership(pd.membership(body.version))

    @app.post("/pd/api/v1/membership/grow_leases")
    async def grow_leases(body: GrowLeasesRequest) -> GrowLeasesResponse:
        leases = await pd.grow_leases(body.server_id, body.lease_id, body.count)
        return GrowLeasesResponse(position_leases=leases)

    @app.post("/pd/api/v1/membership/fetch_all")
    async def fetch_all() -> MembershipResponse:
        await pd.hosts()
        return membership(pd.membership())

    @app.post("/pd/api/v1/membership/delete")
    async def delete(body: DeleteRequest) -> DeleteResponse:
        deleted = await pd.delete(body.server_id)
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
    async def held(body: HeldRequest) -> HeldResponse:
        found, after = await pd.held(
            body.server_id, body.lease_id, body.lease, body.after, body.limit
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
    async def release(body: ReleaseRequest) -> ReleaseResponse:
        items = [(p.actor_type, p.actor_id, p.revision) for p in body.positions]
        return ReleaseResponse(released=await pd.release(body.server_id, items))

    return app


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}
