"""The messages of the Koala wire protocol, as small frozen events.

Each event is one message kind of ``docs/protocol.md``; its fields are the fields on
the wire, in order. Constructing an event validates it, so a malformed event can neither
be sent nor come out of the parser: the parser turns a validation failure into a
:class:`RemoteProtocolError`, a local caller gets a :class:`LocalProtocolError`.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from .._messages import ErrorCode, ErrorInfo, Key

PROTOCOL_VERSION = 1
MAGIC = "koala"
NONCE_SIZE = 32
PROOF_SIZE = 32  # HMAC-SHA256
MAX_REASON = 1024  # characters of a CLOSE/GOAWAY reason kept on send
_U64 = 1 << 64
MAX_TRACESTATE = 512  # characters of a REQUEST's tracestate carried (W3C: 32 members)
# W3C trace context's traceparent: version-trace_id-parent_id-flags, lowercase hex
TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


class ProtocolError(Exception):
    """Base of the protocol's errors. ``close_code`` is what to send in the CLOSE frame."""

    def __init__(self, message: str, close_code: CloseCode | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code if close_code is not None else CloseCode.PROTOCOL_ERROR


class LocalProtocolError(ProtocolError):
    """You used the protocol object wrongly (sent a message the state forbids, built a
    malformed event). Nothing was sent; fix the calling code."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (garbage, an oversized frame, a failed handshake).

    Answer by sending ``Close(exc.close_code, str(exc))`` and closing the connection.
    """


class Kind(enum.IntEnum):
    """The first element of every message array."""

    HELLO = 0
    WELCOME = 1
    AUTH = 2
    CLOSE = 3
    GOAWAY = 4
    PING = 5
    PONG = 6
    REQUEST = 10
    RESULT = 11
    ERROR = 12
    CANCEL = 13
    CLIENT_OPENED = 20
    CLIENT_MESSAGE = 21
    CLIENT_CLOSED = 22
    PUSH_TO_CLIENT = 23
    CLOSE_CLIENT = 24
    CLIENT_ACK = 25


class CloseCode(enum.IntEnum):
    """Why a connection was closed (the ``code`` of a CLOSE message)."""

    NORMAL = 0
    PROTOCOL_ERROR = 1  # malformed frame or message, or a message the state forbids
    FRAME_TOO_LARGE = 2  # a length prefix above the receiver's max frame size
    UNSUPPORTED_VERSION = 3
    WRONG_CLUSTER = 4
    AUTH_FAILED = 5
    HANDSHAKE_TIMEOUT = 6
    HEARTBEAT_TIMEOUT = 7
    OVERLOADED = 8  # the receiver cannot keep up (its write queue is full)
    SHUTDOWN = 9  # the node is stopping
    NOT_ALLOWED = 10  # the listener refuses this peer (e.g. non-loopback without a secret)


def _fail(message: str) -> None:
    raise LocalProtocolError(message)


def _check_u64(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _U64:
        _fail(f"{name} must be an unsigned 64-bit integer, got {value!r}")


def _check_text(name: str, value: object, *, empty: bool = True) -> None:
    if type(value) is not str:
        _fail(f"{name} must be a text string, got {type(value).__name__}")
    if not empty and not value:
        _fail(f"{name} must not be empty")


TICKET_SIZE = 32  # a placement ticket (koala.pd._ticket), opaque to the transport


def _check_bytes(name: str, value: object, size: int) -> None:
    if type(value) is not bytes or len(value) != size:
        _fail(f"{name} must be {size} bytes, got {value!r:.80}")


def _check_proof(value: object) -> None:
    if value is not None:
        _check_bytes("proof", value, PROOF_SIZE)


class Event:
    """Base of protocol events."""

    __slots__ = ()
    kind: ClassVar[Kind]


# ---------------------------------------------------------------- handshake


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """Client -> server, first frame: who I am and my challenge ``nonce``.

    ``address`` is the ``host:port`` this node listens on ("" if it does not), so the
    server can reuse the connection to call back instead of dialing a second one.
    """

    kind: ClassVar[Kind] = Kind.HELLO
    version: int
    cluster_id: str
    node_id: str
    address: str
    nonce: bytes

    def __post_init__(self) -> None:
        _check_u64("version", self.version)
        _check_text("cluster_id", self.cluster_id)
        _check_text("node_id", self.node_id, empty=False)
        _check_text("address", self.address)
        _check_bytes("nonce", self.nonce, NONCE_SIZE)


@dataclass(frozen=True, slots=True)
class Welcome(Event):
    """Server -> client: who I am, my challenge, and my proof (None without a secret)."""

    kind: ClassVar[Kind] = Kind.WELCOME
    version: int
    cluster_id: str
    node_id: str
    nonce: bytes
    proof: bytes | None

    def __post_init__(self) -> None:
        _check_u64("version", self.version)
        _check_text("cluster_id", self.cluster_id)
        _check_text("node_id", self.node_id, empty=False)
        _check_bytes("nonce", self.nonce, NONCE_SIZE)
        _check_proof(self.proof)


@dataclass(frozen=True, slots=True)
class Auth(Event):
    """Client -> server: the client's proof (None without a secret)."""

    kind: ClassVar[Kind] = Kind.AUTH
    proof: bytes | None

    def __post_init__(self) -> None:
        _check_proof(self.proof)


# ---------------------------------------------------------------- connection control


@dataclass(frozen=True, slots=True)
class Close(Event):
    """Either side: the last frame before closing, with why."""

    kind: ClassVar[Kind] = Kind.CLOSE
    code: int
    reason: str = ""

    def __post_init__(self) -> None:
        _check_u64("code", self.code)
        _check_text("reason", self.reason)
        if len(self.reason) > MAX_REASON:
            object.__setattr__(self, "reason", self.reason[: MAX_REASON - 3] + "...")


@dataclass(frozen=True, slots=True)
class GoAway(Event):
    """Either side: I am draining; send no new work that is not part of a live call chain."""

    kind: ClassVar[Kind] = Kind.GOAWAY
    reason: str = ""

    def __post_init__(self) -> None:
        _check_text("reason", self.reason)
        if len(self.reason) > MAX_REASON:
            object.__setattr__(self, "reason", self.reason[: MAX_REASON - 3] + "...")


@dataclass(frozen=True, slots=True)
class Ping(Event):
    kind: ClassVar[Kind] = Kind.PING
    token: int = 0

    def __post_init__(self) -> None:
        _check_u64("token", self.token)


@dataclass(frozen=True, slots=True)
class Pong(Event):
    kind: ClassVar[Kind] = Kind.PONG
    token: int = 0

    def __post_init__(self) -> None:
        _check_u64("token", self.token)


# ---------------------------------------------------------------- calls


@dataclass(frozen=True, slots=True)
class Request(Event):
    """A call of ``interface.method`` on actor ``(actor_type, key)``.

    ``timeout`` is what is left of the caller's deadline, in seconds; the receiver
    restarts the clock on its side. ``args`` is CBOR data encoded by the method's
    parameter annotations.
    """

    kind: ClassVar[Kind] = Kind.REQUEST
    request_id: int
    chain_id: int
    timeout: float
    actor_type: str
    key: Key
    interface: str
    method: str
    args: tuple[Any, ...] | list[Any] = ()
    one_way: bool = False
    # the placement ticket the sender's PD lookup returned (empty: not given): a host
    # that finds a valid ticket of its own here needs not ask the PD (koala.pd._ticket)
    placement: bytes = b""
    # the caller's span context, W3C (traceparent, tracestate), None: no trace. Kept
    # only when well formed (W3C: a receiver ignores a bad one and starts a new trace),
    # so a malformed value becomes None and an over-long tracestate ""; a value that
    # is not a pair of text strings is refused like any other field of a wrong type
    trace: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        _check_u64("request_id", self.request_id)
        _check_u64("chain_id", self.chain_id)
        t = self.timeout
        if type(t) not in (float, int) or not (math.isfinite(t) and t >= 0):
            _fail(f"timeout must be a finite number of seconds >= 0, got {t!r}")
        _check_text("actor_type", self.actor_type, empty=False)
        if type(self.key) not in (str, int):
            _fail(f"key must be a text string or an integer, got {type(self.key).__name__}")
        _check_text("interface", self.interface, empty=False)
        _check_text("method", self.method, empty=False)
        if not isinstance(self.args, (list, tuple)):
            _fail(f"args must be an array, got {type(self.args).__name__}")
        if type(self.one_way) is not bool:
            _fail(f"one_way must be a boolean, got {self.one_way!r}")
        if self.placement != b"":  # anything else than bytes of a ticket is refused
            _check_bytes("placement", self.placement, TICKET_SIZE)
        if self.trace is not None:
            object.__setattr__(self, "trace", _trace(self.trace))


def _trace(value: object) -> tuple[str, str] | None:
    """A REQUEST's trace element as carried on: two text strings, else refused."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise LocalProtocolError(
            f"trace must be an array [traceparent, tracestate], got {value!r:.80}"
        )
    parent, state = value
    if not isinstance(parent, str) or not isinstance(state, str):
        raise LocalProtocolError(f"trace must hold two text strings, got {value!r:.80}")
    if len(parent) != 55 or TRACEPARENT.fullmatch(parent) is None:
        return None  # not a traceparent: no trace to continue
    if len(state) > MAX_TRACESTATE:
        state = ""  # W3C: drop a tracestate that cannot be kept whole, keep the parent
    return (str(parent), str(state))  # exactly str, whatever subclass was given


class OutgoingCall(Protocol):
    """A call this node makes, as the REQUEST frame reads it: the fields of
    :class:`Request` but the two the channel gives (its id, and the time left). The
    runtime's own request is one; so is a :class:`Request`."""

    @property
    def chain_id(self) -> int: ...
    @property
    def actor_type(self) -> str: ...
    @property
    def key(self) -> Key: ...
    @property
    def interface(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def args(self) -> Sequence[Any]: ...
    @property
    def one_way(self) -> bool: ...
    @property
    def placement(self) -> bytes: ...
    @property
    def trace(self) -> tuple[str, str] | None: ...


@dataclass(frozen=True, slots=True)
class Response(Event):
    """The answer to a request: ``result`` (kind RESULT) or ``error`` (kind ERROR)."""

    kind: ClassVar[Kind] = Kind.RESULT
    request_id: int
    result: Any = None
    error: ErrorInfo | None = field(default=None)

    def __post_init__(self) -> None:
        _check_u64("request_id", self.request_id)
        err = self.error
        if err is None:
            return
        if not isinstance(err, ErrorInfo):
            _fail(f"error must be an ErrorInfo, got {type(err).__name__}")
        if type(err.code) is not ErrorCode:
            _fail(f"error.code must be an ErrorCode, got {err.code!r}")
        _check_text("error.type_name", err.type_name)
        _check_text("error.message", err.message)
        _check_text("error.traceback", err.traceback)
        if not isinstance(err.args, (tuple, list)):
            _fail(f"error.args must be an array, got {type(err.args).__name__}")
        if self.result is not None:
            _fail("a response carries a result or an error, not both")


@dataclass(frozen=True, slots=True)
class Cancel(Event):
    """The caller gave up on ``request_id``: cancel its turn; no response is expected."""

    kind: ClassVar[Kind] = Kind.CANCEL
    request_id: int

    def __post_init__(self) -> None:
        _check_u64("request_id", self.request_id)


# ---------------------------------------------------------------- gateway (reserved)


@dataclass(frozen=True, slots=True)
class ClientOpened(Event):
    """Gateway -> host: client session ``session_id`` is bound to actor (type, key)."""

    kind: ClassVar[Kind] = Kind.CLIENT_OPENED
    session_id: int
    actor_type: str
    key: Key
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_u64("session_id", self.session_id)
        _check_text("actor_type", self.actor_type, empty=False)
        if type(self.key) not in (str, int):
            _fail(f"key must be a text string or an integer, got {type(self.key).__name__}")
        if not isinstance(self.metadata, dict) or not all(
            type(k) is str and type(v) is str for k, v in self.metadata.items()
        ):
            _fail("metadata must be a map of text to text")


@dataclass(frozen=True, slots=True)
class ClientMessage(Event):
    """Gateway -> host: an opaque frame a client sent on session ``session_id``.

    A binary WebSocket frame travels as bytes, a text frame as text (CBOR keeps the two
    apart, so the frame reaches the other side as it was sent). ``seq`` numbers the
    frames of a session from 1; the host acknowledges them with CLIENT_ACK once their
    turn has run. 0 (absent on the wire) asks for no acknowledgement.
    """

    kind: ClassVar[Kind] = Kind.CLIENT_MESSAGE
    session_id: int
    payload: bytes | str
    seq: int = 0

    def __post_init__(self) -> None:
        _check_u64("session_id", self.session_id)
        if type(self.payload) is not bytes and type(self.payload) is not str:
            _fail(f"payload must be bytes or text, got {type(self.payload).__name__}")
        _check_u64("seq", self.seq)


@dataclass(frozen=True, slots=True)
class ClientClosed(Event):
    """Gateway -> host: the client of ``session_id`` went away."""

    kind: ClassVar[Kind] = Kind.CLIENT_CLOSED
    session_id: int
    reason: str = ""

    def __post_init__(self) -> None:
        _check_u64("session_id", self.session_id)
        _check_text("reason", self.reason)


@dataclass(frozen=True, slots=True)
class PushToClient(Event):
    """Host -> gateway: send this opaque frame to the client of ``session_id``.

    A binary WebSocket frame travels as bytes, a text frame as text (CBOR keeps the two
    apart, so the frame reaches the other side as it was sent).
    """

    kind: ClassVar[Kind] = Kind.PUSH_TO_CLIENT
    session_id: int
    payload: bytes | str

    def __post_init__(self) -> None:
        _check_u64("session_id", self.session_id)
        if type(self.payload) is not bytes and type(self.payload) is not str:
            _fail(f"payload must be bytes or text, got {type(self.payload).__name__}")


def valid_client_close_code(code: object) -> bool:
    """The WebSocket close codes CLOSE_CLIENT may carry: 1000, 1001, 1011, 3000-4999."""
    if not isinstance(code, int) or isinstance(code, bool):
        return False
    return code in (1000, 1001, 1011) or 3000 <= code <= 4999


@dataclass(frozen=True, slots=True)
class CloseClient(Event):
    """Host -> gateway: close the client of ``session_id``.

    ``misplaced`` (a trailing field, absent when false) says instead that the session's
    actor is not placed on this host (a stale placement, or the host was fenced): the
    host ran nothing of the session and dropped its frames; the gateway re-resolves the
    actor and binds the session again rather than closing the client.
    """

    kind: ClassVar[Kind] = Kind.CLOSE_CLIENT
    session_id: int
    reason: str = ""
    code: int = 1000  # the WebSocket close code: 1000, 1001, 1011, or 3000-4999
    misplaced: bool = False

    def __post_init__(self) -> None:
        _check_u64("session_id", self.session_id)
        _check_text("reason", self.reason)
        if not valid_client_close_code(self.code):
            _fail(f"close code must be 1000, 1001, 1011 or 3000-4999, got {self.code!r}")
        if type(self.misplaced) is not bool:
            _fail(f"misplaced must be a boolean, got {self.misplaced!r}")


@dataclass(frozen=True, slots=True)
class ClientAck(Event):
    """Host -> gateway: every frame of ``session_id`` numbered up to ``seq`` has had its
    turn run (a cumulative acknowledgement of CLIENT_MESSAGE sequence numbers)."""

    kind: ClassVar[Kind] = Kind.CLIENT_ACK
    session_id: int
    seq: int

    def __post_init__(self) -> None:
        _check_u64("session_id", self.session_id)
        _check_u64("seq", self.seq)


# ---------------------------------------------------------------- local-only events


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    """Not a message: the handshake succeeded; calls may flow both ways now."""

    kind: ClassVar[Kind] = Kind.AUTH  # never encoded
    peer_node_id: str
    peer_address: str
    peer_cluster_id: str
    authenticated: bool


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """Not a message: the peer ended the stream (after a CLOSE, or a bare EOF)."""

    kind: ClassVar[Kind] = Kind.CLOSE  # never encoded
    code: int = CloseCode.NORMAL
    reason: str = ""


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""Returned by ``next_event()`` when a whole frame has not arrived yet."""

GATEWAY_EVENTS: tuple[type[Event], ...] = (
    ClientOpened,
    ClientMessage,
    ClientClosed,
    PushToClient,
    CloseClient,
    ClientAck,
)
