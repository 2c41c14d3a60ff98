"""HTTP: Koala's errors answered with a status and a JSON body; hosts' HTTP over HTTPS."""

from __future__ import annotations

import ssl
from abc import abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio
import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from koala import (
    ActorBase,
    ActorInterface,
    ActorNotFoundError,
    ArgumentTypeError,
    ConfigError,
    DeadlineExceededError,
    HostUnavailableError,
    KoalaError,
    OverloadedError,
    RemoteError,
    ShuttingDownError,
    WrongHostError,
    get_rpc_proxy,
)
from koala._tls import TLSConfig
from koala.http import _error_table, add_error_handlers, parse_hostport, serve_asgi
from koala.pd import LeaseExpiredError, PDRequestError, PDUnavailableError
from koala.storage import (
    InvalidKeyError,
    RecordTooLargeError,
    Storage,
    StorageClosedError,
    StorageUnavailableError,
    VersionConflictError,
)
from koala.testing import local_runtime
from koala.testing.tls import TestCA

pytestmark = pytest.mark.anyio


def raising_app(exc: BaseException) -> FastAPI:
    app = FastAPI()

    @app.get("/")
    async def fail() -> str:
        raise exc

    add_error_handlers(app)
    return app


async def answer(app: FastAPI, path: str = "/", method: str = "GET") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.request(method, path)


CONFLICT = VersionConflictError("players", "p1", None, 3, 4)

MAPPINGS: list[tuple[BaseException, int, str, str]] = [
    (CONFLICT, 409, "version_conflict", str(CONFLICT)),
    (InvalidKeyError("key1 must not be empty"), 400, "invalid_key", "key1 must not be empty"),
    (RecordTooLargeError("12 MB"), 413, "record_too_large", "12 MB"),
    (StorageUnavailableError("db down"), 503, "storage_unavailable", "db down"),
    (
        DeadlineExceededError("", 3.0, "Player", "1", "echo"),
        504,
        "deadline_exceeded",
        "deadline of 3 s exceeded calling Player/1.echo",
    ),
    (
        DeadlineExceededError("it passed in the mailbox", None, "Player", 7, "echo"),
        504,
        "deadline_exceeded",
        "deadline exceeded calling Player/7.echo",
    ),
    (TimeoutError("IPlayer.echo: no answer"), 504, "deadline_exceeded", "IPlayer.echo: no answer"),
    (PDUnavailableError("no PD answers"), 503, "pd_unavailable", "no PD answers"),
    (LeaseExpiredError(404, "no_lease", "gone"), 503, "lease_expired", "gone"),
    (PDRequestError(409, "conflict", "no"), 502, "pd_refused", "conflict: no"),
    (HostUnavailableError("Player/1's host is gone"), 503, "host_unavailable", "host is gone"),
    (WrongHostError("moved"), 503, "wrong_host", "moved"),
    (OverloadedError("mailbox full"), 503, "overloaded", "mailbox full"),
    (ShuttingDownError("draining"), 503, "shutting_down", "draining"),
    (ActorNotFoundError("no IFoo here"), 404, "actor_not_found", "no IFoo here"),
    (ArgumentTypeError("x must be int"), 400, "bad_argument", "x must be int"),
]


