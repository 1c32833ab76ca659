"""Structured logs: one JSON object per line, with the fields of the call being served (``bind``: request id,
method, tenant, session, model), the trace and span ids of the current span (with tracing on), and any ``extra=``
fields of the line."""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections.abc import Mapping
from types import MappingProxyType

from opentelemetry import trace

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# Replaced, never changed in place: a task started by the call (a turn's lifecycle) keeps the fields it was started
# with, and the next call on the event loop starts from its own copy of the context.
_call_fields: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "lstm_call_fields", default=MappingProxyType({})
)


def bind(**fields: str) -> None:
    """Put ``fields`` on every log line of the current call from now on (its task, and tasks it starts later)."""
    _call_fields.set({**_call_fields.get(), **fields})


def call_fields() -> Mapping[str, str]:
    """The fields ``bind`` set for the current call."""
    return _call_fields.get()


def trace_fields() -> dict[str, str]:
    """The W3C trace id and span id of the current span (none with tracing off, or outside a call's task)."""
    span = trace.get_current_span().get_span_context()
    if not span.is_valid:
        return {}
    return {"trace_id": f"{span.trace_id:032x}", "span_id": f"{span.span_id:016x}"}


class JsonFormatter(logging.Formatter):
    def __init__(self, replica: str) -> None:
        super().__init__()
        self.replica = replica

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "replica": self.replica,
            **_call_fields.get(),
            **trace_fields(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, replica: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(replica))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
