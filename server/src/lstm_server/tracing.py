"""OpenTelemetry tracing, off by default (``--tracing off|console|otlp``, ``--otlp-endpoint``).

One tracer per process, set up at start by ``setup_tracing`` (like the logs). A call's server span continues the
caller's trace (W3C ``traceparent`` metadata) and is the current span of the call's task, so the spans the layers
open while serving it (``span``), or record afterwards from times the model thread took (``record``), are its
children. With tracing off, each of these is one check of a module global.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import context, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .config import ServerConfig
from .metrics import build_versions

_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None
_propagator = TraceContextTextMapPropagator()
_OFF = contextlib.nullcontext()
_PERF_TO_EPOCH_NS = time.time_ns() - time.perf_counter_ns()


def setup_tracing(config: ServerConfig, exporter: SpanExporter | None = None) -> None:
    """Trace as ``config.tracing`` says: off, console (one JSON span per line on stderr) or otlp (OTLP/gRPC to
    ``config.otlp_endpoint``), in batches. ``exporter``: export every span to it at once instead (tests). A
    previous set-up is flushed and replaced."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider = _tracer = None
    if exporter is None and config.tracing == "off":
        return
    version = build_versions()["version"]
    resource = Resource.create(
        {"service.name": "lstm-server", "service.version": version, "service.instance.id": config.replica_name}
    )
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif config.tracing == "console":
        console = ConsoleSpanExporter(out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n")
        provider.add_span_processor(BatchSpanProcessor(console))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
    _provider, _tracer = provider, provider.get_tracer("lstm_server", version)


def enabled() -> bool:
    """Whether spans are recorded."""
    return _tracer is not None


def start_call(method: str, metadata: Iterable[tuple[str, Any]], request_id: str) -> trace.Span | None:
    """The server span of the gRPC call of ``method`` (``package.Service/Method``; None with tracing off, and then
    nothing is built), a child of the caller's ``traceparent`` if it sent one, made current for the rest of the
    call's task; the caller ends it."""
    if _tracer is None:
        return None
    service, _, name = method.rpartition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name, "lstm.request_id": request_id}
    parent = _propagator.extract({key: value for key, value in metadata if isinstance(value, str)})
    span = _tracer.start_span(method, context=parent, kind=SpanKind.SERVER, attributes=attributes)
    context.attach(trace.set_span_in_context(span, parent))  # the task is the call's own: it ends with the call
    return span


def span(name: str, attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[Any]:
    """A child span of the current one around a block (a no-op context with tracing off)."""
    if _tracer is None:
        return _OFF
    return _tracer.start_as_current_span(name, attributes=attributes)


def record(name: str, start: float, end: float, attributes: Mapping[str, Any], error: str | None = None) -> None:
    """A finished child span of the current one, from ``time.perf_counter()`` times (what another thread timed);
    ``error``: it ended in this error."""
    if _tracer is None:
        return
    child = _tracer.start_span(name, attributes=attributes, start_time=_epoch_ns(start))
    if error is not None:
        child.set_status(StatusCode.ERROR, error)
    child.end(end_time=_epoch_ns(end))


def _epoch_ns(perf_counter: float) -> int:
    """A ``time.perf_counter()`` time as nanoseconds since the epoch (one fixed offset: equal times stay equal)."""
    return round(perf_counter * 1e9) + _PERF_TO_EPOCH_NS