@pytest.mark.parametrize(("exc", "status", "code", "message"), MAPPINGS)
async def test_each_koala_error_has_its_status_and_a_json_body(
    exc: BaseException, status: int, code: str, message: str
) -> None:
    got = await answer(raising_app(exc))
    assert got.status_code == status
    assert got.json()["error"] == code
    assert message in got.json()["message"]
    assert set(got.json()) == {"error", "message"}
    if status == 503:
        assert got.headers["retry-after"] == "1"
    else:
        assert "retry-after" not in got.headers


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (RemoteError("secret.Type", "the actor's private text"), "remote_error"),
        (ConfigError("a path /etc/secret"), "config_error"),
        (StorageClosedError("you closed it before use"), "storage_closed"),
        (KoalaError("odd"), "koala_error"),
    ],
)
async def test_a_500_does_not_repeat_the_error_text(
    exc: BaseException, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    got = await answer(raising_app(exc))
    assert got.status_code == 500
    assert got.json()["error"] == code
    assert str(exc) not in got.text
    assert "the server's log has the details" in got.json()["message"]
    assert any(type(exc).__name__ in r.getMessage() for r in caplog.records)


def test_every_error_of_koala_has_an_answer() -> None:
    """A new Koala error class without a row of its own still gets a JSON answer; the
    public ones each have one."""
    import koala
    import koala.storage

    for module in (koala, koala.storage):
        for name in module.__all__:
            cls = getattr(module, name)
            if isinstance(cls, type) and issubclass(cls, KoalaError):
                assert any(c in _error_table() for c in cls.__mro__[:2]), name


class IScore(ActorInterface):
    @abstractmethod
    async def bump(self, version: int | None) -> int: ...

    @abstractmethod
    async def slow(self) -> str: ...


@dataclass
class Score:
    points: int


class ScoreImpl(IScore, ActorBase):
    async def bump(self, version: int | None) -> int:
        storage = STORAGE[0]
        return await storage.store("scores", Score).save(str(self.key), Score(1), version=version)

    async def slow(self) -> str:
        await anyio.sleep(5)
        return "late"


STORAGE: list[Storage] = []


def score_app() -> FastAPI:
    app = FastAPI()

    @app.post("/bump/{key}")
    async def bump(key: str, version: int | None = None) -> int:
        return await get_rpc_proxy(IScore, key).bump(version)

    @app.get("/slow/{key}")
    async def slow(key: str) -> str:
        return await get_rpc_proxy(IScore, key).slow()

    @app.get("/own-deadline/{key}")
    async def own_deadline(key: str) -> str:
        with anyio.fail_after(0.2):
            return await get_rpc_proxy(IScore, key).slow()

    add_error_handlers(app)
    return app


async def test_real_errors_of_actor_calls_through_a_real_app() -> None:
    async with Storage("memory://") as storage, local_runtime(ScoreImpl, default_timeout=0.3):
        STORAGE[:] = [storage]
        app = score_app()
        # a stale write inside an actor: 409 with the storage's own sentence
        first = await answer(app, "/bump/s1", "POST")  # a new row
        assert first.status_code == 200, first.text
        stale = await answer(app, "/bump/s1", "POST")  # "new" again: it exists now
        assert stale.status_code == 409
        assert stale.json()["error"] == "version_conflict"
        assert "version conflict on scores['s1']" in stale.json()["message"]
        # the default deadline, first through the mailbox, then on the inline path
        for _ in range(2):
            late = await answer(app, "/slow/s2")
            assert late.status_code == 504
            assert late.json() == {
                "error": "deadline_exceeded",
                "message": "deadline of 0.3 s exceeded calling ScoreImpl/s2.slow",
            }
        # a deadline of the handler's own: anyio's bare TimeoutError
        own = await answer(app, "/own-deadline/s3")
        assert own.status_code == 504
        assert own.json()["error"] == "deadline_exceeded"
        assert "deadline exceeded" in own.json()["message"]


async def test_the_apps_own_handlers_win() -> None:
    app = FastAPI()

    @app.get("/busy")
    async def busy() -> str:
        raise OverloadedError("too much")

    @app.get("/late")
    async def late() -> str:
        raise DeadlineExceededError("", 1.0, "A", "1", "m")

    @app.get("/gone")
    async def gone() -> str:
        raise HostUnavailableError("gone")

    @app.exception_handler(OverloadedError)
    async def mine(request: object, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("the app's own handler", status_code=429)

    @app.exception_handler(TimeoutError)
    async def my_timeout(request: object, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("the app's timeout handler", status_code=408)

    add_error_handlers(app)
    busy_answer = await answer(app, "/busy")
    assert (busy_answer.status_code, busy_answer.text) == (429, "the app's own handler")
    late_answer = await answer(app, "/late")
    assert (late_answer.status_code, late_answer.text) == (408, "the app's timeout handler")
    assert (await answer(app, "/gone")).json()["error"] == "host_unavailable"


def test_non_starlette_apps_are_left_alone() -> None:
    async def raw_app(scope: object, receive: object, send: object) -> None:
        return None

    add_error_handlers(raw_app)  # no error, nothing to do


@pytest.mark.parametrize("value", ["8000", ":8000", "host:port", "h:70000", ""])
def test_parse_hostport_rejects(value: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_hostport(value)


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_hostport("[::1]:9000") == ("::1", 9000)


# ---------------------------------------------------------------- HTTPS


class IGreeter(ActorInterface):
    @abstractmethod
    async def greet(self, name: str) -> str: ...


class Greeter(IGreeter, ActorBase):
    async def greet(self, name: str) -> str:
        return f"hello {name} from {self.key}"


def greeter_app() -> FastAPI:
    app = FastAPI()

    @app.get("/greet/{name}")
    async def greet(name: str) -> str:
        return await get_rpc_proxy(IGreeter, "g1").greet(name)

    add_error_handlers(app)
    return app


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@asynccontextmanager
async def https_host(tls: TLSConfig) -> AsyncIterator[str]:
    """A runtime and its FastAPI app served by hypercorn over HTTPS; the base URL."""
    shutdown = anyio.Event()
    async with local_runtime(Greeter), anyio.create_task_group() as tg:
        bound = await tg.start(
            partial(serve_asgi, greeter_app(), "127.0.0.1", 0, shutdown, tls=tls)
        )
        try:
            yield f"https://127.0.0.1:{bound[1]}"
        finally:
            shutdown.set()


async def test_a_host_route_over_https_and_a_client_of_another_ca_is_refused() -> None:
    with TestCA() as ca, TestCA() as other:
        async with https_host(ca.issue("host")) as url:
            trusted = ca.trust_only().client_context()
            async with httpx.AsyncClient(verify=trusted) as client:
                answer = await client.get(f"{url}/greet/ann")
                assert answer.status_code == 200
                assert answer.json() == "hello ann from g1"
            async with httpx.AsyncClient(verify=other.trust_only().client_context()) as rogue:
                with pytest.raises(httpx.ConnectError) as refused:
                    await rogue.get(f"{url}/greet/eve")
                assert _caused_by(refused.value, ssl.SSLCertVerificationError)
            async with httpx.AsyncClient() as plain:  # plain HTTP to the HTTPS port
                with pytest.raises(httpx.TransportError):
                    await plain.get(url.replace("https:", "http:") + "/greet/eve")
            async with httpx.AsyncClient(verify=trusted) as client:  # still serving
                assert (await client.get(f"{url}/greet/bob")).json() == "hello bob from g1"


async def test_a_bad_certificate_is_a_clear_error_at_start(tmp_path: Path) -> None:
    with TestCA() as ca:
        good = ca.issue("host")
        not_a_key = tmp_path / "key.pem"
        not_a_key.write_text("not a key\n")
        bad = TLSConfig(cert=good.cert, key=str(not_a_key), ca=good.ca)
        with pytest.raises(ConfigError, match="cannot serve HTTPS with certificate"):
            await serve_asgi(greeter_app(), "127.0.0.1", 0, anyio.Event(), tls=bad)


async def test_a_tls_config_without_a_certificate_serves_plain_http() -> None:
    with TestCA() as ca:
        shutdown = anyio.Event()
        async with local_runtime(Greeter), anyio.create_task_group() as tg:
            bound = await tg.start(
                partial(serve_asgi, greeter_app(), "127.0.0.1", 0, shutdown, tls=ca.trust_only())
            )
            async with httpx.AsyncClient() as client:
                answer = await client.get(f"http://127.0.0.1:{bound[1]}/greet/cy")
            shutdown.set()
        assert answer.json() == "hello cy from g1"


def test_a_deadline_error_keeps_its_fields_across_an_actor_call() -> None:
    from koala._messages import error_info, rebuild_error

    sent = DeadlineExceededError("no answer", 2.5, "Player", 7, "echo")
    back = rebuild_error(error_info(sent))
    assert isinstance(back, DeadlineExceededError)
    assert isinstance(back, TimeoutError)
    assert (back.timeout, back.actor_type, back.key, back.method) == (2.5, "Player", 7, "echo")
    assert str(back) == "no answer"
    assert back.summary() == "deadline of 2.5 s exceeded calling Player/7.echo"
