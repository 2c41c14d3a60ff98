"""Trace context across the wire, HTTP and the gateway (docs/operations.md, "Traces").

The wire part is frame level (REQUEST's optional trace element); the HTTP part serves a
real hypercorn server and sends it a ``traceparent`` header; the gateway part runs a
real gateway and host and a WebSocket client; the last test follows one trace from an
HTTP route through two hosts' runtimes over the real transport.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from koala import _tracing
from koala._messages import Request as CallRequest
from koala.transport._serving import call_of
from koala.wire._events import MAX_TRACESTATE, RemoteProtocolError, Request
from koala.wire._wire import decode, encode, frame, request_frame

TP = "00-000102030405060708090a0b0c0d0e0f-1011121314151617-01"
BASE: list[Any] = [10, 1, 4242, 30.0, "Player", "p1", "IPlayer", "echo", ["hello"], False]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans recorded in memory for the test (a provider of its own, not the global one)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _tracing.use(provider)
    try:
        yield exporter
    finally:
        _tracing.use(None)
        provider.shutdown()


# ---------------------------------------------------------------- the wire


def _decoded(*tail: Any) -> Request:
    ev = decode(cbor2.dumps([*BASE, *tail]))
    assert isinstance(ev, Request)
    return ev


def test_a_request_without_trace_is_the_frame_it_was() -> None:
    ev = Request(1, 4242, 30.0, "Player", "p1", "IPlayer", "echo", ["hello"], False)
    assert ev.trace is None
    assert len(cbor2.loads(encode(ev))) == 10  # no placement, no trace: nothing added
    assert _decoded().trace is None
    assert _decoded(b"").trace is None


def test_a_trace_is_written_after_placement_even_when_that_is_empty() -> None:
    ev = Request(1, 4242, 30.0, "Player", "p1", "IPlayer", "echo", ["hello"], trace=(TP, "a=1"))
    item = cbor2.loads(encode(ev))
    assert item[10:] == [b"", [TP, "a=1"]]
    assert decode(encode(ev)) == ev
    assert _decoded(b"", [TP, "a=1"]).trace == (TP, "a=1")
    assert _decoded(b"", None).trace is None  # null: no trace, as when absent


@pytest.mark.parametrize(
    "parent",
    [
        "",
        "00-xyz",
        TP.upper(),  # W3C: lowercase hex only
        TP + "\n",
        TP + "-extra",
        TP[:-1],
        "00-000102030405060708090a0b0c0d0e0g-1011121314151617-01",
        "0x-000102030405060708090a0b0c0d0e0f-1011121314151617-01",
    ],
)
def test_a_malformed_traceparent_is_ignored_not_an_error(parent: str) -> None:
    assert _decoded(b"", [parent, "a=1"]).trace is None


def test_an_overlong_tracestate_is_dropped_and_the_parent_kept() -> None:
    assert _decoded(b"", [TP, "a" * MAX_TRACESTATE]).trace == (TP, "a" * MAX_TRACESTATE)
    assert _decoded(b"", [TP, "a" * (MAX_TRACESTATE + 1)]).trace == (TP, "")


@pytest.mark.parametrize(
    "garbage",
    [7, "tp", b"tp", {"traceparent": TP}, [TP], [TP, "", ""], [TP, 5], [5, ""], [TP, b""], True],
)
def test_a_trace_of_the_wrong_shape_is_a_malformed_frame(garbage: object) -> None:
    with pytest.raises(RemoteProtocolError, match="malformed REQUEST message: trace"):
        _decoded(b"", garbage)


class _Call:
    """An OutgoingCall that is not a Request: request_frame reads its attributes."""

    def __init__(self, key: Any, trace: tuple[str, str] | None, placement: bytes = b"") -> None:
        self.chain_id, self.actor_type, self.key = 4242, "Player", key
        self.interface, self.method, self.args = "IPlayer", "echo", ("hello",)
        self.one_way, self.placement, self.trace = False, placement, trace


@pytest.mark.parametrize("trace", [None, (TP, ""), (TP, "k=v")])
@pytest.mark.parametrize("placement", [b"", bytes(range(32))])
def test_the_fast_request_frame_is_the_events_frame(
    trace: tuple[str, str] | None, placement: bytes
) -> None:
    ev = Request(
        1, 4242, 30.0, "Player", "p1", "IPlayer", "echo", ["hello"], False, placement, trace
    )
    fast = request_frame(1, 30.0, _Call("p1", trace, placement), 1 << 20)
    assert fast == frame(ev)
    # a key the fast path does not take goes through the event, trace and all
    slow = request_frame(1, 30.0, _Call(2**70, trace, placement), 1 << 20)
    assert decode(slow[4:]) == Request(
        1, 4242, 30.0, "Player", 2**70, "IPlayer", "echo", ["hello"], False, placement, trace
    )


def test_the_runtime_request_sends_and_receives_its_trace() -> None:
    req = CallRequest(1, 4242, 0.0, "Player", "p1", "IPlayer", "echo", ("hello",), trace=(TP, ""))
    ev = decode(request_frame(9, 5.0, req, 1 << 20)[4:])
    assert isinstance(ev, Request)
    assert ev.trace == (TP, "")
    assert call_of(ev, 12.5).trace == (TP, "")
    assert call_of(_decoded(), 12.5).trace is None


traceparents = st.builds(
    lambda v, t, p, f: f"{v:02x}-{t:032x}-{p:016x}-{f:02x}",
    st.integers(0, 255),
    st.integers(0, 2**128 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 255),
)


@given(
    st.none() | st.tuples(traceparents, st.text(max_size=MAX_TRACESTATE)),
    st.just(b"") | st.binary(min_size=32, max_size=32),
)
def test_request_round_trips_with_and_without_trace(
    trace: tuple[str, str] | None, placement: bytes
) -> None:
    ev = Request(7, 1, 2.5, "A", "k", "I", "m", [1, "x"], False, placement, trace)
    assert ev.trace == trace
    assert decode(encode(ev)) == ev


slot = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=80)
    | st.binary(max_size=40)
    | traceparents,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@given(slot, st.lists(slot, max_size=2))
@settings(max_examples=300)
def test_garbage_in_the_trace_slot_is_a_clear_error_or_no_trace(
    garbage: Any, more: list[Any]
) -> None:
    body = cbor2.dumps([*BASE, b"", garbage, *more])
    try:
        ev = decode(body)
    except RemoteProtocolError as exc:
        message = str(exc)
        ev = None
    if ev is None:
        assert "trace" in message
        return
    assert isinstance(ev, Request)
    assert ev.trace is None or (len(ev.trace[0]) == 55 and len(ev.trace[1]) <= MAX_TRACESTATE)


def test_a_traced_request_frame_is_bounded_like_any_other() -> None:
    # the trace adds at most ~580 bytes to a frame; it still has to fit the frame size
    req = CallRequest(1, 1, 0.0, "A", "k", "I", "m", (), trace=(TP, "s" * MAX_TRACESTATE))
    data = request_frame(1, 1.0, req, 1 << 20)
    (size,) = struct.unpack(">I", data[:4])
    assert size == len(data) - 4 < 700
