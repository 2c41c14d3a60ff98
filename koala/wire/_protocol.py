"""The Koala wire protocol as a pure object: bytes in, events out; events in, bytes out.

No I/O happens here (h11/wsproto style). The transport feeds what it reads to
:meth:`Connection.receive_data` (``None`` for end of stream), takes events from
:meth:`Connection.next_event` until it returns :data:`NEED_DATA`, writes what
:meth:`Connection.send` returns, and also writes :meth:`Connection.data_to_send`:
the handshake replies the connection produces itself.

The handshake, client side: ``initiate()`` gives HELLO; the server answers WELCOME with
its proof; the client checks it and answers AUTH with its own. Each side reports
:class:`HandshakeComplete` once the other is proven. The states and what may be sent and
received in each are the tables below.

Until the handshake is done the peer is a stranger, so its input is bounded by what a
handshake needs, not by ``max_frame_size``: a frame (or a length prefix) above
:data:`MAX_HANDSHAKE_FRAME` is refused as soon as its 4 length bytes arrive, and while
the peer has to wait for this side's answer (states AWAIT_HELLO and AWAIT_WELCOME) more
than :data:`MAX_HANDSHAKE_BUFFER` bytes is refused too. Either way the bytes are dropped
at once, in :meth:`Connection.receive_data`.

Liveness is for the transport to judge, from :attr:`Connection.frames_received`: the
count of whole frames received, which bytes of an unfinished frame do not move.
"""

from __future__ import annotations

import enum
import os
from typing import Any

from ._events import (
    GATEWAY_EVENTS,
    NEED_DATA,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    Auth,
    Cancel,
    Close,
    CloseCode,
    ConnectionClosed,
    Event,
    GoAway,
    HandshakeComplete,
    Hello,
    LocalProtocolError,
    OutgoingCall,
    Ping,
    Pong,
    ProtocolError,
    RemoteProtocolError,
    Request,
    Response,
    Welcome,
    _NeedData,
)
from ._wire import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER,
    HEADER_SIZE,
    MAX_FRAME_LIMIT,
    decode,
    frame,
    proof,
    proofs_match,
    request_frame,
    result_frame,
)

MIN_FRAME_SIZE = 1024
MIN_SECRET_SIZE = 16

# The largest frame accepted before the handshake is done. HELLO, WELCOME and AUTH of
# ids within MAX_ID_BYTES take a few hundred bytes; a CLOSE sent before the handshake
# is cut to fit (see close_frame).
MAX_HANDSHAKE_FRAME = 4096
# Most bytes held from a peer that must wait for this side's answer before it may send
# more (a server before HELLO is answered, a client before WELCOME): its one handshake
# frame and a CLOSE.
MAX_HANDSHAKE_BUFFER = 2 * MAX_HANDSHAKE_FRAME
# Most UTF-8 bytes of a cluster id or node id (so HELLO and WELCOME fit the bound above).
MAX_ID_BYTES = 1024
# The first bytes of a TLS record carrying a handshake (a ClientHello): a peer that
# speaks TLS to a node that does not is told so.
_TLS_RECORD = b"\x16\x03"
# UTF-8 bytes of a CLOSE reason sent before the handshake is done (so it fits).
_CLOSE_REASON_BYTES = MAX_HANDSHAKE_FRAME - 64


class Role(enum.Enum):
    CLIENT = "client"  # dialed the connection; sends HELLO
    SERVER = "server"  # accepted it; answers WELCOME


class State(enum.Enum):
    IDLE = "IDLE"  # client, before initiate()
    AWAIT_HELLO = "AWAIT_HELLO"  # server, waiting for the client's HELLO
    AWAIT_WELCOME = "AWAIT_WELCOME"  # client, HELLO sent
    AWAIT_AUTH = "AWAIT_AUTH"  # server, WELCOME sent
    OPEN = "OPEN"  # handshake done: calls flow both ways
    CLOSED = "CLOSED"  # CLOSE sent or received, or the stream ended
    ERROR = "ERROR"  # the peer broke the protocol: send CLOSE and close


