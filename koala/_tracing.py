"""OpenTelemetry traces of actor calls, HTTP requests and storage work; free when off.

Koala uses only ``opentelemetry-api``: the SDK, its exporters and sampling are the
application's choice. Configure a tracer provider (``trace.set_tracer_provider(...)``)
before the runtime starts: :func:`refresh` (called as a runtime, an HTTP server or a
gateway starts) looks once whether one is set. Without one, :data:`tracer` stays None
and every instrumented path costs one module attribute read: a no-op span of the API
costs several microseconds, as much as a whole local call.

A call's span context crosses processes as a W3C ``traceparent`` (and ``tracestate``)
carried in the wire REQUEST (docs/protocol.md), in HTTP headers, and in the gateway's
frames; a malformed one is ignored (W3C: start a new trace), never an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

tracer: Tracer | None = None
"""Koala's tracer while a tracer provider is configured, else None (see refresh)."""

MAX_TRACESTATE: Final = 512  # W3C: at most 32 members; 512 bytes is what we carry
_TRACEPARENT: Final = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_SCOPE: Final = "koala"


_chosen: trace.TracerProvider | None = None


def use(provider: trace.TracerProvider | None) -> None:
    """Trace with ``provider`` instead of the global one (None: the global one again)."""
    global _chosen
    _chosen = provider
    refresh()


def refresh() -> bool:
    """Look (again) whether the application configured a tracer provider."""
    global tracer
    provider = _chosen or trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        tracer = None
    else:
        tracer = provider.get_tracer(_SCOPE)
    return tracer is not None


def outgoing() -> tuple[str, str] | None:
    """The current span context as (traceparent, tracestate) to send along, or None."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    parent = carrier.get("traceparent")
    if parent is None:
        return None
    return parent, carrier.get("tracestate", "")[:MAX_TRACESTATE]


def valid_traceparent(value: object) -> bool:
    return isinstance(value, str) and _TRACEPARENT.fullmatch(value) is not None


def incoming(traceparent: str | None, tracestate: str = "") -> context.Context | None:
    """The parent context a peer sent (None: none, or malformed)."""
    if not valid_traceparent(traceparent):
        return None
    assert traceparent is not None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate[:MAX_TRACESTATE]
    return propagate.extract(carrier)


@contextmanager
def span(
    active: Tracer,
    name: str,
    kind: SpanKind,
    attributes: dict[str, Any],
    parent: context.Context | None = None,
) -> Iterator[trace.Span]:
    """A span made current for the block; an exception marks it failed and goes on."""
    with active.start_as_current_span(
        name,
        context=parent,
        kind=kind,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except BaseException as exc:
            current.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            current.record_exception(exc)
            raise


def call_attributes(interface: str, method: str, actor_type: str, key: object) -> dict[str, Any]:
    """The attributes of an actor call's spans (OpenTelemetry's RPC conventions)."""
    return {
        "rpc.system": "koala",
        "rpc.service": interface,
        "rpc.method": method,
        "koala.actor_type": actor_type,
        "koala.actor_key": str(key),
    }


def current_trace_id() -> str | None:
    """The current span's trace id in hex, for log lines (None outside any span)."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
