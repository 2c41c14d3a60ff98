"""Messages <-> bytes: the CBOR arrays of each kind, frames, and the handshake proofs.

Pure functions, no state. A frame is a 4-byte big-endian body length followed by the
body: exactly one CBOR data item, an array whose first element is the message kind.
Decoding accepts plain CBOR only: the tags for big integers (2, 3) and date/times (0, 1)
are the only tags allowed, so a peer cannot make us compile a regex, build a cyclic
structure or parse a MIME message.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import struct
import threading
from collections.abc import Callable
from typing import Any

import cbor2

from .._messages import ErrorCode, ErrorInfo
from ._events import (
    MAGIC,
    PROTOCOL_VERSION,
    Auth,
    Cancel,
    ClientAck,
    ClientClosed,
    ClientMessage,
    ClientOpened,
    Close,
    CloseClient,
    CloseCode,
    Event,
    GoAway,
    Hello,
    Kind,
    LocalProtocolError,
    OutgoingCall,
    Ping,
    Pong,
    PushToClient,
    RemoteProtocolError,
    Request,
    Response,
    Welcome,
)

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
MAX_FRAME_LIMIT = (1 << 32) - 1  # what a 4-byte prefix can express
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
MAX_DEPTH = 64  # nesting of arrays/maps in one message
ALLOWED_TAGS = frozenset({0, 1, 2, 3})  # date/time text, epoch time, bignums


# ---------------------------------------------------------------- CBOR, restricted


class _Tags(dict[int, Any]):
    """semantic_decoders for cbor2: every built-in tag other than ALLOWED_TAGS refuses."""

    def __getitem__(self, tag: int) -> Callable[[Any], Any]:
        if tag in ALLOWED_TAGS:
            raise KeyError(tag)

        def refuse(*args: Any) -> Any:  # cbor2 passes (decoder) or (decoder, value)
            raise cbor2.CBORDecodeError(f"CBOR tag {tag} is not allowed")

        return refuse


_TAGS = _Tags()


def _tag_hook(tag: cbor2.CBORTag, immutable: bool) -> Any:
    raise cbor2.CBORDecodeError(f"CBOR tag {tag.tag} is not allowed")


class _Decoder(threading.local):
    """One CBOR decoder per thread, reused: building one costs more than decoding a
    small frame. Its state is per item; only the input changes between frames."""

    def __init__(self) -> None:
        self.decoder = cbor2.CBORDecoder(
            io.BytesIO(b""), semantic_decoders=_TAGS, tag_hook=_tag_hook, max_depth=MAX_DEPTH
        )


_decoders = _Decoder()


def loads(body: bytes) -> Any:
    """Decode exactly one plain CBOR item; RemoteProtocolError on anything else."""
    fp = io.BytesIO(body)
    decoder = _decoders.decoder
    try:
        decoder.fp = fp
        item = decoder.decode()
    except Exception as exc:  # cbor2 raises CBORDecodeError, or ValueError/... from a tag
        cause = exc.__cause__ or exc.__context__
        detail = f"{exc}" + (f" ({cause})" if cause is not None else "")
        raise RemoteProtocolError(f"the frame body is not valid CBOR: {detail}") from None
    if fp.tell() != len(body):
        raise RemoteProtocolError(
            f"the frame body holds {len(body) - fp.tell()} bytes after its CBOR item; "
            "a frame carries exactly one item"
        )
    return item


def dumps(item: Any) -> bytes:
    try:
        return cbor2.dumps(item)
    except Exception as exc:
        raise LocalProtocolError(f"cannot encode the message as CBOR: {exc}") from None


# ---------------------------------------------------------------- messages -> arrays


def _to_array(ev: Event) -> list[Any]:
    match ev:
        case Request():
            item = [
                Kind.REQUEST,
                ev.request_id,
                ev.chain_id,
                float(ev.timeout),
                ev.actor_type,
                ev.key,
                ev.interface,
                ev.method,
                list(ev.args),
                ev.one_way,
            ]
            if ev.trace is not None:  # the trace follows placement, given or empty
                item += (ev.placement, list(ev.trace))
            elif ev.placement:  # an optional last field, left out when not given
                item.append(ev.placement)
            return item
        case Response(error=None):
            return [Kind.RESULT, ev.request_id, ev.result]
        case Response(error=ErrorInfo() as err):
            return [
                Kind.ERROR,
                ev.request_id,
                int(err.code),
                err.type_name,
                err.message,
                err.traceback,
                list(err.args),
            ]
        case Cancel():
            return [Kind.CANCEL, ev.request_id]
        case Ping() | Pong():
            return [ev.kind, ev.token]
        case Hello():
            return [Kind.HELLO, MAGIC, ev.version, ev.cluster_id, ev.node_id, ev.address, ev.nonce]
        case Welcome():
            return [Kind.WELCOME, ev.version, ev.cluster_id, ev.node_id, ev.nonce, ev.proof]
        case Auth():
            return [Kind.AUTH, ev.proof]
        case Close():
            return [Kind.CLOSE, ev.code, ev.reason]
        case GoAway():
            return [Kind.GOAWAY, ev.reason]
        case ClientOpened():
            return [Kind.CLIENT_OPENED, ev.session_id, ev.actor_type, ev.key, dict(ev.metadata)]
        case ClientMessage():
            if ev.seq:  # 0: no acknowledgement wanted, the field is left out
                return [Kind.CLIENT_MESSAGE, ev.session_id, ev.payload, ev.seq]
            return [Kind.CLIENT_MESSAGE, ev.session_id, ev.payload]
        case PushToClient():
            return [ev.kind, ev.session_id, ev.payload]
        case ClientClosed():
            return [ev.kind, ev.session_id, ev.reason]
        case CloseClient():
            tail: list[Any] = []  # trailing fields are sent only when not their default
            if ev.misplaced:
                tail = [ev.code, True]
            elif ev.code != 1000:  # 1000 is implied when absent
                tail = [ev.code]
            return [ev.kind, ev.session_id, ev.reason, *tail]
        case ClientAck():
            return [Kind.CLIENT_ACK, ev.session_id, ev.seq]
    raise LocalProtocolError(f"{type(ev).__name__} is not a message that can be sent")


def encode(ev: Event) -> bytes:
    """The body (CBOR array) of a message, without the length prefix."""
    return dumps(_to_array(ev))


def frame(ev: Event, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """A whole frame: length prefix + body. Refuses bodies above ``max_frame_size``."""
    return _framed(encode(ev), type(ev).__name__, max_frame_size)


def _framed(body: bytes, what: str, max_frame_size: int) -> bytes:
    if len(body) > max_frame_size:
        raise LocalProtocolError(
            f"a {what} of {len(body)} bytes exceeds the max frame size of "
            f"{max_frame_size} bytes; send less data per call or raise max_frame_size"
        )
    return HEADER.pack(len(body)) + body


def request_frame(
    request_id: int, timeout: float, call: OutgoingCall, max_frame_size: int
) -> bytes:
    """The frame of a REQUEST from this node's runtime, whose fields are valid by
    construction (ids it made, names of its classes, a finite timeout, args encoded by
    annotations), so no Request event is built and checked: the same bytes as
    ``frame(Request(...))``. A key of another type than exactly str or int goes through
    the event, which refuses it."""
    key = call.key
    if type(key) is not str and type(key) is not int:
        ev = Request(
            request_id,
            call.chain_id,
            timeout,
            call.actor_type,
            key,
            call.interface,
            call.method,
            list(call.args),
            call.one_way,
            call.placement,
            call.trace,
        )
        return frame(ev, max_frame_size)
    item = [
        Kind.REQUEST,
        request_id,
        call.chain_id,
        float(timeout),
        call.actor_type,
        key,
        call.interface,
        call.method,
        call.args,  # a tuple is a CBOR array too
        call.one_way,
    ]
    trace = call.trace  # None unless a tracer is configured: one test when off
    if trace is not None:
        item += (call.placement, trace)  # a tuple is a CBOR array too
    elif call.placement:
        item.append(call.placement)
    return _framed(dumps(item), "Request", max_frame_size)


def result_frame(request_id: int, result: Any, max_frame_size: int) -> bytes:
    """The frame of a RESULT answering a request this node received (its id came off
    the wire, checked): ``frame(Response(request_id, result))``."""
    return _framed(dumps([Kind.RESULT, request_id, result]), "Response", max_frame_size)


# ---------------------------------------------------------------- arrays -> messages


def _request(a: list[Any]) -> Event:
    n = len(a)
    placement = a[10] if n > 10 else b""
    trace = a[11] if n > 11 else None  # CBOR null: no trace, as when absent
    return Request(a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], placement, trace)


_ERROR_CODES = frozenset(int(c) for c in ErrorCode)


def _error(a: list[Any]) -> Event:
    if type(a[2]) is not int or a[2] not in _ERROR_CODES:
        raise LocalProtocolError(f"unknown error code {a[2]!r}")
    code = ErrorCode(a[2])
    args = a[6]
    if not isinstance(args, list):
        raise LocalProtocolError(f"error args must be an array, got {type(args).__name__}")
    return Response(a[1], None, ErrorInfo(code, a[3], a[4], a[5], tuple(args)))


def _hello(a: list[Any]) -> Event:
    return Hello(a[2], a[3], a[4], a[5], a[6])


def _metadata(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise LocalProtocolError(f"metadata must be a map, got {type(value).__name__}")
    return value


def _close_client(a: list[Any]) -> Event:
    code = a[3] if len(a) > 3 else 1000
    return CloseClient(a[1], a[2], code, a[4] if len(a) > 4 else False)


# kind -> (number of fields including the kind, builder from the array)
_DECODERS: dict[int, tuple[int, Callable[[list[Any]], Event]]] = {
    Kind.HELLO: (7, _hello),
    Kind.WELCOME: (6, lambda a: Welcome(a[1], a[2], a[3], a[4], a[5])),
    Kind.AUTH: (2, lambda a: Auth(a[1])),
    Kind.CLOSE: (3, lambda a: Close(a[1], a[2])),
    Kind.GOAWAY: (2, lambda a: GoAway(a[1])),
    Kind.PING: (2, lambda a: Ping(a[1])),
    Kind.PONG: (2, lambda a: Pong(a[1])),
    Kind.REQUEST: (10, _request),
    Kind.RESULT: (3, lambda a: Response(a[1], a[2])),
    Kind.ERROR: (7, _error),
    Kind.CANCEL: (2, lambda a: Cancel(a[1])),
    Kind.CLIENT_OPENED: (5, lambda a: ClientOpened(a[1], a[2], a[3], _metadata(a[4]))),
    Kind.CLIENT_MESSAGE: (3, lambda a: ClientMessage(a[1], a[2], a[3] if len(a) > 3 else 0)),
    Kind.CLIENT_CLOSED: (3, lambda a: ClientClosed(a[1], a[2])),
    Kind.PUSH_TO_CLIENT: (3, lambda a: PushToClient(a[1], a[2])),
    Kind.CLOSE_CLIENT: (3, _close_client),
    Kind.CLIENT_ACK: (3, lambda a: ClientAck(a[1], a[2])),
}


def check_hello_prefix(a: list[Any]) -> None:
    """The part of HELLO frozen across versions: [0, "koala", version, ...]."""
    if len(a) < 3 or a[1] != MAGIC:
        raise RemoteProtocolError(
            "the first frame is not a Koala HELLO (no 'koala' magic): is this a Koala port?"
        )
    version = a[2]
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise RemoteProtocolError(
            f"the peer speaks Koala protocol version {version!r}; this node speaks only "
            f"version {PROTOCOL_VERSION}: run the same Koala release on both ends",
            CloseCode.UNSUPPORTED_VERSION,
        )


def decode(body: bytes) -> Event:
    """The message in a frame body. RemoteProtocolError with the reason if malformed.

    Elements after the last known field are ignored (room for additive changes within
    a protocol version); too few elements, a wrong type or an unknown kind is an error.
    """
    a = loads(body)
    if not isinstance(a, list) or not a:
        raise RemoteProtocolError(
            f"a message must be a non-empty CBOR array, got {type(a).__name__}"
        )
    kind = a[0]
    if type(kind) is not int:
        raise RemoteProtocolError(f"the message kind must be an unsigned integer, got {kind!r}")
    entry = _DECODERS.get(kind)
    if entry is None:
        raise RemoteProtocolError(
            f"unknown message kind {kind}; this node speaks protocol version "
            f"{PROTOCOL_VERSION} (kinds {', '.join(str(int(k)) for k in Kind)})"
        )
    size, build = entry
    if kind == Kind.HELLO:
        check_hello_prefix(a)
    if len(a) < size:
        name = Kind(kind).name
        raise RemoteProtocolError(f"a {name} message has {size} elements, this one {len(a)}")
    try:
        return build(a)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"malformed {Kind(kind).name} message: {exc}") from None


# ---------------------------------------------------------------- authentication


def proof(
    secret: bytes,
    role: str,
    hello: Hello,
    welcome_node_id: str,
    welcome_nonce: bytes,
) -> bytes:
    """HMAC-SHA256 of the handshake transcript, keyed by the cluster secret.

    ``role`` is "server" for the proof in WELCOME and "client" for the proof in AUTH, so
    neither can be replayed as the other. The transcript binds the version, the cluster,
    both node ids, the client's advertised address and both nonces.
    """
    transcript = cbor2.dumps(
        [
            "koala-auth",
            hello.version,
            role,
            hello.cluster_id,
            hello.node_id,
            hello.address,
            welcome_node_id,
            hello.nonce,
            welcome_nonce,
        ]
    )
    return hmac.new(secret, transcript, hashlib.sha256).digest()


def proofs_match(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
