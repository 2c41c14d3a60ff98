"""How the ``koala`` command logs: text (the default) or one JSON object a line.

``configure_logging("json", "INFO")`` makes every record a line such as::

    {"time": "2026-12-01T10:00:00.123Z", "level": "INFO", "logger": "koala.http",
     "message": "...", "actor_type": "Player", "actor_key": "42",
     "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}

``actor_type`` and ``actor_key`` are there when the record was made in an actor's turn
(the activation the turn runs in); ``trace_id``/``span_id`` when an OpenTelemetry span
is current (only if ``opentelemetry`` is importable; Koala does not require it);
``traceback`` when the record carries an exception, ``stack`` for ``stack_info``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from ._errors import ConfigError
from .host import current_activation

FORMATS = ("text", "json")
FORMAT_ENV = "KOALA_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _span_reader() -> Callable[[], tuple[str, str] | None]:
    """(trace id, span id) of the current OpenTelemetry span, as lowercase hex; a reader
    answering None always when the API is not installed."""
    try:
        from opentelemetry import trace
    except ImportError:
        return lambda: None

    def current() -> tuple[str, str] | None:
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return format(context.trace_id, "032x"), format(context.span_id, "016x")

    return current


class ContextFilter(logging.Filter):
    """Adds the actor (``actor_type``, ``actor_key``) and the trace (``trace_id``,
    ``span_id``) the record was made in, when known, as attributes of the record.

    On a handler: it runs in the task that logs, so the context is the caller's."""

    def __init__(self) -> None:
        super().__init__()
        self._span = _span_reader()

    def filter(self, record: logging.LogRecord) -> bool:
        activation = current_activation.get()
        if activation is not None:
            record.actor_type = activation.impl.actor_type
            record.actor_key = str(activation.key)
        span = self._span()
        if span is not None:
            record.trace_id, record.span_id = span
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("actor_type", "actor_key", "trace_id", "span_id"):
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["traceback"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii keeps every line plain ASCII; newlines in text are escaped
        return json.dumps(out, ensure_ascii=True, default=str)


def configure_logging(
    fmt: str = "text", level: str | int = "INFO", *, stream: IO[str] | None = None
) -> None:
    """Send the process's log records to ``stream`` (stderr) as ``fmt`` says: "text"
    (``TIME LEVEL LOGGER: MESSAGE``) or "json" (one object a line), from ``level`` up.
    Replaces the root logger's handlers, so calling it again reconfigures."""
    if fmt not in FORMATS:
        raise ConfigError(
            f"the log format must be one of {', '.join(FORMATS)} (--log-format or "
            f"{FORMAT_ENV}), got {fmt!r}"
        )
    numeric = level if isinstance(level, int) else logging.getLevelName(str(level).upper())
    if not isinstance(numeric, int):
        raise ConfigError(
            f"unknown log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
        handler.addFilter(ContextFilter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
