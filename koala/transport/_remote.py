"""The transport of a node: a pool of channels to other nodes, and a listener.

:class:`Transport` is the runtime's ``RemoteDelivery``: ``call(host, req, spec)`` sends
a request to the node listening at ``host`` ("ip:port"), waits, and returns the decoded
result or raises the rebuilt remote error. It keeps one connection per peer: a peer
that dialed us and advertised its address is called back over that same connection.
A host that cannot be reached is dialed again on the next call, no sooner than the
backoff allows. Inbound requests go to ``handler`` (a host's ``Runtime.serve_request``).

Use it as ``async with Transport(config, handler=...) as t: await t.listen(...)``.

Inbound connections are strangers until their handshake is done (TLS first, when it is
on, then Koala's): at most ``max_unauthenticated`` of them are held, each for at most
``handshake_timeout``, apart from the ``max_connections`` of proven peers. When a new
one finds that cap full, the *oldest* stranger is dropped (CLOSE code 8): a real peer
finishes its handshake in a round trip or two, so it is displaced only if the cap's
worth of connections arrives within that time, whereas refusing the newest would let a
flood of idle connections, renewed every ``handshake_timeout``, keep every peer out.
A proven peer's connection is never dropped for a stranger.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import ByteStream, SocketAttribute, TaskGroup
from anyio.streams.tls import TLSStream

from .. import _metrics
from .._errors import ConfigError, HostUnavailableError
from .._messages import Request as CallRequest
from .._messages import rebuild_error
from .._net import is_loopback, join_hostport, split_hostport
from ..wire._events import (
    NEED_DATA,
    CloseCode,
    ConnectionClosed,
    GoAway,
    HandshakeComplete,
    ProtocolError,
    RemoteProtocolError,
)
from ..wire._protocol import Connection, Role
from ._accept import StrangerStream, accept_forever
from ._channel import Channel, EventHandler, Handler, NotSent
from ._config import TransportConfig
from ._observe import TransportStatistics, add_io, transport_metrics
from ._pipe import hold_reads
from ._secure import (
    CLOSED_AFTER_TLS,
    TLS_FILES_HINT,
    TLS_HANDSHAKE_RECORD,
    TLSRefused,
    broken_session,
    contexts,
)
from ._secure import accept as tls_accept
from ._secure import connect as tls_connect

if TYPE_CHECKING:
    from .._interface import MethodSpec

log = logging.getLogger("koala.transport")


@dataclass(slots=True)
class _Backoff:
    delay: float
    next_try: float
    error: str


class _Stranger:
    """An inbound connection that has not proven itself yet. ``stream`` is where a CLOSE
    frame can reach it (None while its TLS handshake runs)."""

    __slots__ = ("displaced", "scope", "stream")

    def __init__(self, stream: ByteStream) -> None:
        self.scope = anyio.CancelScope()
        self.displaced = False
        self.stream: ByteStream | None = stream


class _Attempt:
    __slots__ = ("channel", "done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.channel: Channel | None = None
        self.error: BaseException | None = None


class Transport:
    """A node's connections to other nodes (see the module docstring)."""

    def __init__(
        self,
        config: TransportConfig | None = None,
        *,
        handler: Handler | None = None,
        on_event: EventHandler | None = None,
    ) -> None:
        self.config = config or TransportConfig.from_env()
        self.handler = handler
        self.on_event = on_event
        self.address = ""  # where this node listens, once listen() ran
        self._channels: dict[str, Channel] = {}  # by peer address
        self._all: set[Channel] = set()
        # frames sent, received, bytes sent, received by the channels already closed
        self._closed_io = (0, 0, 0, 0)
        self._attempts: dict[str, _Attempt] = {}
        _metrics.report(self, transport_metrics)
        self._backoff: dict[str, _Backoff] = {}
        self._tg: TaskGroup | None = None
        self._listeners: list[anyio.abc.Listener[Any]] = []
        self._inbound = 0  # proven inbound connections
        # inbound connections in their handshake, oldest first (a dict keeps the order)
        self._strangers: dict[_Stranger, None] = {}
        self._connects = 0
        self._failed = 0
        self._refused = 0
        self._displaced = 0
        self._tls = contexts(self.config.tls) if self.config.tls is not None else None
        # methods seen finishing without suspending, learned once for the node, not per
        # connection (koala._drive.skips_scope)
        self._sync_methods: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Transport:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        for ch in list(self._all):
            ch.close("the node is stopping", CloseCode.SHUTDOWN)
        self._tg.cancel_scope.cancel()
        tg, self._tg = self._tg, None
        try:
            return await tg.__aexit__(exc_type, exc, tb)
        finally:
            with anyio.CancelScope(shield=True):
                for listener in self._listeners:
                    await listener.aclose()

    def _task_group(self) -> TaskGroup:
        if self._tg is None:
            raise HostUnavailableError("the transport is not running: use `async with Transport()`")
        return self._tg

    def is_open(self, address: str) -> bool:
        """Whether a channel to ``address`` is open now (a call would not dial)."""
        ch = self._channels.get(address)
        return ch is not None and not ch.closed

    def peers(self) -> list[str]:
        """Addresses of the nodes this one has an open connection with."""
        return [a for a, ch in self._channels.items() if not ch.closed]

    def statistics(self) -> TransportStatistics:
        io = self._closed_io
        for ch in self._all:
            io = add_io(io, ch)
        return TransportStatistics(
            connections=len(self._all),
            pending_calls=sum(ch.pending for ch in self._all),
            serving=sum(ch.serving for ch in self._all),
            connects=self._connects,
            failed_connects=self._failed,
            refused_connections=self._refused,
            unauthenticated=len(self._strangers),
            displaced=self._displaced,
            frames_sent=io[0],
            frames_received=io[1],
            bytes_sent=io[2],
            bytes_received=io[3],
        )

    async def go_away(self, reason: str = "the node is draining") -> None:
        """Tell every peer this node is draining (GOAWAY); calls in flight go on."""
        for ch in list(self._all):
            if not ch.closed:
                with contextlib.suppress(HostUnavailableError, NotSent, ProtocolError):
                    await ch.send_event(GoAway(reason))

    # ------------------------------------------------------------ listening

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Accept connections on ``host:port``; returns the bound address ("ip:port").

        Without a cluster secret or mutual TLS only loopback addresses may be bound (and
        only loopback peers are accepted). With TLS, every connection is a TLS session.
        """
        tg = self._task_group()
        if not self.config.proves_peers and not is_loopback(host):
            raise ConfigError(
                f"refusing to listen on {host}: without a cluster secret or mutual TLS a "
                "node accepts loopback peers only; set KOALA_CLUSTER_SECRET (openssl rand "
                f"-hex 32) on every node, or give every node {TLS_FILES_HINT} (a "
                "certificate of the cluster's CA is proof enough), or listen on 127.0.0.1"
            )
        if self._tls is not None and self._tls.server is None:
            raise ConfigError(
                "this node trusts a TLS CA but has no certificate of its own: it can dial "
                "TLS nodes but not listen; set --tls-cert and --tls-key (KOALA_TLS_CERT, "
                "KOALA_TLS_KEY)"
            )
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        self._listeners.append(listener)
        bound = listener.extra(SocketAttribute.local_address)
        address = join_hostport(str(bound[0]), int(bound[1]))
        if not self.address:
            self.address = address
        for one in getattr(listener, "listeners", [listener]):  # a MultiListener, or one
            sock = one.extra(SocketAttribute.raw_socket)
            tg.start_soon(accept_forever, sock, self._accept, tg)
        return address

    async def _accept(self, stream: StrangerStream) -> None:
        try:
            await self._serve_inbound(stream)
        except Exception:  # one connection's failure never stops the listener
            log.exception("inbound connection failed")
        finally:
            await anyio.aclose_forcefully(stream)

    def _connection(self, role: Role) -> Connection:
        """A protocol state machine for one connection of this node."""
        cfg = self.config
        return Connection(
            role,
            cluster_id=cfg.cluster_id,
            node_id=cfg.node_id,
            secret=cfg.secret,
            address=self.address,
            max_frame_size=cfg.max_frame_size,
        )

    async def _serve_inbound(self, stream: StrangerStream) -> None:
        """A connection, from its first byte: nothing is read that the handshake does not
        ask for (see ``_accept``) until the peer is proven."""
        cfg = self.config
        conn = self._connection(Role.SERVER)
        _set_nodelay(stream)
        peer_host = str(stream.extra(SocketAttribute.remote_address, ("?", 0))[0])
        if not cfg.proves_peers and not is_loopback(peer_host):
            self._refused += 1
            await _send_close(
                stream,
                conn,
                ProtocolError(
                    f"this node has no cluster secret nor mutual TLS and accepts loopback "
                    f"peers only, not {peer_host}",
                    CloseCode.NOT_ALLOWED,
                ),
            )
            return
        stranger = self._admit(stream)
        proven: tuple[ByteStream, HandshakeComplete] | None = None
        refusal: ProtocolError | None = None
        try:
            with stranger.scope, anyio.move_on_after(cfg.handshake_timeout) as timer:
                try:
                    proven = await self._prove(stranger, conn)
                except RemoteProtocolError as exc:
                    log.warning("refused a connection from %s: %s", peer_host, exc)
                    refusal = exc
                except TLSRefused as exc:
                    log.warning("refused a connection from %s: %s", peer_host, exc)
                except _Closed:
                    pass
            if proven is None and stranger.displaced:
                refusal = ProtocolError(
                    f"displaced by newer connections: this node holds at most "
                    f"{cfg.max_unauthenticated} connections in their handshake "
                    "(max_unauthenticated)",
                    CloseCode.OVERLOADED,
                )
            elif proven is None and timer.cancelled_caught:
                refusal = ProtocolError(
                    f"no handshake within {cfg.handshake_timeout} s (handshake_timeout)",
                    CloseCode.HANDSHAKE_TIMEOUT,
                )
        finally:
            self._strangers.pop(stranger, None)
        if proven is None:
            self._refused += 1
            if refusal is not None and stranger.stream is not None:
                await _send_close(stranger.stream, conn, refusal)
            return
        proven_stream, peer = proven
        if self._inbound >= cfg.max_connections:
            self._refused += 1
            await _send_close(
                proven_stream,
                conn,
                ProtocolError(
                    f"this node holds {self._inbound} connections (max_connections)",
                    CloseCode.OVERLOADED,
                ),
            )
            return
        handed = await stream.hand_over()  # anyio's stream from here on (under TLS too)
        channel_stream = handed if proven_stream is stream else proven_stream
        self._inbound += 1
        try:
            name = peer.peer_address or f"{peer_host} (node {peer.peer_node_id})"
            ch = self._channel_for(channel_stream, conn, peer, name)
            if peer.peer_address and peer.peer_address not in self._channels:
                self._channels[peer.peer_address] = ch  # call the peer back on it
            await ch.run()
        finally:
            self._inbound -= 1

    def _admit(self, stream: ByteStream) -> _Stranger:
        """Hold a new inbound connection as a stranger, displacing the oldest one if
        ``max_unauthenticated`` are held (see the module docstring for why the oldest)."""
        strangers = self._strangers
        if len(strangers) >= self.config.max_unauthenticated:
            oldest = next(iter(strangers))
            del strangers[oldest]
            oldest.displaced = True
            oldest.scope.cancel()
            self._displaced += 1
        stranger = _Stranger(stream)
        strangers[stranger] = None
        return stranger

    async def _prove(
        self, stranger: _Stranger, conn: Connection
    ) -> tuple[ByteStream, HandshakeComplete]:
        """The inbound handshake: TLS when it is on, then Koala's; the stream to use."""
        stream = stranger.stream
        assert stream is not None
        if self._tls is not None:
            assert self._tls.server is not None  # listen() checked it
            head = await _receive(stream)
            if not head:
                raise _Closed("the peer closed the connection before its TLS handshake")
            if head[0] != TLS_HANDSHAKE_RECORD:
                raise RemoteProtocolError(
                    "this node speaks TLS on host links and the peer sent plain TCP: turn "
                    f"TLS on for every node or none, with {TLS_FILES_HINT}",
                    CloseCode.NOT_ALLOWED,
                )
            stranger.stream = None  # until TLS is up, a CLOSE frame cannot be sent
            stream = await tls_accept(stream, head, self._tls.server)
            stranger.stream = stream
        return stream, await _handshake(stream, conn)

    def _channel_for(
        self, stream: ByteStream, conn: Connection, peer: HandshakeComplete, name: str
    ) -> Channel:
        ch = Channel(
            stream,
            conn,
            peer,
            self.config,
            name=name,
            handler=lambda: self.handler,
            on_event=lambda: self.on_event,
            on_close=self._forget,
            sync_methods=self._sync_methods,
        )
        self._all.add(ch)
        return ch

    def _forget(self, ch: Channel) -> None:
        if ch in self._all:
            self._all.remove(ch)
            self._closed_io = add_io(self._closed_io, ch)
        for address, known in list(self._channels.items()):
            if known is ch:
                del self._channels[address]

    # ------------------------------------------------------------ dialing

    async def channel(self, address: str) -> Channel:
        """The open channel to the node at ``address``, dialing it if needed."""
        while True:
            ch = self._channels.get(address)
            if ch is not None and not ch.closed:
                return ch
            attempt = self._attempts.get(address)
            if attempt is None:
                break
            await attempt.done.wait()
            if attempt.channel is not None and not attempt.channel.closed:
                return attempt.channel
            if attempt.error is not None:
                raise attempt.error
            # the dialing caller was cancelled: try again ourselves
        backoff = self._backoff.get(address)
        now = anyio.current_time()
        if backoff is not None and now < backoff.next_try:
            raise HostUnavailableError(
                f"the node at {address} cannot be reached ({backoff.error}); the next attempt "
                f"is allowed in {backoff.next_try - now:.2f} s"
            )
        attempt = self._attempts[address] = _Attempt()
        try:
            ch = await self._dial(address)
        except (OSError, ProtocolError, TimeoutError, _Closed, TLSRefused, ValueError) as exc:
            self._failed += 1
            delay = self.config.reconnect_min
            if backoff is not None:
                delay = min(self.config.reconnect_max, backoff.delay * 2)
            reason = str(exc) or type(exc).__name__
            self._backoff[address] = _Backoff(delay, anyio.current_time() + delay, reason)
            attempt.error = HostUnavailableError(
                f"the node at {address} cannot be reached: {reason}"
            )
            raise attempt.error from None
        else:
            self._backoff.pop(address, None)
            attempt.channel = ch
            return ch
        finally:
            del self._attempts[address]
            attempt.done.set()

    async def _dial(self, address: str) -> Channel:
        cfg = self.config
        host, port = split_hostport(address)
        with anyio.fail_after(cfg.connect_timeout):
            raw = await anyio.connect_tcp(host, port)
        stream: ByteStream = raw
        try:
            hold_reads(raw)
            _set_nodelay(raw)
            conn = self._connection(Role.CLIENT)
            with anyio.fail_after(cfg.handshake_timeout):
                if self._tls is not None:
                    stream = await tls_connect(raw, host, self._tls.client)
                try:
                    peer = await _handshake(stream, conn, conn.initiate())
                except RemoteProtocolError as exc:
                    await _send_close(stream, conn, exc)
                    raise
            ch = self._channel_for(stream, conn, peer, address)
            self._connects += 1
            self._channels[address] = ch
            await self._task_group().start(ch.run)
            return ch
        except BaseException:
            await anyio.aclose_forcefully(raw)
            raise

    # ------------------------------------------------------------ RemoteDelivery

    async def call(self, host: str, req: CallRequest, spec: MethodSpec) -> Any:
        """Send ``req`` (args already CBOR data) to the node at ``host``; the result.

        A request that never left this process (the connection died while it was still
        queued) is sent once more on a fresh connection; one that may have reached the
        peer fails with HostUnavailableError and is never sent again.
        """
        for attempt in range(2):
            ch = self._channels.get(host)
            if ch is None or ch.closed:
                ch = await self.channel(host)
            try:
                resp = await ch.request(req)
            except NotSent as exc:
                if attempt:
                    raise HostUnavailableError(
                        f"the node at {host} cannot be reached: {exc}"
                    ) from None
                continue
            break
        if resp is None:
            return None
        if resp.error is not None:
            raise rebuild_error(resp.error)
        return spec.result.from_wire(resp.result, f"the result of {spec.qualname}")


