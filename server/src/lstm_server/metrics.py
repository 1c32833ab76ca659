"""Prometheus metrics of one server, in their own registry (several servers can share a process in tests).
What each one measures, exactly: docs/observability.md."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import socket
import threading
from collections.abc import Callable, Mapping
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
REQUEST_BUCKETS = (*LATENCY_BUCKETS, 30.0, 60.0, 300.0)  # a stream lasts as long as its turns
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LENGTH_BUCKETS = (0, 1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)  # characters of a prompt or of generated text


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


TURN_RPCS = "Generate, Chat, and ModelInfer and ModelStreamInfer on a language model"
REQUEST_RPCS = (
    "every RPC of lstm.v1's Sessions, Generation, Classification and Models services and of "
    "inference.GRPCInferenceService but ServerLive and ServerReady (not health, not reflection)"
)
NOT_FOUND = b"Not Found: this port serves Prometheus metrics at /metrics only\n"


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Log no line per scrape."""


def metrics_only(app: Callable) -> Callable:
    """``app`` (prometheus_client's WSGI app, which answers any path) on ``/metrics`` alone: 404 elsewhere, so
    that a probe of another path (a Triton ``/v2/health/ready``) fails instead of passing."""

    def serve(environ: dict, start_response: Callable) -> list[bytes]:
        if environ.get("PATH_INFO") == "/metrics":
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(NOT_FOUND)))])
        return [NOT_FOUND]

    return serve


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.versions: Mapping[str, str] = {}  # the served models' versions (``serve_models``)
        r = self.registry
        ProcessCollector(registry=r)
        Info("lstm_build", "Versions of the server, Python and onnxruntime", registry=r).info(build_versions())
        self.tokens_generated = Counter(
            "lstm_tokens_generated", f"Characters generated and handed to streams ({TURN_RPCS})", ["model"], registry=r
        )
        self.prompt_characters = Counter(
            "lstm_prompt_characters",
            "Characters read as input: prompts of turns (Generate, Chat, ModelInfer, ModelStreamInfer) and of new "
            "sessions (CreateSession), Step inputs, classified texts (Classify, ModelInfer, ModelStreamInfer); "
            "not the cached prefixes the prefix cache saved reading",
            ["model"],
            registry=r,
        )
        fresh = "reads of a text into a fresh state (CreateSession, a new session's first turn, Step without a state)"
        self.prefix_cache_lookups = Counter(
            "lstm_prefix_cache_lookups", f"Prefix cache lookups: {fresh}", ["model"], registry=r
        )
        self.prefix_cache_hits = Counter(
            "lstm_prefix_cache_hits", "Prefix cache lookups that found a cached prefix", ["model"], registry=r
        )
        self.prefix_cache_saved = Counter(
            "lstm_prefix_cache_saved_characters",
            "Characters not read thanks to the prefix cache (the cached prefixes found; not in lstm_prompt_characters)",
            ["model"],
            registry=r,
        )
        self.prefix_cache_bytes = Gauge(
            "lstm_prefix_cache_bytes", "Bytes the prefix cache holds (states, nodes and text)", ["model"], registry=r
        )
        self.prefix_cache_entries = Gauge(
            "lstm_prefix_cache_entries", "Checkpoints (cached states) the prefix cache holds", ["model"], registry=r
        )
        self.prefix_cache_evictions = Counter(
            "lstm_prefix_cache_evictions",
            "Checkpoints evicted from the prefix cache to stay within --prefix-cache-bytes",
            ["model"],
            registry=r,
        )
        self.prefix_cache_store = Counter(
            "lstm_prefix_cache_store_events",
            "The prefix cache's second level in Redis (--prefix-cache-store-ttl-s): lookups that found a state "
            "(hit) or none (miss), states written, lookups or writes Redis did not answer (failed)",
            ["model", "event"],
            registry=r,
        )
        self.active_sessions = Gauge(
            "lstm_active_sessions", "Sessions held in this process's memory", ["model"], registry=r
        )
        self.queue_depth = Gauge(
            "lstm_queue_depth",
            "Waiting for the model: turns not yet taken by the prefill thread (generation), texts not yet taken "
            "into a batch (classification)",
            ["model"],
            registry=r,
        )
        self.batch_size = Histogram(
            "lstm_batch_size", "Rows per decode or classifier call", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.current_batch = Gauge(
            "lstm_current_batch_size",
            "Rows in a language model's decode call now (0 while none runs)",
            ["model"],
            registry=r,
        )
        self.model_call = Histogram(
            "lstm_model_call_seconds",
            "Duration of one model call: prefill (prompts read together), decode (one batched call of K characters "
            "per row), step (a Step call), classify (one classifier call)",
            ["model", "kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "lstm_queue_wait_seconds",
            f"A turn's submission to the prefill thread taking it ({TURN_RPCS}); a text's arrival to its batch "
            "being formed (Classify, ModelInfer and ModelStreamInfer on a classifier)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "lstm_time_to_first_token_seconds",
            f"{TURN_RPCS}: from the turn's submission to its first text handed to the stream",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "lstm_inter_token_latency_seconds",
            f"{TURN_RPCS}: time between two consecutive pieces of text handed to a stream (each may hold several "
            "characters)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_length = Histogram(
            "lstm_prompt_length_characters",
            f"Characters of a turn's prompt ({TURN_RPCS})",
            ["model"],
            buckets=LENGTH_BUCKETS,
            registry=r,
        )
        self.generated_length = Histogram(
            "lstm_generated_length_characters",
            f"Characters a turn generated ({TURN_RPCS})",
            ["model"],
            buckets=LENGTH_BUCKETS,
            registry=r,
        )
        self.finish_reasons = Counter(
            "lstm_finish_reasons",
            f"Turns by how they ended ({TURN_RPCS}): length (max_tokens), stop (a stop string), cancelled (the "
            "caller left first), error",
            ["model", "reason"],
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
        self.requests = Counter(
            "lstm_requests",
            f"Calls by method, status code, model and version, of {REQUEST_RPCS}; ModelStreamInfer counts each "
            "request of a stream",
            ["method", "code", "model", "version"],
            registry=r,
        )
        self.request_duration = Histogram(
            "lstm_request_duration_seconds",
            f"Duration of the calls of {REQUEST_RPCS}, from the call's start to its status (a stream's whole life; "
            "ModelStreamInfer: a request's arrival to its last response)",
            ["method", "code", "model", "version"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "lstm_errors",
            f"Calls (and ModelStreamInfer requests) that ended in an error other than CANCELLED, of {REQUEST_RPCS}, "
            "by method, status code and reason (ErrorInfo's reason; the code's name for errors gRPC made)",
            ["method", "code", "reason"],
            registry=r,
        )

    def serve_models(self, versions: Mapping[str, str]) -> None:
        """The served models and their versions: the only values of the ``model`` and ``version`` labels of
        requests (besides "")."""
        self.versions = dict(versions)

    def model_labels(self, name: str) -> tuple[str, str]:
        """The ``model`` and ``version`` labels of a call naming ``name``: ("", "") unless it is served, so that
        callers cannot add series."""
        version = self.versions.get(name)
        return ("", "") if version is None else (name, version)

    def count_request(self, method: str, code: str, model: str, seconds: float, reason: str = "") -> None:
        """One call (or streamed request) of ``method`` that ended with ``code`` after ``seconds``; ``model``: the
        model it names ("" for none); ``reason``: its error's."""
        labels = (method, code, *self.model_labels(model))
        self.requests.labels(*labels).inc()
        self.request_duration.labels(*labels).observe(seconds)
        if code not in ("OK", "CANCELLED"):
            self.errors.labels(method, code, reason or code).inc()

    def count_turn(self, model: str, prompt: int, generated: int, reason: str) -> None:
        """A settled turn: its prompt's and generated characters, and how it ended."""
        self.prompt_length.labels(model).observe(prompt)
        self.generated_length.labels(model).observe(generated)
        self.finish_reasons.labels(model, reason).inc()

    def serve_http(self, port: int, host: str = "127.0.0.1") -> WSGIServer:
        """Serve ``/metrics`` over HTTP in a daemon thread (404 on any other path); returns the HTTP server (call
        ``shutdown()`` and ``server_close()`` to stop it)."""
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
        server = make_server(host, port, metrics_only(make_wsgi_app(self.registry)), server_class, _Quiet)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server
