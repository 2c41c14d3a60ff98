"""The sans-IO protocol: bytes in, events out, synchronously. One test per rejection."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from koala._messages import ErrorCode, ErrorInfo
from koala.transport import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Cancel,
    ClientClosed,
    ClientMessage,
    ClientOpened,
    Close,
    CloseClient,
    CloseCode,
    Connection,
    ConnectionClosed,
    Event,
    GoAway,
    HandshakeComplete,
    Hello,
    LocalProtocolError,
    Ping,
    Pong,
    PushToClient,
    RemoteProtocolError,
    Request,
    Response,
    Role,
    State,
)
from koala.wire._events import ClientAck, ProtocolError
from koala.wire._protocol import MAX_HANDSHAKE_BUFFER, MAX_HANDSHAKE_FRAME
from koala.wire._wire import decode, encode

SECRET = b"0123456789abcdef-secret"


def client(**kw: Any) -> Connection:
    args: dict[str, Any] = {"cluster_id": "c1", "node_id": "client", "address": "127.0.0.1:7001"}
    args.update(kw)
    return Connection(Role.CLIENT, **args)


def server(**kw: Any) -> Connection:
    args: dict[str, Any] = {"cluster_id": "c1", "node_id": "server"}
    args.update(kw)
    return Connection(Role.SERVER, **args)


def events(conn: Connection) -> list[Event]:
    out: list[Event] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        assert isinstance(ev, Event)
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            return out


def handshake(c: Connection, s: Connection) -> tuple[list[Event], list[Event]]:
    s.receive_data(c.initiate())
    s_events = events(s)
    c.receive_data(s.data_to_send())
    c_events = events(c)
    s.receive_data(c.data_to_send())
    s_events += events(s)
    return c_events, s_events


def open_pair(**kw: Any) -> tuple[Connection, Connection]:
    c, s = client(**kw), server(**kw)
    handshake(c, s)
    assert c.state is State.OPEN
    assert s.state is State.OPEN
    return c, s


def frame_of(item: Any) -> bytes:
    body = cbor2.dumps(item)
    return struct.pack(">I", len(body)) + body


def reject(conn: Connection, data: bytes) -> RemoteProtocolError:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        events(conn)
    assert conn.state is State.ERROR
    return info.value


REQUEST = Request(7, 99, 2.5, "Player", "p1", "IPlayer", "echo", ["hi"], False)


# ---------------------------------------------------------------- handshake


def test_handshake_without_secret() -> None:
    c_events, s_events = handshake(client(), server())
    assert c_events == [HandshakeComplete("server", "", "c1", False)]
    assert s_events == [HandshakeComplete("client", "127.0.0.1:7001", "c1", False)]


def test_handshake_with_secret() -> None:
    c, s = client(secret=SECRET), server(secret=SECRET)
    c_events, s_events = handshake(c, s)
    assert c_events == [HandshakeComplete("server", "", "c1", True)]
    assert s_events == [HandshakeComplete("client", "127.0.0.1:7001", "c1", True)]


def test_requests_pipelined_after_auth_are_delivered_once_open() -> None:
    c, s = client(secret=SECRET), server(secret=SECRET)
    s.receive_data(c.initiate())
    assert events(s) == []
    c.receive_data(s.data_to_send())
    assert len(events(c)) == 1
    s.receive_data(c.data_to_send() + c.send(REQUEST))
    assert events(s)[1:] == [REQUEST]


def test_calls_flow_both_ways() -> None:
    c, s = open_pair()
    s.receive_data(c.send(REQUEST))
    assert events(s) == [REQUEST]
    c.receive_data(s.send(Response(7, "hi")) + s.send(REQUEST))
    assert events(c) == [Response(7, "hi"), REQUEST]


def test_nonce_is_random_per_connection() -> None:
    assert decode(client().initiate()[4:]) != decode(client().initiate()[4:])


# ---------------------------------------------------------------- rejections


def test_reject_oversized_frame_from_its_length_prefix_alone() -> None:
    _c, s = open_pair(max_frame_size=4096)
    err = reject(s, struct.pack(">I", 4097))  # the body never arrives
    assert err.close_code is CloseCode.FRAME_TOO_LARGE
    assert "4097" in str(err)
    assert "4096" in str(err)


def test_reject_empty_frame() -> None:
    _, s = open_pair()
    assert "empty frame" in str(reject(s, b"\0\0\0\0"))


def test_reject_invalid_cbor() -> None:
    _, s = open_pair()
    assert "not valid CBOR" in str(reject(s, b"\0\0\0\1\xff"))


def test_reject_truncated_cbor_item() -> None:
    _, s = open_pair()
    assert "not valid CBOR" in str(reject(s, b"\0\0\0\2\x82\x0d"))


def test_reject_trailing_bytes_after_the_item() -> None:
    _, s = open_pair()
    body = cbor2.dumps([13, 1]) + b"\x00"
    assert "after its CBOR item" in str(reject(s, struct.pack(">I", len(body)) + body))


def test_reject_message_that_is_not_an_array() -> None:
    _, s = open_pair()
    assert "non-empty CBOR array" in str(reject(s, frame_of({"kind": 10})))


def test_reject_empty_array() -> None:
    _, s = open_pair()
    assert "non-empty CBOR array" in str(reject(s, frame_of([])))


def test_reject_kind_that_is_not_an_integer() -> None:
    _, s = open_pair()
    assert "kind must be an unsigned integer" in str(reject(s, frame_of(["request", 1])))


def test_reject_unknown_kind() -> None:
    _, s = open_pair()
    err = reject(s, frame_of([99, 1, 2]))
    assert "unknown message kind 99" in str(err)
    assert f"version {PROTOCOL_VERSION}" in str(err)


def test_reject_too_few_fields() -> None:
    _, s = open_pair()
    assert "REQUEST message has 10 elements, this one 3" in str(reject(s, frame_of([10, 1, 2])))


def test_reject_wrong_field_type() -> None:
    _, s = open_pair()
    item = [10, "one", 2, 1.0, "T", "k", "I", "m", [], False]
    err = reject(s, frame_of(item))
    assert "malformed REQUEST" in str(err)
    assert "request_id" in str(err)


def test_reject_boolean_key() -> None:
    _, s = open_pair()
    err = reject(s, frame_of([10, 1, 2, 1.0, "T", True, "I", "m", [], False]))
    assert "key must be" in str(err)


def test_reject_negative_timeout() -> None:
    _, s = open_pair()
    err = reject(s, frame_of([10, 1, 2, -1.0, "T", "k", "I", "m", [], False]))
    assert "timeout" in str(err)


def test_reject_unknown_error_code() -> None:
    c, _ = open_pair()
    err = reject(c, frame_of([12, 1, 77, "x:Y", "msg", "", []]))
    assert "unknown error code 77" in str(err)


def test_reject_forbidden_cbor_tag() -> None:
    _, s = open_pair()
    body = bytes.fromhex("820d") + bytes.fromhex("d82361") + b"a"  # [13, regex("a")]
    err = reject(s, struct.pack(">I", len(body)) + body)
    assert "tag 35" in str(err)


def test_reject_unknown_cbor_tag() -> None:
    _, s = open_pair()
    body = bytes.fromhex("820dd9ffff01")  # [13, tag 65535(1)]
    assert "tag 65535" in str(reject(s, struct.pack(">I", len(body)) + body))


def test_bignum_and_datetime_tags_are_allowed() -> None:
    c, s = open_pair()
    big = 2**80
    s.receive_data(c.send(Request(1, 2, 1.0, "T", big, "I", "m", [-big], False)))
    ev = events(s)[0]
    assert isinstance(ev, Request)
    assert ev.key == big
    assert ev.args == [-big]


def test_reject_too_deep_nesting() -> None:
    _, s = open_pair()
    deep: Any = 1
    for _ in range(100):
        deep = [deep]
    assert "not valid CBOR" in str(reject(s, frame_of([11, 1, deep])))


def test_reject_hello_without_magic() -> None:
    s = server()
    err = reject(s, frame_of([0, "other", 1, "c1", "n", "", b"x" * 32]))
    assert "magic" in str(err)


def test_reject_plain_http_client() -> None:
    s = server()
    err = reject(s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert err.close_code is CloseCode.FRAME_TOO_LARGE


def test_reject_unsupported_version() -> None:
    s = server()
    err = reject(s, frame_of([0, "koala", 2, "c1", "n", "", b"x" * 32]))
    assert err.close_code is CloseCode.UNSUPPORTED_VERSION
    assert "version 2" in str(err)


def test_reject_unsupported_version_in_welcome() -> None:
    c = client()
    c.initiate()
    err = reject(c, frame_of([1, 9, "c1", "server", b"y" * 32, None]))
    assert err.close_code is CloseCode.UNSUPPORTED_VERSION


def test_reject_wrong_cluster_at_the_server() -> None:
    c, s = client(cluster_id="a"), server(cluster_id="b")
    err = reject(s, c.initiate())
    assert err.close_code is CloseCode.WRONG_CLUSTER
    assert "'a'" in str(err)
    assert "'b'" in str(err)


def test_reject_wrong_cluster_at_the_client() -> None:
    c = client(cluster_id="a")
    c.initiate()
    err = reject(c, frame_of([1, 1, "b", "server", b"y" * 32, None]))
    assert err.close_code is CloseCode.WRONG_CLUSTER


def test_reject_wrong_secret_at_the_client() -> None:
    c, s = client(secret=SECRET), server(secret=b"another-secret-of-16+bytes")
    s.receive_data(c.initiate())
    events(s)
    err = reject(c, s.data_to_send())
    assert err.close_code is CloseCode.AUTH_FAILED
    assert "secrets differ" in str(err)


def test_reject_wrong_secret_at_the_server() -> None:
    # a client that skips checking the server's proof still cannot get in
    honest = client(secret=b"another-secret-of-16+bytes")
    s = server(secret=SECRET)
    s.receive_data(honest.initiate())
    events(s)
    honest.receive_data(s.data_to_send())
    with pytest.raises(RemoteProtocolError):
        events(honest)
    err = reject(s, frame_of([2, b"\0" * 32]))
    assert err.close_code is CloseCode.AUTH_FAILED


def test_reject_client_without_secret_when_server_has_one() -> None:
    c, s = client(), server(secret=SECRET)
    s.receive_data(c.initiate())
    events(s)
    err = reject(c, s.data_to_send())
    assert err.close_code is CloseCode.AUTH_FAILED
    assert "has none" in str(err)


def test_reject_null_proof_when_server_has_a_secret() -> None:
    c, s = client(), server(secret=SECRET)
    s.receive_data(c.initiate())
    events(s)
    err = reject(s, frame_of([2, None]))
    assert err.close_code is CloseCode.AUTH_FAILED
    assert "no cluster secret" in str(err)


def test_reject_server_without_secret_when_client_has_one() -> None:
    c, s = client(secret=SECRET), server()
    s.receive_data(c.initiate())
    events(s)
    err = reject(c, s.data_to_send())
    assert err.close_code is CloseCode.AUTH_FAILED
    assert "no cluster secret" in str(err)


def test_requests_after_a_failed_auth_are_never_delivered() -> None:
    s = server(secret=SECRET)
    c = client(secret=SECRET)
    s.receive_data(c.initiate())
    events(s)
    request = frame_of([10, 1, 2, 1.0, "T", "k", "I", "m", [], False])
    s.receive_data(frame_of([2, b"\1" * 32]) + request)
    with pytest.raises(RemoteProtocolError):
        s.next_event()
    with pytest.raises(RemoteProtocolError):  # and it stays broken
        s.next_event()


def test_reject_request_before_the_handshake() -> None:
    s = server()
    err = reject(s, frame_of([10, 1, 2, 1.0, "T", "k", "I", "m", [], False]))
    assert "Request while the connection is AWAIT_HELLO" in str(err)


def test_reject_second_hello() -> None:
    _c, s = open_pair()
    err = reject(s, client().initiate())
    assert "Hello while the connection is OPEN" in str(err)


def test_reject_welcome_sent_to_a_server() -> None:
    s = server()
    err = reject(s, frame_of([1, 1, "c1", "x", b"y" * 32, None]))
    assert "Welcome while the connection is AWAIT_HELLO" in str(err)


def test_reject_stream_ending_inside_a_frame() -> None:
    _, s = open_pair()
    s.receive_data(frame_of([13, 1])[:-1])
    assert s.next_event() is NEED_DATA
    s.receive_data(None)
    with pytest.raises(RemoteProtocolError, match="ended inside a frame"):
        s.next_event()


def test_protocol_error_names_the_close_to_send() -> None:
    _, s = open_pair()
    err = reject(s, frame_of([99]))
    data = s.close_frame(err)
    assert decode(data[4:]) == Close(CloseCode.PROTOCOL_ERROR, str(err))
    assert s.state is State.CLOSED


# ---------------------------------------------------------------- bounded before trust


def test_reject_oversized_frame_before_hello_from_its_prefix() -> None:
    s = server()
    s.receive_data(struct.pack(">I", 16 * 1024 * 1024))  # the body never arrives
    assert s.state is State.ERROR  # refused in receive_data, before any body is kept
    with pytest.raises(RemoteProtocolError) as info:
        s.next_event()
    assert info.value.close_code is CloseCode.FRAME_TOO_LARGE
    assert "before the handshake" in str(info.value)
    assert str(MAX_HANDSHAKE_FRAME) in str(info.value)


def test_reject_oversized_frame_before_hello_sent_whole() -> None:
    s = server()
    body = b"\x00" * (MAX_HANDSHAKE_FRAME + 1)
    s.receive_data(struct.pack(">I", len(body)) + body)
    assert s._buf == bytearray()  # dropped at once
    with pytest.raises(RemoteProtocolError, match="MAX_HANDSHAKE_FRAME"):
        s.next_event()


def test_reject_oversized_auth() -> None:
    c, s = client(), server()
    s.receive_data(c.initiate())
    assert events(s) == []
    assert s.state is State.AWAIT_AUTH
    err = reject(s, struct.pack(">I", MAX_HANDSHAKE_FRAME + 1))
    assert err.close_code is CloseCode.FRAME_TOO_LARGE


def test_reject_oversized_welcome() -> None:
    c = client()
    c.initiate()
    err = reject(c, struct.pack(">I", MAX_HANDSHAKE_FRAME + 1))
    assert err.close_code is CloseCode.FRAME_TOO_LARGE
    assert "before the handshake" in str(err)


def test_reject_more_than_a_handshake_while_the_peer_must_wait() -> None:
    # a small HELLO, then more bytes than the peer may send before it is answered
    s = server()
    s.receive_data(client().initiate() + frame_of([5, 1]) * (MAX_HANDSHAKE_BUFFER // 4))
    assert s.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="must wait for the answer"):
        s.next_event()


def test_reject_tls_spoken_to_a_plain_node() -> None:
    # the first bytes of a TLS ClientHello record, as a node with TLS on sends them
    err = reject(server(), bytes.fromhex("16030100f8010000f40303") + b"\x00" * 32)
    assert err.close_code is CloseCode.NOT_ALLOWED
    assert "speaks TLS" in str(err)


def test_a_handshake_bounds_only_the_handshake() -> None:
    # a request larger than MAX_HANDSHAKE_FRAME, pipelined right after AUTH, is taken
    c, s = client(), server()
    s.receive_data(c.initiate())
    events(s)
    c.receive_data(s.data_to_send())
    events(c)
    big = Request(1, 1, 1.0, "T", "k", "I", "m", ["x" * 100_000])
    s.receive_data(c.data_to_send() + c.send(big))
    assert events(s)[1:] == [big]


def test_input_after_a_refusal_is_not_kept() -> None:
    s = server()
    s.receive_data(struct.pack(">I", 1 << 30))
    s.receive_data(b"x" * 1_000_000)
    assert len(s._buf) == 0
    with pytest.raises(RemoteProtocolError):
        s.next_event()


def test_a_close_sent_before_the_handshake_fits_the_peers_bound() -> None:
    s = server()
    data = s.close_frame(ProtocolError("\u00e9" * 1000, CloseCode.PROTOCOL_ERROR))
    assert len(data) - 4 <= MAX_HANDSHAKE_FRAME
    assert isinstance(decode(data[4:]), Close)


def test_an_identity_too_large_for_a_handshake_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="shorten them"):
        client(node_id="n" * MAX_HANDSHAKE_FRAME)


def test_frames_received_counts_whole_frames_only() -> None:
    c, s = open_pair()
    before = s.frames_received
    ping = c.send(Ping(1))
    for byte in ping[:-1]:  # a frame that never ends moves nothing
        s.receive_data(bytes([byte]))
        assert events(s) == []
    assert s.frames_received == before
    s.receive_data(ping[-1:])
    assert events(s) == [Ping(1)]
    assert s.frames_received == before + 1


def test_what_crosses_a_connection_is_counted_on_both_sides() -> None:
    c, s = open_pair()  # the handshake frames are counted too
    assert c.frames_sent == s.frames_received
    assert s.frames_sent == c.frames_received
    assert (c.bytes_sent, s.bytes_sent) == (s.bytes_received, c.bytes_received)
    sent = [c.send(Ping(i)) for i in range(5)] + [c.send_result(7, "done")]
    before = s.bytes_received
    s.receive_data(b"".join(sent))
    assert len(events(s)) == 6
    assert s.bytes_received - before == sum(len(d) for d in sent)
    assert (c.frames_sent, c.bytes_sent) == (s.frames_received, s.bytes_received)


@given(st.lists(st.binary(min_size=1, max_size=3000), max_size=8))
@settings(max_examples=150)
def test_before_trust_no_more_than_a_handshake_is_held(chunks: list[bytes]) -> None:
    # whatever a stranger sends, in whatever pieces, a server waiting for HELLO holds at
    # most MAX_HANDSHAKE_BUFFER bytes of it once each piece has been given
    s = server()
    for chunk in chunks:
        s.receive_data(chunk)
        assert len(s._buf) - s._pos <= MAX_HANDSHAKE_BUFFER
        try:
            events(s)
        except RemoteProtocolError:
            assert s.state is State.ERROR
        if s.state is not State.AWAIT_HELLO:
            break


# ---------------------------------------------------------------- ending


def test_clean_end_of_stream() -> None:
    _, s = open_pair()
    s.receive_data(None)
    assert events(s) == [ConnectionClosed(CloseCode.NORMAL, "the peer closed the connection")]
    assert s.state is State.CLOSED


def test_close_frame_reports_code_and_reason() -> None:
    c, s = open_pair()
    s.receive_data(c.send(Close(CloseCode.SHUTDOWN, "bye")))
    assert events(s) == [ConnectionClosed(CloseCode.SHUTDOWN, "bye")]
    assert c.state is State.CLOSED


def test_close_during_the_handshake() -> None:
    c, s = client(), server()
    c.initiate()
    c.receive_data(s.send(Close(CloseCode.NOT_ALLOWED, "loopback only")))
    assert events(c) == [ConnectionClosed(CloseCode.NOT_ALLOWED, "loopback only")]


def test_goaway_marks_the_peer_draining() -> None:
    c, s = open_pair()
    s.receive_data(c.send(GoAway("draining")))
    assert events(s) == [GoAway("draining")]
    assert s.peer_draining


def test_ping_and_pong() -> None:
    c, s = open_pair()
    s.receive_data(c.send(Ping(5)))
    assert events(s) == [Ping(5)]
    c.receive_data(s.send(Pong(5)))
    assert events(c) == [Pong(5)]


# ---------------------------------------------------------------- local errors


def test_send_before_the_handshake_names_the_state() -> None:
    with pytest.raises(LocalProtocolError, match=r"IDLE .*initiate"):
        client().send(REQUEST)


def test_send_while_waiting_for_welcome_names_the_state() -> None:
    c = client()
    c.initiate()
    with pytest.raises(LocalProtocolError, match="AWAIT_WELCOME"):
        c.send(REQUEST)


def test_send_after_close_names_the_state() -> None:
    c, _ = open_pair()
    c.send(Close(0, ""))
    with pytest.raises(LocalProtocolError, match="CLOSED"):
        c.send(REQUEST)


def test_handshake_messages_are_not_sent_by_hand() -> None:
    c, _ = open_pair()
    with pytest.raises(LocalProtocolError, match="cannot send Hello"):
        c.send(Hello(1, "c1", "x", "", b"n" * 32))


def test_initiate_only_once_and_only_on_a_client() -> None:
    c = client()
    c.initiate()
    with pytest.raises(LocalProtocolError, match="AWAIT_WELCOME"):
        c.initiate()
    with pytest.raises(LocalProtocolError, match="server"):
        server().initiate()


def test_sending_a_frame_above_the_limit_is_refused() -> None:
    c, _ = open_pair(max_frame_size=2048)
    with pytest.raises(LocalProtocolError, match="max frame size of 2048"):
        c.send(Response(1, "x" * 4000))


def test_data_after_end_of_stream_is_a_local_error() -> None:
    _, s = open_pair()
    s.receive_data(None)
    with pytest.raises(LocalProtocolError, match="after the end"):
        s.receive_data(b"x")


def test_short_secret_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="at least 16 bytes"):
        client(secret=b"short")


@pytest.mark.parametrize(
    "make",
    [
        lambda: Request(-1, 0, 1.0, "T", "k", "I", "m"),
        lambda: Request(1, 2**64, 1.0, "T", "k", "I", "m"),
        lambda: Request(1, 0, float("nan"), "T", "k", "I", "m"),
        lambda: Request(1, 0, 1.0, "", "k", "I", "m"),
        lambda: Request(1, 0, 1.0, "T", 1.5, "I", "m"),  # type: ignore[arg-type]
        lambda: Request(1, 0, 1.0, "T", "k", "I", "m", one_way=1),  # type: ignore[arg-type]
        lambda: Request(1, 0, 1.0, "T", "k", "I", "m", placement=b"short"),
        lambda: Request(1, 0, 1.0, "T", "k", "I", "m", placement=0),  # type: ignore[arg-type]
        lambda: Response(1, "x", ErrorInfo(ErrorCode.APPLICATION, "a:B", "m")),
        lambda: Hello(1, "c", "n", "", b"short"),
        lambda: ClientOpened(1, "T", "k", {"a": 1}),  # type: ignore[dict-item]
        lambda: ClientMessage(1, 42),  # type: ignore[arg-type]
        lambda: CloseClient(1, "bye", 1002),
        lambda: CloseClient(1, "bye", 2999),
        lambda: CloseClient(1, "bye", 5000),
        lambda: CloseClient(1, "bye", 4011, misplaced=1),  # type: ignore[arg-type]
        lambda: ClientMessage(1, b"x", -1),
        lambda: ClientAck(1, -1),
        lambda: Ping(-1),
    ],
)
def test_malformed_events_cannot_be_built(make: Any) -> None:
    with pytest.raises(LocalProtocolError):
        make()


def test_close_reason_is_bounded() -> None:
    assert len(Close(1, "x" * 5000).reason) == 1024


# ---------------------------------------------------------------- properties

u64 = st.integers(0, 2**64 - 1)
text = st.text(max_size=12)
name = st.text(min_size=1, max_size=12)
key = st.one_of(st.text(max_size=12), st.integers(-(2**70), 2**70))
leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
)
data = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
error = st.builds(
    ErrorInfo,
    st.sampled_from(list(ErrorCode)),
    text,
    text,
    text,
    st.tuples(leaf, leaf) | st.just(()),
)
# REQUEST's fields in order: ids, timeout, actor type, key, interface, method, args,
# one_way, placement, trace
traceparent = st.builds(
    lambda v, t, p, f: f"{v:02x}-{t:032x}-{p:016x}-{f:02x}",
    st.integers(0, 254),
    st.integers(0, 2**128 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 255),
)
trace = st.none() | st.tuples(traceparent, st.text(max_size=40))
request_fields = (
    u64,
    u64,
    st.floats(0, 1e9),
    name,
    key,
    name,
    name,
    st.lists(data, max_size=4),
    st.booleans(),
    st.just(b"") | st.binary(min_size=32, max_size=32),
    trace,
)
app_events: st.SearchStrategy[Event] = st.one_of(
    st.builds(Request, *request_fields),
    st.builds(Response, u64, data),
    st.builds(Response, u64, st.none(), error),
    st.builds(Cancel, u64),
    st.builds(Ping, u64),
    st.builds(Pong, u64),
    st.builds(GoAway, text),
    st.builds(ClientOpened, u64, name, key, st.dictionaries(text, text, max_size=3)),
    st.builds(ClientMessage, u64, st.binary(max_size=32) | st.text(max_size=32), u64),
    st.builds(ClientClosed, u64, text),
    st.builds(PushToClient, u64, st.binary(max_size=32) | st.text(max_size=32)),
    st.builds(
        CloseClient,
        u64,
        text,
        st.sampled_from([1000, 1001, 1011]) | st.integers(3000, 4999),
        st.booleans(),
    ),
    st.builds(ClientAck, u64, u64),
    st.builds(Close, u64, text),
)


@given(app_events)
def test_every_message_kind_round_trips(ev: Event) -> None:
    assert decode(encode(ev)) == ev


@given(st.lists(app_events.filter(lambda e: not isinstance(e, Close)), max_size=8), st.data())
@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=60)
def test_any_chunking_yields_the_same_events(evs: list[Event], draw: st.DataObject) -> None:
    c, s = open_pair()
    stream = b"".join(c.send(ev) for ev in evs)
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    got: list[Event] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        if cut == start:
            continue  # b"" would mean end of stream
        s.receive_data(stream[start:cut])
        start = cut
        got += events(s)
    assert got == evs


def _feed_garbage(conn: Connection, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            if not chunk:
                continue
            conn.receive_data(chunk)
            events(conn)
        conn.receive_data(None)
        events(conn)
    except RemoteProtocolError:
        assert conn.state is State.ERROR


@given(st.lists(st.binary(max_size=64), max_size=6))
@settings(max_examples=150)
def test_garbage_never_crashes_an_open_connection(chunks: list[bytes]) -> None:
    _, s = open_pair(max_frame_size=4096)
    _feed_garbage(s, chunks)


@given(st.lists(st.binary(max_size=64), max_size=6))
@settings(max_examples=100)
def test_garbage_never_crashes_a_handshake(chunks: list[bytes]) -> None:
    _feed_garbage(server(max_frame_size=4096), chunks)


@given(st.integers(0, 30), st.lists(data, max_size=10))
@settings(max_examples=150)
def test_well_framed_garbage_never_crashes(kind: int, fields: list[Any]) -> None:
    _, s = open_pair()
    _feed_garbage(s, [frame_of([kind, *fields])])


@given(st.binary(min_size=1, max_size=64))
@settings(max_examples=150)
def test_garbage_bodies_never_crash(body: bytes) -> None:
    _, s = open_pair()
    _feed_garbage(s, [struct.pack(">I", len(body)) + body])


def test_gateway_trailing_fields_are_left_out_at_their_defaults() -> None:
    """Old peers' frames stay valid: no seq means no ack wanted, no code means 1000."""
    assert cbor2.loads(encode(ClientMessage(5, b"\x01"))) == [21, 5, b"\x01"]
    assert cbor2.loads(encode(ClientMessage(5, "hi", 7))) == [21, 5, "hi", 7]
    assert decode(cbor2.dumps([21, 5, "hi"])) == ClientMessage(5, "hi", 0)
    assert cbor2.loads(encode(CloseClient(5, "bye"))) == [24, 5, "bye"]
    assert cbor2.loads(encode(CloseClient(5, "bye", 1001))) == [24, 5, "bye", 1001]
    assert cbor2.loads(encode(CloseClient(5, "x", 4011, True))) == [24, 5, "x", 4011, True]
    assert decode(cbor2.dumps([24, 5, "x", 1011])) == CloseClient(5, "x", 1011, False)
    assert cbor2.loads(encode(ClientAck(5, 9))) == [25, 5, 9]
    with pytest.raises(RemoteProtocolError):
        decode(cbor2.dumps([24, 5, "x", 4011, 1]))  # misplaced is a bool, never an integer
    with pytest.raises(RemoteProtocolError):
        decode(cbor2.dumps([25, 5]))


