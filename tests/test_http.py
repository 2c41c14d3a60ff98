"""HTTP: Koala's errors answered with a status and a JSON body; hosts' HTTP over HTTPS."""

from __future__ import annotations

import ssl
from abc import abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
    ConfigError,
    HostUnavailableError,
    OverloadedError,
    get_rpc_proxy,
)
from koala._tls import TLSConfig
from koala.http import add_error_handlers, parse_hostport, serve_asgi
from koala.testing import local_runtime
from koala.testing.tls import TestCA

pytestmark = pytest.mark.anyio


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/gone")
    async def gone() -> str:
        raise HostUnavailableError("the host of Player/1 cannot be reached")

    @app.get("/slow")
    async def slow() -> str:
        raise TimeoutError("IPlayer.echo did not finish before its deadline")

    @app.get("/busy")
    async def busy() -> str:
        raise OverloadedError("too much")

    @app.exception_handler(OverloadedError)
    async def mine(request: object, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("the app's own handler", status_code=429)

    return app


async def test_retryable_errors_get_503_and_504_and_app_handlers_win() -> None:
    app = make_app()
    add_error_handlers(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        gone = await client.get("/gone")
        assert gone.status_code == 503
        assert gone.headers["retry-after"] == "1"
        assert gone.json() == {
            "error": "HostUnavailableError",
            "message": "the host of Player/1 cannot be reached",
        }
        slow = await client.get("/slow")
        assert slow.status_code == 504
        busy = await client.get("/busy")
        assert busy.status_code == 429
        assert busy.text == "the app's own handler"


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
