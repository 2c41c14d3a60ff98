"""Trace context across the wire, HTTP and the gateway (docs/operations.md, "Traces").

The wire part is frame level (REQUEST's optional trace element); the HTTP part serves a
real hypercorn server and sends it a ``traceparent`` header; the gateway part runs a
real gateway and host and a WebSocket client; the last test follows one trace from an
HTTP route through two hosts' runtimes over the real transport.
"""

from __future__ import annotations

import struct
from abc import abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import cbor2
import httpx
import pytest
from anyio.abc import TaskStatus
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from koala import ActorBase, ActorInterface, HostConfig, Runtime, _tracing, get_rpc_proxy
from koala._messages import Request as CallRequest
from koala.gateway import ClientHandler, ClientSession, Gateway, LocalLink
from koala.http import serve_asgi
from koala.transport._serving import call_of
from koala.wire._events import MAX_TRACESTATE, RemoteProtocolError, Request
from koala.wire._wire import decode, encode, frame, request_frame

from ._gateway_client import session
from ._gateway_helpers import gateway_config
from ._transport_helpers import IEcho, node
from .test_tracing import spans

__all__ = ["spans"]  # the fixture, shared with test_tracing.py

TP = "00-000102030405060708090a0b0c0d0e0f-1011121314151617-01"
BASE: list[Any] = [10, 1, 4242, 30.0, "Player", "p1", "IPlayer", "echo", ["hello"], False]


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


# ---------------------------------------------------------------- HTTP

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
HEADER = f"00-{TRACE_ID}-{PARENT_ID}-01"


@asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    """``app`` behind koala.http.serve_asgi (hypercorn) on a free port: its base URL."""
    shutdown = anyio.Event()

    async def serve(*, task_status: TaskStatus[tuple[str, int]]) -> None:
        await serve_asgi(app, "127.0.0.1", 0, shutdown, task_status=task_status)

    async with anyio.create_task_group() as tg:
        host, port = await tg.start(serve)
        try:
            yield f"http://{host}:{port}"
        finally:
            shutdown.set()


def _traced_app() -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> str:
        assert _tracing.tracer is not None
        with _tracing.tracer.start_as_current_span("inside the route"):
            return item_id

    @app.get("/broken")
    async def broken() -> str:
        raise RuntimeError("route bug")

    return app


@pytest.mark.anyio
async def test_an_http_request_is_a_server_span_continuing_the_callers_trace(
    spans: InMemorySpanExporter,
) -> None:
    async with served(_traced_app()) as base, httpx.AsyncClient(base_url=base) as client:
        headers = {"traceparent": HEADER, "tracestate": "vendor=x"}
        assert (await client.get("/items/42", headers=headers)).json() == "42"
    done = spans.get_finished_spans()
    server = next(s for s in done if s.kind is SpanKind.SERVER)
    assert server.name == "GET /items/{item_id}"  # the route's template, not the path
    assert server.context is not None
    assert server.parent is not None
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert format(server.parent.span_id, "016x") == PARENT_ID
    assert server.parent.is_remote
    assert server.context.trace_state.get("vendor") == "x"
    assert server.attributes is not None
    assert server.attributes["http.request.method"] == "GET"
    assert server.attributes["url.path"] == "/items/42"
    assert server.attributes["http.route"] == "/items/{item_id}"
    assert server.attributes["http.response.status_code"] == 200
    assert server.status.status_code is not StatusCode.ERROR
    inside = next(s for s in done if s.name == "inside the route")
    assert inside.parent is not None
    assert inside.parent.span_id == server.context.span_id  # current while the app ran


@pytest.mark.anyio
async def test_http_spans_without_a_route_or_with_a_failure(
    spans: InMemorySpanExporter,
) -> None:
    async with served(_traced_app()) as base, httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/nowhere", headers={"traceparent": "00-bad"})).status_code == 404
        assert (await client.get("/broken")).status_code == 500
        assert (await client.get("/healthz")).status_code == 200  # probes make no span
    done = {s.name: s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER}
    assert set(done) == {"HTTP GET", "GET /broken"}
    missing = done["HTTP GET"]
    assert missing.parent is None  # a malformed traceparent starts a new trace
    assert missing.attributes is not None
    assert missing.attributes["http.response.status_code"] == 404
    failed = done["GET /broken"]
    assert failed.attributes is not None
    assert failed.attributes["http.response.status_code"] == 500
    assert failed.status.status_code is StatusCode.ERROR


@pytest.mark.anyio
async def test_no_tracer_no_span(spans: InMemorySpanExporter) -> None:
    _tracing.use(None)  # the provider that records into ``spans`` is no longer Koala's
    app = FastAPI()

    @app.get("/plain")
    async def plain() -> str:
        return "ok"

    async with served(app) as base, httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/plain", headers={"traceparent": HEADER})).json() == "ok"
    assert _tracing.tracer is None
    assert spans.get_finished_spans() == ()


# ---------------------------------------------------------------- the gateway


class IStamp(ActorInterface):
    @abstractmethod
    async def stamp(self, text: str) -> str: ...


