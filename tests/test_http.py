"""Koala's retryable errors reach HTTP clients as 503/504, not a bare 500."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from koala import ConfigError, HostUnavailableError, OverloadedError
from koala.http import add_error_handlers, parse_hostport

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