_CALLS: frozenset[type[Event]] = frozenset(
    {Request, Response, Cancel, Ping, Pong, GoAway, Close, *GATEWAY_EVENTS}
)

# States where the peer has to wait for this side before it may send a second frame.
_PEER_WAITS = frozenset({State.AWAIT_HELLO, State.AWAIT_WELCOME})

# What the user may send in each state (handshake messages are sent by the connection).
SEND: dict[State, frozenset[type[Event]]] = {
    State.IDLE: frozenset({Close}),
    State.AWAIT_HELLO: frozenset({Close}),
    State.AWAIT_WELCOME: frozenset({Close}),
    State.AWAIT_AUTH: frozenset({Close}),
    State.OPEN: _CALLS,
    State.CLOSED: frozenset(),
    State.ERROR: frozenset({Close}),
}

# What the peer may send in each state.
RECEIVE: dict[State, frozenset[type[Event]]] = {
    State.IDLE: frozenset(),
    State.AWAIT_HELLO: frozenset({Hello, Close}),
    State.AWAIT_WELCOME: frozenset({Welcome, Close}),
    State.AWAIT_AUTH: frozenset({Auth, Close}),
    State.OPEN: _CALLS,
    State.CLOSED: frozenset(),
    State.ERROR: frozenset(),
}

_MEANING: dict[State, str] = {
    State.IDLE: "the handshake has not started: call initiate() first",
    State.AWAIT_HELLO: "waiting for the client's HELLO: calls wait for the handshake",
    State.AWAIT_WELCOME: "waiting for the server's WELCOME: calls wait for the handshake",
    State.AWAIT_AUTH: "waiting for the client's AUTH: calls wait for the handshake",
    State.OPEN: "open",
    State.CLOSED: "closed: open a new connection",
    State.ERROR: "broken by the peer: only CLOSE may be sent",
}


