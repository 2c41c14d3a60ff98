"""Serve an ASGI app (FastAPI) through hypercorn inside the runtime's event loop, over
HTTP or HTTPS (and so ws or wss), and answer Koala's errors with a status and a JSON body.

Every server Koala runs goes through :func:`serve_asgi`, which puts a thin ASGI front
before the app: ``/healthz`` and ``/readyz`` (docs/operations.md), a log line with
the traceback for every exception that escapes the app, and, while tracing is on, a
span per HTTP request (docs/operations.md, "Traces"). It also bounds shutdown: on
Python 3.12+ hypercorn's asyncio server waits for every open connection to close
(pgjones/hypercorn#308), so connections still open after the graceful timeout are
aborted here.

This is the one place that branches on the backend (hypercorn has a serve per loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio
import sniffio
from anyio.abc import TaskStatus
from hypercorn.config import Config
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from . import _metrics, _tracing
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
# hypercorn's own complaints (a lifespan that failed, a bad request line); its "Running
# on ..." line is INFO, below what this logger shows unless asked for
_hypercorn_log = logging.getLogger("koala.http.server")
if _hypercorn_log.level == logging.NOTSET:
    _hypercorn_log.setLevel(logging.WARNING)

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


# ---------------------------------------------------------------- health and errors

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# How a server says whether it should get traffic: "" when ready, else one word saying
# why not (e.g. "draining", "fenced"); that word is all /readyz reveals.
Readiness = Callable[[], Awaitable[str]]

HEALTH_PATHS = ("/healthz", "/readyz", "/metrics")
METRICS_TOKEN_ENV = "KOALA_METRICS_TOKEN"  # set: /metrics needs "Authorization: Bearer <it>"
WS_DRAIN_TIMEOUT = 10.0  # seconds a closed WebSocket's late messages are read and dropped
READINESS_TIMEOUT = 5.0  # seconds a readiness check may take before /readyz says "unknown"


def own_paths(app: Any) -> frozenset[str]:
    """The health paths a Starlette/FastAPI ``app`` routes itself (it keeps them)."""
    routes = getattr(app, "routes", None)
    if not isinstance(routes, list):
        return frozenset()
    paths = {getattr(route, "path", None) for route in routes}
    return frozenset(path for path in HEALTH_PATHS if path in paths)


class Front:
    """Pure ASGI middleware in front of every app Koala serves.

    - ``GET|HEAD /healthz``: 200 ``{"status": "alive"}`` while the process serves.
    - ``GET|HEAD /readyz``: 200 ``{"status": "ready"}``, or 503 with the word
      ``readiness`` answered (``"stopping"`` once ``stopping`` is set).
    - ``GET|HEAD /metrics``: this process's Prometheus metrics (koala._metrics); with
      ``KOALA_METRICS_TOKEN`` set, only for ``Authorization: Bearer <token>`` (401 else).
    - Every exception that escapes the app is logged once, with its traceback, method
      and path, on ``koala.http``; a request without an answer yet gets a plain 500.
    - While a tracer is configured (koala._tracing), every HTTP request but the health
      probes is served in a SERVER span continuing the client's ``traceparent``.

    A path the app routes itself (``own``) goes to the app. The health paths are
    answered before the app's middleware, so they need no credentials: they tell
    nothing but the state word.
    """

    def __init__(
        self,
        app: Any,
        readiness: Readiness | None = None,
        stopping: anyio.Event | None = None,
        own: frozenset[str] | None = None,
    ) -> None:
        self.app = app
        self.readiness = readiness
        self.stopping = stopping
        self.own = own_paths(app) if own is None else own
        token = os.environ.get(METRICS_TOKEN_ENV, "")
        self._metrics_auth = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and scope["path"] in HEALTH_PATHS and scope["path"] not in self.own:
            await self._health(scope, send)
            return
        if kind not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        active = _tracing.tracer  # None unless tracing is on: the whole cost when off
        if active is not None and kind == "http":
            await self._traced(active, scope, receive, send)
            return
        await self._serve(kind, scope, receive, send)

    async def _traced(self, active: Tracer, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve an HTTP request in a SERVER span, the child of the ``traceparent`` the
        client sent (if well formed), current while the app runs so the actor calls a
        route makes are its children. Named after the route's template once the app
        routed it (FastAPI puts the route in the scope), else ``HTTP <method>``."""
        method = scope.get("method", "GET")
        parent = _tracing.incoming(*_trace_headers(scope))
        attributes = {"http.request.method": method, "url.path": scope.get("path", "")}
        status = 0

        async def status_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message.get("status", 0))
            await send(message)

        with _tracing.span(active, f"HTTP {method}", SpanKind.SERVER, attributes, parent) as sp:
            try:
                await self._serve("http", scope, receive, status_send)
            finally:
                template = getattr(scope.get("route"), "path", None)
                if isinstance(template, str):
                    sp.update_name(f"{method} {template}")
                    sp.set_attribute("http.route", template)
                if status:
                    sp.set_attribute("http.response.status_code", status)
                if status >= 500 or not status:  # OpenTelemetry: a server span fails on 5xx
                    sp.set_status(Status(StatusCode.ERROR, f"HTTP {status or 'no answer'}"))

    async def _serve(self, kind: str, scope: Scope, receive: Receive, send: Send) -> None:
        started = disconnected = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] in ("http.response.start", "websocket.accept", "websocket.close"):
                started = True
            await send(message)

        async def tracked_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "websocket.disconnect":
                disconnected = True
            return message

        try:
            if kind == "websocket":
                await self.app(scope, tracked_receive, tracked_send)
                if not disconnected:
                    await _drain(receive)
            else:
                await self.app(scope, receive, tracked_send)
        except Exception as exc:
            method = scope.get("method", "WEBSOCKET")
            log.error(
                "%s %s failed: %s: %s",
                method,
                scope.get("path", "?"),
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
            if not started:
                await _send_500(kind, send)

    async def _health(self, scope: Scope, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await _send_json(send, 405, {"status": "method_not_allowed"}, scope, allow=True)
            return
        if scope["path"] == "/healthz":
            await _send_json(send, 200, {"status": "alive"}, scope)
            return
        if scope["path"] == "/metrics":
            await self._metrics(scope, send)
            return
        word = await self._why_not_ready()
        await _send_json(send, 503 if word else 200, {"status": word or "ready"}, scope)

    async def _metrics(self, scope: Scope, send: Send) -> None:
        if self._metrics_auth is not None:
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._metrics_auth):
                await _send_json(send, 401, {"status": "metrics_token_required"}, scope)
                return
        data, content_type = _metrics.exposition()
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(data)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else data}
        )

    async def _why_not_ready(self) -> str:
        if self.stopping is not None and self.stopping.is_set():
            return "stopping"
        if self.readiness is None:
            return ""
        try:
            with anyio.fail_after(READINESS_TIMEOUT):
                return await self.readiness()
        except Exception:  # a probe must answer; the log says what went wrong
            log.exception("the readiness check failed")
            return "unknown"


