"""Every exception that escapes an HTTP route is logged once, with its traceback, method
and path, on ``koala.http`` (koala.http.Front), over a real server and socket."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import TaskStatus
from fastapi import FastAPI

from koala._errors import ConfigError
from koala.http import add_error_handlers, serve_asgi

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def served(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    shutdown = anyio.Event()

    async def serve(*, task_status: TaskStatus[tuple[str, int]]) -> None:
        await serve_asgi(app, "127.0.0.1", 0, shutdown, task_status=task_status)

    async with anyio.create_task_group() as tg:
        host, port = await tg.start(serve)
        try:
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
                yield client
        finally:
            shutdown.set()


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


async def logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The error records, once there is one: Starlette sends its 500 before it re-raises,
    so the line may come just after the answer. A little longer, to see a second."""
    with anyio.fail_after(10):
        while not errors(caplog):
            await anyio.sleep(0.01)
    await anyio.sleep(0.1)
    return errors(caplog)


async def test_a_fastapi_route_exception_is_logged_once_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FastAPI()

    @app.get("/boom/{n}")
    async def boom(n: int) -> str:
        raise ZeroDivisionError(f"divided {n} by zero")

    @app.get("/config")
    async def config() -> str:
        raise ConfigError("a Koala error answered 500 by the error handlers")

    add_error_handlers(app)
    caplog.set_level(logging.INFO)
    async with served(app) as client:
        resp = await client.get("/boom/7?secret=x")
        assert resp.status_code == 500
        found = await logged(caplog)
        assert len(found) == 1, found
        record = found[0]
        assert record.name == "koala.http"
        assert record.getMessage().startswith("GET /boom/7 failed: ZeroDivisionError")
        assert "secret" not in record.getMessage()  # the path, not the query
        assert record.exc_info is not None
        assert record.exc_info[0] is ZeroDivisionError
        caplog.clear()
        resp = await client.get("/config")
        assert (resp.status_code, resp.json()["error"]) == (500, "config_error")
        found = await logged(caplog)
        assert len(found) == 1, found  # by add_error_handlers' handler; it escapes nothing
        assert found[0].exc_info is not None


async def test_a_bare_asgi_app_that_raises_gets_a_500_and_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        raise RuntimeError("before any answer")

    async with served(app) as client:
        resp = await client.post("/x")
        assert resp.status_code == 500
        assert resp.json()["error"] == "internal"
        assert "before any answer" not in resp.text  # the log has it, not the client
        found = await logged(caplog)
    assert len(found) == 1, found
    assert found[0].getMessage() == "POST /x failed: RuntimeError: before any answer"
