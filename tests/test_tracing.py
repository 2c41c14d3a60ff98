"""OpenTelemetry traces (koala._tracing): spans where work happens, nothing when off."""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from koala import ActorBase, ActorInterface, _tracing, get_rpc_proxy
from koala.storage import Storage
from koala.testing import local_runtime


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


@dataclasses.dataclass
class Note:
    text: str


@pytest.mark.anyio
async def test_storage_work_is_a_span_inside_the_callers(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    assert _tracing.tracer is not None
    async with Storage(f"sqlite:///{tmp_path / 't.db'}") as storage:
        notes = storage.store("notes", Note)
        with _tracing.tracer.start_as_current_span("request") as outer:
            await notes.save("a", Note("hi"), version=None)
            assert await notes.load("a") is not None
    by_name = {s.name: s for s in spans.get_finished_spans()}
    assert {"storage write", "storage load", "request"} <= set(by_name)
    for name in ("storage write", "storage load"):
        child = by_name[name]
        assert child.kind is SpanKind.CLIENT
        assert child.parent is not None
        assert child.parent.span_id == outer.get_span_context().span_id
        assert child.attributes is not None
        assert child.attributes["db.system"] == "sqlite"
        assert child.attributes["koala.store"] == "notes"


def test_off_without_a_provider() -> None:
    _tracing.use(None)
    assert _tracing.refresh() is False  # the suite configures no global provider
    assert _tracing.tracer is None
    assert _tracing.outgoing() is None


def test_traceparent_round_trip(spans: InMemorySpanExporter) -> None:
    assert _tracing.tracer is not None
    with _tracing.tracer.start_as_current_span("caller") as caller:
        sent = _tracing.outgoing()
    assert sent is not None
    traceparent, _ = sent
    assert _tracing.valid_traceparent(traceparent)
    parent = _tracing.incoming(traceparent)
    assert parent is not None
    with _tracing.span(_tracing.tracer, "callee", SpanKind.SERVER, {}, parent) as callee:
        pass
    assert callee.get_span_context().trace_id == caller.get_span_context().trace_id


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        "",
        "00-xyz",
        "00-" + "0" * 32 + "-" + "0" * 16,
        7,
        "zz-" + "a" * 32 + "-" + "b" * 16 + "-01",
    ],
)
def test_malformed_traceparent_is_ignored(garbage: object) -> None:
    assert _tracing.incoming(garbage) is None  # type: ignore[arg-type]


class IEcho(ActorInterface):
    @abstractmethod
    async def echo(self, text: str) -> str: ...


class Echo(IEcho, ActorBase):
    async def echo(self, text: str) -> str:
        return text


@pytest.mark.anyio
async def test_a_local_call_is_a_client_span_of_its_caller(spans: InMemorySpanExporter) -> None:
    async with local_runtime(Echo):
        assert _tracing.tracer is not None
        with _tracing.tracer.start_as_current_span("route") as route:
            assert await get_rpc_proxy(IEcho, "a").echo("hi") == "hi"
    (call,) = [s for s in spans.get_finished_spans() if s.name == "IEcho.echo"]
    assert call.kind is SpanKind.CLIENT
    assert call.parent is not None
    assert call.parent.span_id == route.get_span_context().span_id
    assert call.attributes is not None
    assert call.attributes["koala.actor_type"] == "Echo"
    assert call.attributes["koala.actor_key"] == "a"