def _trace_headers(scope: Scope) -> tuple[str | None, str]:
    """The request's W3C ``traceparent`` and ``tracestate`` headers, as latin-1 text (any
    byte decodes; a malformed value is then ignored by _tracing.incoming). Several
    tracestate headers join with commas, as W3C says."""
    parent: str | None = None
    states: list[str] = []
    for name, value in scope.get("headers", ()):
        if name == b"traceparent":
            parent = value.decode("latin-1")
        elif name == b"tracestate":
            states.append(value.decode("latin-1"))
    return parent, ",".join(states)


async def _drain(receive: Receive) -> None:
    """Read a finished WebSocket app's leftover messages (for at most WS_DRAIN_TIMEOUT).

    hypercorn hands a connection's messages to the app through a small queue and stops
    reading the socket while it is full; once the app returned, nobody empties it, so
    the client's answer to the close (or its EOF) is never read and the connection
    stays open (a client that sent a burst and was closed for it, say). Discarding them
    until the disconnect lets hypercorn finish the close."""
    with anyio.move_on_after(WS_DRAIN_TIMEOUT):
        while (await receive())["type"] != "websocket.disconnect":
            pass


async def _send_json(
    send: Send, status: int, body: dict[str, str], scope: Scope, *, allow: bool = False
) -> None:
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if allow:
        headers.append((b"allow", b"GET, HEAD"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else data})


async def _send_500(kind: str, send: Send) -> None:
    with contextlib.suppress(Exception):  # the client may be gone already
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1011})
            return
        data = b'{"error": "internal", "message": "internal error; the server\'s log has it"}'
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
        ]
        await send({"type": "http.response.start", "status": 500, "headers": headers})
        await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------- bounded shutdown


class _Config(Config):
    """hypercorn's settings, and the connections its asyncio server has open
    (:func:`_track_connections` fills ``koala_open``)."""

    def __init__(self) -> None:
        super().__init__()
        self.koala_open: set[asyncio.StreamWriter] = set()


