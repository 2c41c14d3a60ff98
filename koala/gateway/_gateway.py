"""The WebSocket gateway: an ASGI app served by hypercorn, one task pair per client.

A client connects, sends its first packet (authenticated by :mod:`._auth`), is bound to
an actor, and from then on every frame it sends goes to that actor through a
:class:`Link`, unchanged and in order; what the actor pushes comes back through the
client's bounded send queue. The link is in-process (:class:`LocalLink`, for ``koala
dev``) or a cluster member speaking the wire protocol (``koala.gateway.ClusterLink``).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import TaskStatus
from prometheus_client.core import Metric

from .. import _metrics
from .._errors import KoalaError
from .._interface import ActorInterface
from .._messages import Key
from .._proxy import make_proxy
from .._tls import TLSConfig
from ._auth import AuthError, FirstPacket, check_first_packet
from ._codes import ClientCloseCode
from ._config import GatewayConfig
from ._replay import ReplayCache
from ._session import Data, IAccount, SessionClosedError, hub_for

if TYPE_CHECKING:
    from ..host import Runtime

log = logging.getLogger("koala.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_session_ids = itertools.count(random.getrandbits(52) + 1)
_CLOSE = object()  # marker in a send queue: close now


class BindError(KoalaError):
    """The session could not be bound or a frame not delivered: close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Link(Protocol):
    """How a gateway reaches actors (in-process or over the wire)."""

    def attach(self, gateway: Gateway) -> None: ...

    async def find_actor(self, packet: FirstPacket) -> tuple[str, Key]: ...

    async def open(self, conn: ClientConnection) -> None: ...

    async def message(self, conn: ClientConnection, data: Data) -> None: ...

    async def closed(self, conn: ClientConnection, reason: str) -> None: ...


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved; ``take()`` spends one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


class ClientConnection:
    """One client's WebSocket on the gateway side: its session and send queue."""

    def __init__(self, gateway: Gateway, remote: str) -> None:
        self.gateway = gateway
        self.remote = remote
        self.session_id = next(_session_ids)
        self.actor_type = ""
        self.key: Key = ""
        self.metadata: dict[str, str] = {}
        self.bound = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.disconnected = False  # the client went away (no close frame to send)
        self.host: Any = None  # the link's handle on where the session lives
        self._send, self._queue = anyio.create_memory_object_stream[Any](
            gateway.config.send_queue_size
        )
        self._writer_scope = anyio.CancelScope()
        self._reader_scope = anyio.CancelScope()

    def __repr__(self) -> str:
        return f"<ClientConnection {self.session_id} {self.remote} {self.actor_type}/{self.key!r}>"

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    def push_nowait(self, data: Data) -> None:
        """Queue a frame to the client; a full queue closes it (it does not read)."""
        if self.close_code is not None:
            raise SessionClosedError(f"session {self.session_id} is closed")
        try:
            self._send.send_nowait(data)
        except anyio.WouldBlock:
            log.warning(
                "client %s (session %d): send queue full (%d frames): closing",
                self.remote,
                self.session_id,
                self.gateway.config.send_queue_size,
            )
            self.close(ClientCloseCode.SEND_QUEUE_FULL, "send queue full: read your frames")
            self._writer_scope.cancel()  # it may be stuck on a client that does not read

    def close(self, code: int, reason: str) -> None:
        """Close the WebSocket with ``code``; frames still queued are not sent."""
        if self.close_code is not None:
            return
        self.close_code, self.close_reason = int(code), reason[:120]
        _closes.inc((str(self.close_code),))
        self._reader_scope.cancel()
        try:
            self._send.send_nowait(_CLOSE)
        except anyio.WouldBlock:
            self._writer_scope.cancel()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass


@dataclass(frozen=True, slots=True)
class GatewayStatistics:
    connections: int
    sessions: int
    accepted: int
    refused: int
    frames_in: int
    frames_out: int
    replays: int = 0  # first packets refused as replays (4006)
    first_packets_seen: int = 0  # entries of the replay cache (packets still in the window)


# close codes the gateway sent its clients (process-wide: codes are few)
_closes = _metrics.Counters(
    "koala_gateway_closes_total", "WebSocket sessions closed by the gateway, by code", ("code",)
)
_metrics.report(_metrics.PROCESS, lambda _: [_closes.family()])


