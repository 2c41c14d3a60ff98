"""Serve an ASGI app (FastAPI) through hypercorn inside the runtime's event loop.

This is the one place that branches on the backend (hypercorn has a serve per loop).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import anyio
import sniffio
from anyio.abc import TaskStatus
from hypercorn.config import Config

from ._errors import (
    ConfigError,
    HostUnavailableError,
    OverloadedError,
    ShuttingDownError,
    WrongHostError,
)

# Koala errors an HTTP handler may let escape, and the status that says what they mean.
_HTTP_STATUS: dict[type[Exception], int] = {
    HostUnavailableError: 503,  # the actor's host is gone; its actors come back shortly
    WrongHostError: 503,  # placement is moving (a host fenced itself); retry shortly
    OverloadedError: 503,
    ShuttingDownError: 503,
    TimeoutError: 504,  # the call's deadline passed
}


def add_error_handlers(app: Any) -> None:
    """Answer Koala's retryable errors with 503/504 instead of a bare 500.

    For a Starlette/FastAPI app (``koala dev`` and ``koala host`` call this on the user's
    app); handlers the app registered itself for these types are kept.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    if not isinstance(app, Starlette):
        return

    async def handler(request: Request, exc: Exception) -> Response:
        status = next(code for t, code in _HTTP_STATUS.items() if isinstance(exc, t))
        headers = {"Retry-After": "1"} if status == 503 else None
        body = {"error": type(exc).__name__, "message": str(exc)}
        return JSONResponse(body, status_code=status, headers=headers)

    for exc_type in _HTTP_STATUS:
        if exc_type not in app.exception_handlers:
            app.add_exception_handler(exc_type, handler)


def parse_hostport(value: str, what: str = "address") -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); a clear error for anything else."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} must look like HOST:PORT (e.g. 127.0.0.1:8000), got {value!r}")
    return host.strip("[]"), int(port)


def _bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve_asgi(
    app: Any,
    host: str,
    port: int,
    shutdown: anyio.Event,
    *,
    graceful_timeout: float = 3.0,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on host:port until ``shutdown`` is set; report the bound address.

    The socket is bound here (so port 0 works on every backend and errors are ours) and
    handed to hypercorn by file descriptor.
    """
    sock = _bind_socket(host, port)
    bound = sock.getsockname()[:2]
    config = Config()
    config.bind = [f"fd://{os.dup(sock.fileno())}"]  # hypercorn owns (and closes) the dup
    config.graceful_timeout = graceful_timeout
    config.accesslog = None
    config.errorlog = None
    try:
        task_status.started((bound[0], bound[1]))
        if sniffio.current_async_library() == "trio":
            from hypercorn.trio import serve as trio_serve

            await trio_serve(app, config, shutdown_trigger=shutdown.wait)
        else:
            from hypercorn.asyncio import serve as asyncio_serve

            await asyncio_serve(app, config, shutdown_trigger=shutdown.wait)
    finally:
        sock.close()