def _track_connections() -> None:
    """Have hypercorn's asyncio connections enter themselves in their server's
    ``_Config.koala_open`` while they run, so :func:`_abort_all` can cut them.

    Python 3.12+'s ``asyncio.Server.wait_closed()`` waits for every connection, and
    hypercorn 0.18 awaits it at shutdown before its own graceful timeout even starts
    (pgjones/hypercorn#308): a client that never closes (one flooding a WebSocket the
    gateway closed, say) kept the server up for ever. A connection that ends once the
    server is stopping is aborted as well: its close may wait for a client that reads
    nothing."""
    from hypercorn.asyncio.tcp_server import TCPServer

    original = TCPServer.run
    if getattr(original, "_koala_tracked", False):
        return

    async def run(self: Any) -> None:
        tracked: set[asyncio.StreamWriter] | None = getattr(self.config, "koala_open", None)
        if tracked is None:  # a server not started by serve_asgi
            await original(self)
            return
        writer: asyncio.StreamWriter = self.writer
        tracked.add(writer)
        try:
            await original(self)
        finally:
            tracked.discard(writer)
            if self.context.terminated.is_set():
                writer.transport.abort()  # closed already, or closing towards nobody

    run._koala_tracked = True  # type: ignore[attr-defined]
    TCPServer.run = run  # type: ignore[method-assign]


def _abort_all(tracked: set[asyncio.StreamWriter]) -> int:
    """Abort every connection still open; how many there were."""
    count = len(tracked)
    for writer in list(tracked):
        writer.transport.abort()
    return count


CUT_GRACE = 0.5  # seconds an app has to end once its connection was cut at shutdown


async def _cut_after(shutdown: anyio.Event, config: _Config) -> None:
    """Abort the connections still open shortly before ``graceful_timeout`` has passed
    since ``shutdown``, so that their apps see the disconnect and may end in the rest.

    On Python 3.12+ hypercorn then leaves ``Server.wait_closed()`` and waits for the
    connections' apps up to its ``graceful_timeout`` read at that moment: it is cut to
    the rest of the graceful time (3.11 began that wait at shutdown already)."""
    await shutdown.wait()
    grace = config.graceful_timeout
    cut = max(grace - CUT_GRACE, grace / 2)
    await anyio.sleep(cut)
    config.graceful_timeout = grace - cut
    if count := _abort_all(config.koala_open):
        log.info("aborted %d connection(s) still open %g s after shutdown began", count, cut)


async def serve_asgi(
    app: Any,
    host: str,
    port: int,
    shutdown: anyio.Event,
    *,
    graceful_timeout: float = 3.0,
    tls: TLSConfig | None = None,
    require_client_cert: bool = False,
    readiness: Readiness | None = None,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on host:port until ``shutdown`` is set; report the bound address.

    The socket is bound here (so port 0 works on every backend and errors are ours) and
    handed to hypercorn by file descriptor. With ``tls`` holding a certificate, it serves
    HTTPS (WebSockets: wss); a ``tls`` without one (or None) serves plain HTTP.
    ``require_client_cert``: clients must present a certificate ``tls.ca`` signed
    (mutual TLS: the PD's API).

    ``readiness`` answers ``/readyz`` (see :class:`Front`; None: ready until
    ``shutdown``). Once ``shutdown`` is set, requests in flight have
    ``graceful_timeout`` seconds; connections still open then are aborted, so this
    returns soon after whatever the clients do.
    """
    secure = tls if tls is not None and tls.enabled else None
    if secure is not None:
        _check_tls(secure)
    _tracing.refresh()  # a tracer provider configured since the last start counts
    front: Any = Front(app, readiness, shutdown)  # hypercorn types the app narrowly
    sock = _bind_socket(host, port)
    bound = sock.getsockname()[:2]
    config = _Config()
    config.bind = [f"fd://{os.dup(sock.fileno())}"]  # hypercorn owns (and closes) the dup
    config.graceful_timeout = graceful_timeout
    config.accesslog = None
    config.errorlog = _hypercorn_log
    if secure is not None:
        settings = secure.hypercorn_settings(require_client_cert=require_client_cert)
        for name, value in settings.items():
            setattr(config, name, value)
        config.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT
    try:
        task_status.started((bound[0], bound[1]))
        if sniffio.current_async_library() == "trio":
            from hypercorn.trio import serve as trio_serve

            # trio's serve gives its connections graceful_timeout itself, then cancels them
            await trio_serve(front, config, shutdown_trigger=shutdown.wait)
        else:
            from hypercorn.asyncio import serve as asyncio_serve

            if secure is not None:
                _quiet_tls_close()
            _track_connections()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_cut_after, shutdown, config)
                    await asyncio_serve(front, config, shutdown_trigger=shutdown.wait)
                    tg.cancel_scope.cancel()
            finally:
                _abort_all(config.koala_open)  # cancelled, or a connection outlived it
    finally:
        sock.close()
