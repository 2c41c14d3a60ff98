"""Serve an ASGI app (FastAPI) through hypercorn inside the runtime's event loop, over
HTTP or HTTPS (and so ws or wss), and answer Koala's errors with a status and a JSON body.

This is the one place that branches on the backend (hypercorn has a serve per loop).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import anyio
import sniffio
from anyio.abc import TaskStatus
from hypercorn.config import Config

from ._errors import (
    ActorNotFoundError,
    ArgumentTypeError,
    ConfigError,
    DeadlineExceededError,
    HostUnavailableError,
    KoalaError,
    LeaseExpiredError,
    OverloadedError,
    PDRequestError,
    PDUnavailableError,
    RemoteError,
    ShuttingDownError,
    WrongHostError,
)
from ._net import split_hostport
from ._tls import TLSConfig

log = logging.getLogger("koala.http")

RETRY_AFTER = 1  # seconds a client is told to wait before retrying a 503


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """How an HTTP handler's uncaught Koala error is answered."""

    status: int
    code: str  # the body's "error"


@functools.cache
def _error_table() -> dict[type[BaseException], ErrorAnswer]:
    """Koala's errors and their answers; an error takes the entry of the first class of its
    MRO found here (so subclasses come before their bases without any ordering)."""
    from .storage._errors import (
        InvalidKeyError,
        RecordSchemaError,
        RecordTooLargeError,
        StorageClosedError,
        StorageError,
        StorageUnavailableError,
        VersionConflictError,
    )

    table: list[tuple[type[BaseException], int, str]] = [
        (VersionConflictError, 409, "version_conflict"),
        (InvalidKeyError, 400, "invalid_key"),
        (RecordTooLargeError, 413, "record_too_large"),
        (StorageUnavailableError, 503, "storage_unavailable"),
        (StorageClosedError, 500, "storage_closed"),
        (RecordSchemaError, 500, "record_schema"),
        (StorageError, 500, "storage_error"),
        (DeadlineExceededError, 504, "deadline_exceeded"),
        (TimeoutError, 504, "deadline_exceeded"),
        (PDUnavailableError, 503, "pd_unavailable"),
        (LeaseExpiredError, 503, "lease_expired"),
        (PDRequestError, 502, "pd_refused"),
        (HostUnavailableError, 503, "host_unavailable"),
        (WrongHostError, 503, "wrong_host"),
        (OverloadedError, 503, "overloaded"),
        (ShuttingDownError, 503, "shutting_down"),
        (ActorNotFoundError, 404, "actor_not_found"),
        (ArgumentTypeError, 400, "bad_argument"),
        (RemoteError, 500, "remote_error"),
        (ConfigError, 500, "config_error"),
        (KoalaError, 500, "koala_error"),
    ]
    return {cls: ErrorAnswer(status, code) for cls, status, code in table}


def error_answer(exc: BaseException) -> tuple[int, dict[str, str], dict[str, str]]:
    """(status, JSON body, headers) for a Koala error (or a TimeoutError) that escaped an
    HTTP handler. The body is ``{"error": CODE, "message": TEXT}``; a 503 says when to
    retry; a 500 (a bug, or a server-side fault) does not repeat the error's text."""
    table = _error_table()
    answer = next(
        (table[cls] for cls in type(exc).__mro__ if cls in table), ErrorAnswer(500, "koala_error")
    )
    if answer.status == 504:
        message = _deadline_message(exc)
    elif answer.status == 500:
        message = f"internal error ({answer.code}); the server's log has the details"
    else:
        message = str(exc) or answer.code.replace("_", " ")
    headers = {"Retry-After": str(RETRY_AFTER)} if answer.status == 503 else {}
    return answer.status, {"error": answer.code, "message": message}, headers


def _deadline_message(exc: BaseException) -> str:
    if isinstance(exc, DeadlineExceededError) and exc.actor_type is not None:
        return exc.summary()
    return str(exc) or (
        "deadline exceeded: a deadline set around the call (a cancel scope) passed "
        "before it was answered"
    )