def _gateway_metrics(gateway: Gateway) -> list[Metric]:
    st = gateway.statistics()
    c, g = _metrics.counter, _metrics.gauge
    return [
        g("koala_gateway_connections", "Open WebSocket connections", st.connections),
        g("koala_gateway_sessions", "Signed-in sessions bound to an actor", st.sessions),
        c("koala_gateway_accepted_total", "Connections accepted", st.accepted),
        c("koala_gateway_refused_total", "Connections refused", st.refused),
        c("koala_gateway_frames_received_total", "Frames from clients", st.frames_in),
        c("koala_gateway_frames_sent_total", "Frames to clients", st.frames_out),
        c("koala_gateway_replays_total", "First packets refused as replays", st.replays),
    ]


class Gateway:
    """The gateway's ASGI app. Serve it with :meth:`serve` (hypercorn, any backend)."""

    def __init__(self, config: GatewayConfig, link: Link) -> None:
        self.config = config
        self.link = link
        self.connections: dict[int, ClientConnection] = {}  # bound sessions, by id
        self._open = 0
        self._accepted = 0
        self._refused = 0
        self._frames_in = 0
        self._frames_out = 0
        self.replay_cache = ReplayCache(config.replay_cache_size)
        self._stopping = False
        self._all: set[ClientConnection] = set()
        self._gone = anyio.Event()
        link.attach(self)
        _metrics.report(self, _gateway_metrics)

    def statistics(self) -> GatewayStatistics:
        return GatewayStatistics(
            connections=self._open,
            sessions=len(self.connections),
            accepted=self._accepted,
            refused=self._refused,
            frames_in=self._frames_in,
            frames_out=self._frames_out,
            replays=self.replay_cache.statistics().replays,
            first_packets_seen=len(self.replay_cache),
        )

    # ------------------------------------------------------------ serving

    async def serve(
        self,
        host: str,
        port: int,
        shutdown: anyio.Event,
        *,
        tls: TLSConfig | None = None,
        task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on host:port until ``shutdown`` is set; clients are then closed with 1001
        (so hypercorn need not wait its graceful timeout for them). With ``tls`` holding a
        certificate, clients connect with wss."""
        from ..http import serve_asgi

        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            serve = partial(serve_asgi, tls=tls, readiness=self.readiness)
            bound = await tg.start(serve, self, host, port, stop)
            scheme = "wss" if tls is not None and tls.enabled else "ws"
            log.info("gateway listening on %s://%s:%d", scheme, bound[0], bound[1])
            task_status.started(bound)
            await shutdown.wait()
            await self.close_all()
            stop.set()

    async def readiness(self) -> str:
        """``/readyz`` of the gateway (on its listener, over plain HTTP): "" while it
        takes clients; "stopping" once it closes them, "full" at ``max_connections``."""
        if self._stopping:
            return "stopping"
        if self._open >= self.config.max_connections:
            return "full"
        return ""

    async def close_all(self, grace: float = 2.0) -> None:
        """Close every client with 1001 and wait (at most ``grace``) for them to go."""
        self._stopping = True
        for conn in list(self._all):
            conn.close(ClientCloseCode.GOING_AWAY, "the gateway is stopping")
        if self._all:
            with anyio.move_on_after(grace):
                await self._gone.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            body = b"koala gateway: connect with a WebSocket client\n"
            await send(
                {
                    "type": "http.response.start",
                    "status": 426,
                    "headers": [(b"content-type", b"text/plain"), (b"upgrade", b"websocket")],
                }
            )
            await send({"type": "http.response.body", "body": body})
        elif kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        msg = await receive()
        if msg["type"] != "websocket.connect":
            return
        client = scope.get("client") or ("?", 0)
        remote = f"{client[0]}:{client[1]}"
        await send({"type": "websocket.accept"})
        if self._stopping or self._open >= self.config.max_connections:
            self._refused += 1
            why = "the gateway is stopping" if self._stopping else "too many connections"
            log.warning("refused client %s: %s", remote, why)
            code = ClientCloseCode.GOING_AWAY if self._stopping else ClientCloseCode.TRY_AGAIN_LATER
            await _send_close(send, code, why)
            return
        self._open += 1
        conn = ClientConnection(self, remote)
        self._all.add(conn)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read, conn, receive)
                await self._write(conn, send)
                tg.cancel_scope.cancel()
        finally:
            conn._send.close()
            self._open -= 1
            self._all.discard(conn)
            self.connections.pop(conn.session_id, None)
            if conn.bound:
                reason = conn.close_reason or "closed"
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    try:
                        await self.link.closed(conn, reason)
                    except Exception:
                        log.exception("reporting the end of session %d failed", conn.session_id)
            if not self._all:
                self._gone.set()
                self._gone = anyio.Event()

    async def _write(self, conn: ClientConnection, send: Send) -> None:
        """Send queued frames until a close; then the close frame."""
        with conn._writer_scope:
            async with conn._queue:
                async for item in conn._queue:
                    if item is _CLOSE or conn.closing:
                        break
                    key = "text" if type(item) is str else "bytes"
                    try:
                        await send({"type": "websocket.send", key: item})
                    except Exception:  # the client is gone
                        conn.disconnected = True
                        conn.close(ClientCloseCode.NORMAL, "client left")
                        break
                    self._frames_out += 1
        if not conn.disconnected:
            code = conn.close_code or ClientCloseCode.NORMAL
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                await _send_close(send, code, conn.close_reason)

    async def _read(self, conn: ClientConnection, receive: Receive) -> None:
        try:
            with conn._reader_scope:
                await self._serve_client(conn, receive)
        except Exception as exc:
            log.exception("client %s (session %d) failed", conn.remote, conn.session_id)
            conn.close(ClientCloseCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
        if not conn.closing:  # the client left, or the reader ended: let the writer end
            conn.close(ClientCloseCode.NORMAL, "client left")

    async def _receive(
        self, conn: ClientConnection, receive: Receive, limit: float, code: int, why: str
    ) -> Data | None:
        """The next frame, or None once the connection is over (closed here if timed out)."""
        with anyio.move_on_after(limit):
            msg = await receive()
            if msg["type"] == "websocket.receive":
                data: Data | None = msg.get("text")
                if data is None:
                    data = msg.get("bytes") or b""
                return data
            conn.disconnected = True
            conn.close(int(msg.get("code") or 1005), "client left")
            return None
        log.info("client %s (session %d): %s", conn.remote, conn.session_id, why)
        conn.close(code, why)
        return None

    async def _serve_client(self, conn: ClientConnection, receive: Receive) -> None:
        cfg = self.config
        first = await self._receive(
            conn, receive, cfg.auth_timeout, ClientCloseCode.AUTH_TIMEOUT, "no first packet in time"
        )
        if first is None:
            return
        try:
            now = time.time()
            packet = check_first_packet(
                first,
                private_key=cfg.private_key,
                mode=cfg.checksum,
                now=now,
                window=cfg.timestamp_window,
                max_size=cfg.max_first_packet,
            )
            self.replay_cache.admit(packet.digest, packet.timestamp + cfg.timestamp_window, now)
        except AuthError as exc:
            self._refused += 1
            log.warning("refused client %s: %s (close %d)", conn.remote, exc.reason, exc.code)
            conn.close(exc.code, exc.reason)
            return
        if not await self._bind(conn, packet):
            return
        self._accepted += 1
        bucket = TokenBucket(cfg.rate, cfg.burst, anyio.current_time())
        max_size = cfg.max_frame_size
        link = self.link
        while True:
            data = await self._receive(
                conn, receive, cfg.idle_timeout, ClientCloseCode.IDLE_TIMEOUT, "idle timeout"
            )
            if data is None:
                return
            size = len(data)
            if type(data) is str and size * 4 > max_size:
                size = len(data.encode("utf-8", "surrogatepass"))
            if size > max_size:
                log.warning(
                    "client %s (session %d): a frame of %d bytes exceeds max_frame_size %d",
                    conn.remote,
                    conn.session_id,
                    size,
                    max_size,
                )
                conn.close(ClientCloseCode.MESSAGE_TOO_BIG, f"frame larger than {max_size} bytes")
                return
            if not bucket.take(anyio.current_time()):
                log.warning(
                    "client %s (session %d): rate limit exceeded (%g frames/s, burst %d)",
                    conn.remote,
                    conn.session_id,
                    cfg.rate,
                    cfg.burst,
                )
                conn.close(ClientCloseCode.RATE_LIMITED, "rate limit exceeded")
                return
            self._frames_in += 1
            try:
                await link.message(conn, data)
            except BindError as exc:
                log.warning(
                    "client %s (session %d): frame not delivered: %s",
                    conn.remote,
                    conn.session_id,
                    exc.reason,
                )
                conn.close(exc.code, exc.reason)
                return

    async def _bind(self, conn: ClientConnection, packet: FirstPacket) -> bool:
        """Find the actor (named, or through the account service) and open the session."""
        try:
            with anyio.fail_after(self.config.bind_timeout):
                if packet.actor_type is not None and packet.actor_id is not None:
                    actor_type, key = packet.actor_type, packet.actor_id
                else:
                    actor_type, key = await self.link.find_actor(packet)
                conn.actor_type, conn.key = actor_type, key
                conn.metadata = {**packet.fields, "remote": conn.remote}
                self.connections[conn.session_id] = conn
                conn.bound = True
                await self.link.open(conn)
        except BindError as exc:
            self._refused += 1
            log.warning("client %s (open_id %r): %s", conn.remote, packet.open_id, exc.reason)
            conn.close(exc.code, exc.reason)
            return False
        except TimeoutError:
            self._refused += 1
            log.warning("client %s (open_id %r): binding timed out", conn.remote, packet.open_id)
            conn.close(ClientCloseCode.UNAVAILABLE, "binding the session timed out")
            return False
        except Exception as exc:
            self._refused += 1
            log.warning(
                "client %s (open_id %r): no actor to bind: %s", conn.remote, packet.open_id, exc
            )
            conn.close(ClientCloseCode.NO_ACTOR, f"no actor to bind: {type(exc).__name__}")
            return False
        log.info(
            "client %s (open_id %r) bound to %s/%r as session %d",
            conn.remote,
            packet.open_id,
            actor_type,
            key,
            conn.session_id,
        )
        return True


async def _send_close(send: Send, code: int, reason: str) -> None:
    try:
        await send({"type": "websocket.close", "code": int(code), "reason": reason})
    except Exception:  # the client is already gone
        log.debug("close frame not sent", exc_info=True)


def account_target(ref: Any) -> tuple[str, Key]:
    """(actor type, key) from what the account service answered."""
    if isinstance(ref, (tuple, list)) and len(ref) == 2:
        actor_type, key = ref
    else:
        actor_type, key = getattr(ref, "actor_type", None), getattr(ref, "actor_id", None)
    if not isinstance(actor_type, str) or not actor_type or type(key) not in (str, int):
        raise BindError(ClientCloseCode.NO_ACTOR, "the account service named no actor")
    return actor_type, key


# ---------------------------------------------------------------- in-process


class LocalLink:
    """A gateway in the host's own process (``koala dev --gateway``): sessions go to the
    runtime's hub directly, pushes come back without leaving the process."""

    def __init__(self, runtime: Runtime, account: type[ActorInterface] = IAccount) -> None:
        self.runtime = runtime
        self.account = account
        self.hub = hub_for(runtime)
        self._conns: dict[int, ClientConnection] = {}
        self._method = "find_actor"

    def attach(self, gateway: Gateway) -> None:
        self._conns = gateway.connections
        self._method = gateway.config.account_method
        if self._method not in self.account.__koala_methods__:
            from .._errors import ConfigError

            raise ConfigError(
                f"the account interface {self.account.__name__} has no method "
                f"{self._method!r} (GatewayConfig.account_method)"
            )

    async def find_actor(self, packet: FirstPacket) -> tuple[str, Key]:
        proxy = make_proxy(self.account, packet.open_id, self.runtime)
        return account_target(await getattr(proxy, self._method)(packet.server_id))

    async def open(self, conn: ClientConnection) -> None:
        refused = self.hub.open(
            self, self, conn.session_id, conn.actor_type, conn.key, conn.metadata
        )
        if refused is not None:
            raise BindError(*refused)

    async def message(self, conn: ClientConnection, data: Data) -> None:
        refused = self.hub.message(self, conn.session_id, data)
        if refused is not None:
            raise BindError(*refused)

    async def closed(self, conn: ClientConnection, reason: str) -> None:
        self.hub.closed(self, conn.session_id, reason)

    # Outlet: what actors push
    async def push(self, session_id: int, data: Data) -> None:
        conn = self._conns.get(session_id)
        if conn is None:
            raise SessionClosedError(f"session {session_id} is closed")
        conn.push_nowait(data)

    async def close(self, session_id: int, code: int, reason: str) -> None:
        conn = self._conns.get(session_id)
        if conn is not None:
            conn.close(code, reason)

    async def ack(self, session_id: int, seq: int) -> None:
        """In-process frames carry no sequence number: nothing to acknowledge."""
