"""Prometheus metrics of one server, in their own registry (several servers can share a process in tests).
What each one measures, exactly: docs/observability.md."""

from __future__ import annotations

import functools
import importlib.metadata
import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
REQUEST_BUCKETS = (*LATENCY_BUCKETS, 30.0, 60.0, 300.0)  # a stream lasts as long as its turns
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _version(*distributions: str) -> str:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


@functools.cache
def build_versions() -> dict[str, str]:
    """The versions of this server, of Python and of onnxruntime (its CPU or GPU build)."""
    return {
        "version": _version("lstm-server"),
        "python": platform.python_version(),
        "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
    }


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        Info("lstm_build", "Versions of the server, Python and onnxruntime", registry=r).info(build_versions())
        self.tokens_generated = Counter("lstm_tokens_generated", "Characters generated", ["model"], registry=r)
        self.prompt_characters = Counter(
            "lstm_prompt_characters",
            "Characters read as input: prompts of turns and new sessions, Step inputs, classified texts",
            ["model"],
            registry=r,
        )
        self.active_sessions = Gauge("lstm_active_sessions", "Sessions held", ["model"], registry=r)
        self.queue_depth = Gauge(
            "lstm_queue_depth",
            "Waiting for the model: turns not yet taken by the model thread (generation), texts not yet taken "
            "into a batch (classification)",
            ["model"],
            registry=r,
        )
        self.batch_size = Histogram(
            "lstm_batch_size", "Rows per model call", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.model_call = Histogram(
            "lstm_model_call_seconds",
            "Duration of one model call: prefill (a prompt), decode (one batched call of K characters per row), "
            "step (a Step call), classify (one classifier call)",
            ["model", "kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "lstm_queue_wait_seconds",
            "Time from request to its first model call",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "lstm_time_to_first_token_seconds",
            "Generate and Chat: from the turn's start to its first text handed to the stream",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "lstm_inter_token_latency_seconds",
            "Generate and Chat: time between two consecutive pieces of text handed to a stream (each may hold "
            "several characters)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_events = Counter(
            "lstm_session_store_events",
            "Session store: saved (a state written), loaded (a session this replica did not hold, or held stale), "
            "evicted (an idle session left memory; its state stays in the store)",
            ["event"],
            registry=r,
        )
        self.row_failures = Counter(
            "lstm_row_failures",
            "Rows that failed alone and ended only their own turn or text: exception (the runtime raised on the "
            "row) or non_finite (its new state or logits held NaN or infinity)",
            ["model", "kind"],
            registry=r,
        )
        self.requests = Counter("lstm_requests", "RPCs by method and status code", ["method", "code"], registry=r)
        self.request_duration = Histogram(
            "lstm_request_duration_seconds",
            "RPC duration by method and status code, from the call's start to its status (a stream's whole life)",
            ["method", "code"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )

    def serve_http(self, port: int, host: str = "127.0.0.1"):
        """Start the /metrics HTTP endpoint; returns the HTTP server (call ``shutdown()`` to stop it)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