def add_error_handlers(app: Any) -> None:
    """Answer Koala's errors (and TimeoutError) with a status and a JSON body
    ``{"error": CODE, "message": TEXT}`` instead of a bare 500 (see docs/design.md,
    "HTTP answers").

    For a Starlette/FastAPI app (``koala dev`` and ``koala host`` call this on the user's
    app). Handlers the app registered itself win: Starlette picks the most specific class,
    and one the app gave for ``KoalaError`` or ``TimeoutError`` is kept as it is.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    if not isinstance(app, Starlette):
        return

    async def handler(request: Request, exc: Exception) -> Response:
        status, body, headers = error_answer(exc)
        if status == 500:
            log.error(
                "%s %s: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc
            )
        return JSONResponse(body, status_code=status, headers=headers or None)

    handlers = app.exception_handlers
    own_timeout = handlers.get(TimeoutError)
    if own_timeout is not None and DeadlineExceededError not in handlers:
        # DeadlineExceededError is a KoalaError first: keep the app's TimeoutError handler
        app.add_exception_handler(DeadlineExceededError, own_timeout)
    for exc_type in (KoalaError, TimeoutError):
        if exc_type not in handlers:
            app.add_exception_handler(exc_type, handler)


def parse_hostport(value: str, what: str = "address") -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); a ConfigError naming ``what`` for anything else."""
    try:
        return split_hostport(value)
    except ValueError as exc:
        raise ConfigError(
            f"{what} must look like HOST:PORT (e.g. 127.0.0.1:8000 or [::1]:8000): {exc}"
        ) from None


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


TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds a client has to finish its TLS handshake


def _check_tls(tls: TLSConfig) -> None:
    """Load the certificate and key now, so a bad file is a clear error at start (hypercorn
    would only load them once serving)."""
    try:
        tls.server_context()
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot serve HTTPS with certificate {tls.cert!r} and key {tls.key!r}: {exc}; "
            "check that both are PEM files and that the key belongs to the certificate"
        ) from None


def _quiet_tls_close() -> None:
    """hypercorn's asyncio server (0.17, 0.18) lets an ``ssl.SSLError`` escape a TLS
    connection's close when the client writes after the server's close_notify, which a
    WebSocket client answering the close frame does (pgjones/hypercorn#261), and a
    ``TimeoutError`` when the TLS shutdown times out (#264). The connection is over
    either way; without this asyncio logs each one as a task that failed."""
    from hypercorn.asyncio.tcp_server import TCPServer

    original = getattr(TCPServer, "_close", None)
    if original is None or getattr(original, "_koala_quiet", False):
        return

    async def _close(self: Any) -> None:
        with contextlib.suppress(ssl.SSLError, TimeoutError):  # nothing is left to close
            await original(self)

    _close._koala_quiet = True  # type: ignore[attr-defined]
    setattr(TCPServer, "_close", _close)  # noqa: B010 (a method of another library)


async def serve_asgi(
    app: Any,
    host: str,
    port: int,
    shutdown: anyio.Event,
    *,
    graceful_timeout: float = 3.0,
    tls: TLSConfig | None = None,
    require_client_cert: bool = False,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on host:port until ``shutdown`` is set; report the bound address.

    The socket is bound here (so port 0 works on every backend and errors are ours) and
    handed to hypercorn by file descriptor. With ``tls`` holding a certificate, it serves
    HTTPS (WebSockets: wss); a ``tls`` without one (or None) serves plain HTTP.
    ``require_client_cert``: clients must present a certificate ``tls.ca`` signed
    (mutual TLS: the PD's API).
    """
    secure = tls if tls is not None and tls.enabled else None
    if secure is not None:
        _check_tls(secure)
    sock = _bind_socket(host, port)
    bound = sock.getsockname()[:2]
    config = Config()
    config.bind = [f"fd://{os.dup(sock.fileno())}"]  # hypercorn owns (and closes) the dup
    config.graceful_timeout = graceful_timeout
    config.accesslog = None
    config.errorlog = None
    if secure is not None:
        settings = secure.hypercorn_settings(require_client_cert=require_client_cert)
        for name, value in settings.items():
            setattr(config, name, value)
        config.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT
    try:
        task_status.started((bound[0], bound[1]))
        if sniffio.current_async_library() == "trio":
            from hypercorn.trio import serve as trio_serve

            await trio_serve(app, config, shutdown_trigger=shutdown.wait)
        else:
            from hypercorn.asyncio import serve as asyncio_serve

            if secure is not None:
                _quiet_tls_close()

            await asyncio_serve(app, config, shutdown_trigger=shutdown.wait)
    finally:
        sock.close()