class Connection:
    """One side of one connection, as a state machine over frames.

    ``secret`` is the cluster secret (None: no authentication, for loopback peers, or
    when mutual TLS proves the peer); ``nonce`` may be fixed for test vectors, else it is
    random. ``max_frame_size`` bounds frames once the handshake is done; before, the
    bound is :data:`MAX_HANDSHAKE_FRAME`. ``frames_received`` counts the whole frames
    received (the transport's heartbeat watches it).
    """

    def __init__(
        self,
        role: Role,
        *,
        cluster_id: str,
        node_id: str,
        secret: bytes | None = None,
        address: str = "",
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        nonce: bytes | None = None,
    ) -> None:
        if not isinstance(role, Role):
            raise LocalProtocolError(f"role must be a Role, got {role!r}")
        if type(max_frame_size) is not int or not (
            MIN_FRAME_SIZE <= max_frame_size <= MAX_FRAME_LIMIT
        ):
            raise LocalProtocolError(
                f"max_frame_size must be an integer from {MIN_FRAME_SIZE} to {MAX_FRAME_LIMIT}"
            )
        if secret is not None and (type(secret) is not bytes or len(secret) < MIN_SECRET_SIZE):
            raise LocalProtocolError(
                f"the cluster secret must be at least {MIN_SECRET_SIZE} bytes "
                "(make one with: openssl rand -hex 32)"
            )
        self.role = role
        self.cluster_id = cluster_id
        self.node_id = node_id
        self.address = address
        self.secret = secret
        self.max_frame_size = max_frame_size
        self._nonce = nonce if nonce is not None else os.urandom(NONCE_SIZE)
        self.state = State.IDLE if role is Role.CLIENT else State.AWAIT_HELLO
        self._buf = bytearray()
        self._pos = 0
        # the largest frame accepted now: the handshake's bound until the state is OPEN
        self._limit = min(max_frame_size, MAX_HANDSHAKE_FRAME)
        # what crossed the connection (the transport's metrics sum them): whole frames
        # and bytes received; frames and bytes handed out to be sent
        self.frames_received = 0
        self.bytes_received = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._closed: ConnectionClosed | None = None
        self._out: list[bytes] = []
        self._hello: Hello | None = None
        self._welcome: Welcome | None = None
        self.peer: HandshakeComplete | None = None
        self.peer_draining = False
        # validate the identity now rather than at the first frame
        hello = frame(Hello(PROTOCOL_VERSION, cluster_id, node_id, address, self._nonce))
        if len(hello) > MAX_HANDSHAKE_FRAME:
            raise LocalProtocolError(
                f"the cluster id, node id and address take {len(hello)} bytes in HELLO; "
                f"a handshake frame holds at most {MAX_HANDSHAKE_FRAME}: shorten them"
            )

    # ------------------------------------------------------------ sending

    def initiate(self) -> bytes:
        """Client: the HELLO frame that opens the handshake."""
        if self.role is not Role.CLIENT or self.state is not State.IDLE:
            raise LocalProtocolError(
                f"initiate() is the client's first step; this {self.role.value} connection "
                f"is {self.state.value} ({_MEANING[self.state]})"
            )
        self._hello = Hello(
            PROTOCOL_VERSION, self.cluster_id, self.node_id, self.address, self._nonce
        )
        self.state = State.AWAIT_WELCOME
        return self._sent(frame(self._hello, self.max_frame_size))

    def send(self, event: Event) -> bytes:
        """The frame of ``event``; LocalProtocolError if the state does not allow it."""
        if type(event) not in SEND[self.state]:
            raise LocalProtocolError(
                f"cannot send {type(event).__name__}: the connection is "
                f"{self.state.value} ({_MEANING[self.state]})"
            )
        data = frame(event, self.max_frame_size)
        if type(event) is Close:
            self.state = State.CLOSED
        return self._sent(data)

    def send_request(self, request_id: int, timeout: float, call: OutgoingCall) -> bytes:
        """``send(Request(request_id, ..., timeout, ...))`` of the fields of ``call``, for a
        request made by this node (see request_frame)."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(
                f"cannot send Request: the connection is {self.state.value} "
                f"({_MEANING[self.state]})"
            )
        return self._sent(request_frame(request_id, timeout, call, self.max_frame_size))

    def send_result(self, request_id: int, result: Any) -> bytes:
        """``send(Response(request_id, result))`` answering a received request."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(
                f"cannot send Response: the connection is {self.state.value} "
                f"({_MEANING[self.state]})"
            )
        return self._sent(result_frame(request_id, result, self.max_frame_size))

    def data_to_send(self) -> bytes:
        """Bytes the connection produced by itself (handshake answers); write them first."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self.frames_sent += len(self._out)
        self.bytes_sent += len(data)
        self._out.clear()
        return data

    def _sent(self, data: bytes) -> bytes:
        self.frames_sent += 1
        self.bytes_sent += len(data)
        return data

    # ------------------------------------------------------------ receiving

    def receive_data(self, data: bytes | bytearray | memoryview | None) -> None:
        """Feed bytes read from the peer; ``None`` (or b"") means the stream ended.

        Before the handshake is done, input no handshake sends is refused here (the
        error comes out of the next :meth:`next_event`) and dropped; so is anything
        fed after the peer broke the protocol or closed."""
        if self._eof:
            if data:
                raise LocalProtocolError("received data after the end of the stream")
            return
        if not data:
            self._eof = True
            return
        if self._error is not None or self._closed is not None:
            return  # nothing more will be read from it
        self.bytes_received += len(data)
        buf = self._buf
        if self._pos and self._pos * 2 >= len(buf):
            del buf[: self._pos]
            self._pos = 0
        buf += data
        if self.state is not State.OPEN:
            self._check_before_trust()

    def _check_before_trust(self) -> None:
        """Refuse at once, from the bytes buffered, what no handshake sends."""
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        try:
            if avail >= HEADER_SIZE:
                (size,) = HEADER.unpack_from(buf, pos)
                if size > self._limit:
                    raise self._too_large(size)
            if avail > MAX_HANDSHAKE_BUFFER and self.state in _PEER_WAITS:
                raise RemoteProtocolError(
                    f"the peer sent {avail} bytes before its handshake was answered; it "
                    f"must wait for the answer, and a handshake frame is at most "
                    f"{MAX_HANDSHAKE_FRAME} bytes (MAX_HANDSHAKE_FRAME)",
                    CloseCode.FRAME_TOO_LARGE,
                )
        except RemoteProtocolError as exc:
            self._fail(exc)

    def _too_large(self, size: int) -> RemoteProtocolError:
        if self.state is State.OPEN:
            return RemoteProtocolError(
                f"the peer announced a frame of {size} bytes; the limit is "
                f"{self.max_frame_size} (max_frame_size)",
                CloseCode.FRAME_TOO_LARGE,
            )
        buf, pos = self._buf, self._pos
        if self.state is State.AWAIT_HELLO and buf[pos : pos + 2] == _TLS_RECORD:
            return RemoteProtocolError(
                "the peer speaks TLS and this node does not: turn TLS on host links on "
                "every node or on none (--tls-cert/--tls-key/--tls-ca)",
                CloseCode.NOT_ALLOWED,
            )
        return RemoteProtocolError(
            f"the peer announced a frame of {size} bytes before the handshake was done; "
            f"until then the limit is {self._limit} (MAX_HANDSHAKE_FRAME)",
            CloseCode.FRAME_TOO_LARGE,
        )

    def _fail(self, exc: RemoteProtocolError) -> None:
        """The peer broke the protocol: keep ``exc`` for next_event, drop the input."""
        self._error = exc
        self.state = State.ERROR
        self._buf.clear()
        self._pos = 0

    def next_event(self) -> Event | _NeedData:
        """The next event, or :data:`NEED_DATA`. Raises RemoteProtocolError for garbage
        (and keeps raising it: the connection is in state ERROR)."""
        while True:
            if self._error is not None:
                raise self._error
            if self._closed is not None:
                return self._closed
            try:
                ev = self._next_message()
                if ev is NEED_DATA or type(ev) is ConnectionClosed:
                    return ev
                assert isinstance(ev, Event)
                result = self._handle(ev)
            except RemoteProtocolError as exc:
                self._fail(exc)
                raise
            if result is not None:
                return result

    def _next_message(self) -> Event | _NeedData:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail >= HEADER_SIZE:
            (size,) = HEADER.unpack_from(buf, pos)
            if size > self._limit:
                raise self._too_large(size)
            if size == 0:
                raise RemoteProtocolError("the peer sent an empty frame (length 0)")
            end = pos + HEADER_SIZE + size
            if len(buf) >= end:
                body = bytes(buf[pos + HEADER_SIZE : end])
                if end == len(buf):
                    buf.clear()
                    self._pos = 0
                else:
                    self._pos = end
                self.frames_received += 1
                return decode(body)
        if not self._eof:
            return NEED_DATA
        if avail:
            raise RemoteProtocolError(
                f"the stream ended inside a frame ({avail} bytes of it arrived)"
            )
        self.state = State.CLOSED
        self._closed = ConnectionClosed(CloseCode.NORMAL, "the peer closed the connection")
        return self._closed

    def _handle(self, ev: Event) -> Event | None:
        """Check ``ev`` against the state; run the handshake. None: nothing to report."""
        kind = type(ev)
        if kind is Close:
            assert isinstance(ev, Close)
            self.state = State.CLOSED
            self._closed = ConnectionClosed(ev.code, ev.reason)
            return self._closed
        if kind not in RECEIVE[self.state]:
            raise RemoteProtocolError(
                f"the peer sent {kind.__name__} while the connection is {self.state.value} "
                f"({_MEANING[self.state]})"
            )
        if self.state is State.OPEN:
            if kind is GoAway:
                self.peer_draining = True
            return ev
        if kind is Hello:
            assert isinstance(ev, Hello)
            self._on_hello(ev)
            return None
        if kind is Welcome:
            assert isinstance(ev, Welcome)
            return self._on_welcome(ev)
        assert isinstance(ev, Auth)
        return self._on_auth(ev)

    def _check_cluster(self, cluster_id: str) -> None:
        if cluster_id != self.cluster_id:
            raise RemoteProtocolError(
                f"the peer belongs to cluster {cluster_id!r}, this node to "
                f"{self.cluster_id!r}: check KOALA_CLUSTER_ID on both",
                CloseCode.WRONG_CLUSTER,
            )

    def _check_proof(self, theirs: bytes | None, expected: bytes | None) -> None:
        if expected is None and theirs is not None:
            raise RemoteProtocolError(
                "the peer authenticates with a cluster secret and this node has none: set "
                "the same KOALA_CLUSTER_SECRET on both",
                CloseCode.AUTH_FAILED,
            )
        if expected is not None and theirs is None:
            raise RemoteProtocolError(
                "the peer has no cluster secret and this node requires one: set the same "
                "KOALA_CLUSTER_SECRET on both",
                CloseCode.AUTH_FAILED,
            )
        if expected is not None and theirs is not None and not proofs_match(theirs, expected):
            raise RemoteProtocolError(
                "authentication failed: the peer's proof does not match, so the cluster "
                "secrets differ",
                CloseCode.AUTH_FAILED,
            )

    def _on_hello(self, hello: Hello) -> None:
        self._check_cluster(hello.cluster_id)
        self._hello = hello
        mine = None
        if self.secret is not None:
            mine = proof(self.secret, "server", hello, self.node_id, self._nonce)
        self._welcome = Welcome(PROTOCOL_VERSION, self.cluster_id, self.node_id, self._nonce, mine)
        self._out.append(frame(self._welcome, self.max_frame_size))
        self.state = State.AWAIT_AUTH

    def _on_welcome(self, welcome: Welcome) -> HandshakeComplete:
        hello = self._hello
        assert hello is not None
        if welcome.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"the peer answered with protocol version {welcome.version}; this node "
                f"speaks {PROTOCOL_VERSION}",
                CloseCode.UNSUPPORTED_VERSION,
            )
        self._check_cluster(welcome.cluster_id)
        expected = mine = None
        if self.secret is not None:
            expected = proof(self.secret, "server", hello, welcome.node_id, welcome.nonce)
            mine = proof(self.secret, "client", hello, welcome.node_id, welcome.nonce)
        self._check_proof(welcome.proof, expected)
        self._out.append(frame(Auth(mine), self.max_frame_size))
        self._open()
        self.peer = HandshakeComplete(
            welcome.node_id, "", welcome.cluster_id, self.secret is not None
        )
        return self.peer

    def _on_auth(self, auth: Auth) -> HandshakeComplete:
        hello, welcome = self._hello, self._welcome
        assert hello is not None
        assert welcome is not None
        expected = None
        if self.secret is not None:
            expected = proof(self.secret, "client", hello, welcome.node_id, welcome.nonce)
        self._check_proof(auth.proof, expected)
        self._open()
        self.peer = HandshakeComplete(
            hello.node_id, hello.address, hello.cluster_id, self.secret is not None
        )
        return self.peer

    def _open(self) -> None:
        self.state = State.OPEN
        self._limit = self.max_frame_size  # the peer is proven: frames of any size

    # ------------------------------------------------------------ helpers

    def close_frame(self, exc: ProtocolError | None = None, reason: str = "") -> bytes:
        """The CLOSE to send after ``exc`` (or a normal close); b"" if already closed."""
        if self.state is State.CLOSED:
            return b""
        ev = Close(exc.close_code, str(exc)) if exc is not None else Close(CloseCode.NORMAL, reason)
        raw = ev.reason.encode()
        if self.state is not State.OPEN and len(raw) > _CLOSE_REASON_BYTES:
            # the peer accepts no more than a handshake frame yet
            ev = Close(ev.code, raw[:_CLOSE_REASON_BYTES].decode(errors="ignore") + "...")
        return self.send(ev)
