"""The app `koala dev --log-format json` runs in tests/test_logging.py: an actor that
logs, a route that raises, and a route that logs under an OpenTelemetry span."""

from __future__ import annotations

import logging
from abc import abstractmethod

from fastapi import FastAPI

from koala import ActorBase, ActorInterface, get_rpc_proxy

log = logging.getLogger("tests.logging_app")

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


class IChatty(ActorInterface):
    @abstractmethod
    async def speak(self, text: str) -> str: ...


class Chatty(IChatty, ActorBase):
    async def speak(self, text: str) -> str:
        log.info("actor says %s", text)
        return text


app = FastAPI()


@app.get("/speak/{key}")
async def speak(key: str) -> str:
    return await get_rpc_proxy(IChatty, key).speak("hello")


@app.get("/boom")
async def boom() -> str:
    raise ValueError("the route broke on purpose")


@app.get("/traced")
async def traced() -> str:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    context = SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1))
    with trace.use_span(NonRecordingSpan(context)):
        log.warning("inside a span")
    return "ok"