@given(*request_fields)
def test_the_request_fast_path_frames_what_the_checked_path_frames(
    rid: int,
    chain: int,
    timeout: float,
    actor_type: str,
    k: Any,
    interface: str,
    method: str,
    args: list[Any],
    one_way: bool,
    placement: bytes,
    trace: tuple[str, str] | None,
) -> None:
    c, s = open_pair()
    ev = Request(
        rid, chain, timeout, actor_type, k, interface, method, args, one_way, placement, trace
    )
    fast = c.send_request(rid, timeout, ev)  # an event has the fields of an OutgoingCall
    assert fast == c.send(ev)
    s.receive_data(fast)
    assert s.next_event() == ev


@given(u64, data)
def test_the_result_fast_path_frames_what_the_checked_path_frames(rid: int, result: Any) -> None:
    c, _ = open_pair()
    assert c.send_result(rid, result) == c.send(Response(rid, result))


@dataclass(frozen=True)
class _Call:
    """A call as the runtime makes one: no Request event, no validation."""

    chain_id: int = 1
    actor_type: str = "A"
    key: Any = "k"
    interface: str = "IA"
    method: str = "m"
    args: tuple[Any, ...] = ()
    one_way: bool = False
    placement: bytes = b""
    trace: tuple[str, str] | None = None


def test_the_request_fast_path_refuses_what_the_checked_path_refuses() -> None:
    c, _ = open_pair()

    class Tag(int):
        pass

    with pytest.raises(LocalProtocolError, match="key must be"):
        c.send_request(1, 1.0, _Call(key=Tag(3)))
    small, _ = open_pair(max_frame_size=2048)
    with pytest.raises(LocalProtocolError, match="max frame size of 2048"):
        small.send_request(1, 1.0, _Call(args=("x" * 4096,)))
    fresh = Connection(Role.CLIENT, cluster_id="koala", node_id="n", secret=None)
    with pytest.raises(LocalProtocolError, match="cannot send Request"):
        fresh.send_request(1, 1.0, _Call())
    with pytest.raises(LocalProtocolError, match="cannot send Response"):
        fresh.send_result(1, None)