class Stamp(IStamp, ActorBase):
    async def stamp(self, text: str) -> str:
        assert _tracing.tracer is not None
        with _tracing.tracer.start_as_current_span("stamping"):
            return f"stamped {text}"


class TracedClient(ClientHandler, ActorBase):
    """Answers each frame with what another actor made of it (an actor call)."""

    async def on_client_message(self, session: ClientSession, data: bytes | str) -> None:
        await session.push(await get_rpc_proxy(IStamp, "s").stamp(str(data)))


@asynccontextmanager
async def gateway_over(actors: list[type[ActorBase]]) -> AsyncIterator[tuple[str, int]]:
    shutdown = anyio.Event()
    async with (
        Runtime(HostConfig(default_timeout=10.0, shutdown_grace=2.0), actors) as rt,
        anyio.create_task_group() as tg,
    ):
        gateway = Gateway(gateway_config(), LocalLink(rt))

        async def serve(*, task_status: TaskStatus[tuple[str, int]]) -> None:
            await gateway.serve("127.0.0.1", 0, shutdown, task_status=task_status)

        address = await tg.start(serve)
        try:
            yield address
        finally:
            shutdown.set()


@pytest.mark.anyio
async def test_a_client_frame_runs_in_a_gateway_span_with_the_clients_parent(
    spans: InMemorySpanExporter,
) -> None:
    async with (
        gateway_over([TracedClient, Stamp]) as address,
        session(address, "TracedClient", "c1", traceparent=HEADER) as client,
    ):
        await client.send("hi")
        with anyio.fail_after(10):
            assert await client.receive() == "stamped hi"
        await client.close()
    done = spans.get_finished_spans()
    hook = next(s for s in done if s.name == "gateway on_client_message")
    assert hook.kind is SpanKind.SERVER
    assert hook.context is not None
    assert hook.parent is not None
    assert format(hook.parent.span_id, "016x") == PARENT_ID  # the first packet's field
    assert format(hook.context.trace_id, "032x") == TRACE_ID
    assert hook.attributes is not None
    assert hook.attributes["koala.actor_type"] == "TracedClient"
    assert hook.attributes["koala.actor_key"] == "c1"
    assert hook.attributes["rpc.method"] == "on_client_message"
    # the actor call the hook made ran inside the span: whatever spans the runtime
    # adds per call in between, the callee's work is in the hook's trace, under it
    by_id = {s.context.span_id: s for s in done if s.context is not None}
    work = next(s for s in done if s.name == "stamping")
    assert work.context is not None
    assert work.context.trace_id == hook.context.trace_id
    ancestor = work
    while ancestor.parent is not None and ancestor.parent.span_id in by_id:
        ancestor = by_id[ancestor.parent.span_id]
        if ancestor is hook:
            break
    assert ancestor is hook


@pytest.mark.anyio
async def test_a_session_without_a_traceparent_starts_its_own_trace(
    spans: InMemorySpanExporter,
) -> None:
    async with (
        gateway_over([TracedClient, Stamp]) as address,
        session(address, "TracedClient", "c2") as client,
    ):
        await client.send("x")
        with anyio.fail_after(10):
            assert await client.receive() == "stamped x"
        await client.close()
    hook = next(s for s in spans.get_finished_spans() if s.name == "gateway on_client_message")
    assert hook.parent is None


# ---------------------------------------------------------------- across hosts


@pytest.mark.anyio
async def test_one_trace_from_an_http_route_through_two_hosts(
    spans: InMemorySpanExporter,
) -> None:
    """HTTP -> host A (a route calls an actor placed on B) -> host B, over the real
    transport in one process: the HTTP span is the parent of A's CLIENT span, which is
    the parent of B's SERVER span, all in the trace of the client's traceparent."""
    async with node() as (_, b, _), node({"Echo": b.address}) as (rt_a, _, _):
        app = FastAPI()

        @app.get("/echo/{text}")
        async def echo(text: str) -> str:
            return await get_rpc_proxy(IEcho, "e1", runtime=rt_a).echo(text)

        async with served(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
            resp = await client.get("/echo/hi", headers={"traceparent": HEADER})
            assert resp.json() == "hi"
    done = spans.get_finished_spans()

    def rpc(kind: SpanKind) -> ReadableSpan:
        found = [
            s
            for s in done
            if s.kind is kind
            and s.attributes is not None
            and s.attributes.get("rpc.method") == "echo"
        ]
        assert len(found) == 1, [s.name for s in done]
        return found[0]

    http = next(s for s in done if s.name == "GET /echo/{text}")
    client_span, server_span = rpc(SpanKind.CLIENT), rpc(SpanKind.SERVER)
    for sp in (http, client_span, server_span):
        assert sp.context is not None
        assert format(sp.context.trace_id, "032x") == TRACE_ID
    assert http.context is not None
    assert client_span.context is not None
    assert client_span.parent is not None
    assert client_span.parent.span_id == http.context.span_id
    assert server_span.parent is not None
    assert server_span.parent.span_id == client_span.context.span_id
    assert server_span.parent.is_remote  # it came over the wire, in the REQUEST
