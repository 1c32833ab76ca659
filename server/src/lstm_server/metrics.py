"""Prometheus metrics of one server, in their own registry (several servers can share a process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tokens_generated = Counter("lstm_tokens_generated", "Characters generated", ["model"], registry=r)
        self.active_sessions = Gauge("lstm_active_sessions", "Sessions held", ["model"], registry=r)
        self.batch_size = Histogram(
            "lstm_batch_size", "Rows per model call", ["model"], buckets=BATCH_BUCKETS, registry=r
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
            "Generate: request to first character",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "lstm_inter_token_latency_seconds",
            "Time between consecutive batch steps (each active session gets one character per step)",
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

    def serve_http(self, port: int, host: str = "127.0.0.1"):
        """Start the /metrics HTTP endpoint; returns the HTTP server (call ``shutdown()`` to stop it)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