class _Closed(Exception):
    """The peer closed the connection during the handshake."""


async def _handshake(stream: ByteStream, conn: Connection, first: bytes = b"") -> HandshakeComplete:
    """Run the handshake on ``conn`` to completion; a client gives its HELLO as ``first``."""

    async def send(data: bytes) -> None:
        try:
            await stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise _broke(stream, conn, exc) from None

    out = first
    while True:
        if out:
            await send(out)
        ev = conn.next_event()
        out = conn.data_to_send()
        if isinstance(ev, HandshakeComplete):
            if out:
                await send(out)
            return ev
        if isinstance(ev, ConnectionClosed):
            if _refused_by_tls(stream, conn):
                raise _Closed(CLOSED_AFTER_TLS)
            raise _Closed(f"the peer closed the connection: {ev.reason or 'no reason given'}")
        if ev is NEED_DATA and not out:
            try:
                data = await stream.receive()
            except anyio.EndOfStream:
                data = b""
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise _broke(stream, conn, exc) from None
            conn.receive_data(data or None)


def _refused_by_tls(stream: ByteStream, conn: Connection) -> bool:
    """Whether a dialler's TLS session ended before a word of Koala came back: with
    TLS 1.3 that is how a listener refuses the dialler's certificate."""
    return isinstance(stream, TLSStream) and conn.role is Role.CLIENT and not conn.frames_received


def _broke(stream: ByteStream, conn: Connection, exc: BaseException) -> _Closed:
    if _refused_by_tls(stream, conn):
        return _Closed(broken_session(exc) or CLOSED_AFTER_TLS)
    return _Closed(f"the connection broke during the handshake: {exc!r}")


async def _receive(stream: ByteStream) -> bytes:
    """The first bytes of an inbound connection (b"": the stream ended)."""
    try:
        return await stream.receive()
    except anyio.EndOfStream:
        return b""
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
        raise _Closed(f"the connection broke before its handshake: {exc!r}") from None


async def _send_close(stream: ByteStream, conn: Connection, exc: ProtocolError) -> None:
    with anyio.move_on_after(1.0, shield=True):
        try:
            data = conn.close_frame(exc)
            if data:
                await stream.send(data)
        except Exception:
            pass


def _set_nodelay(stream: ByteStream) -> None:
    sock = stream.extra(SocketAttribute.raw_socket, None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
