"""The metrics port over real HTTP: only /metrics answers (also while the server drains); the series and labels a
dashboard needs after real calls; every metric the Grafana dashboard (deploy/grafana) queries is one the server
exports."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import cluster
import grpc
import pytest
from lstm.v1 import lstm_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2_grpc as ip_grpc

from ..serving import ServerThread, Stubs
from .test_open_inference import raw_request

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "lstm-serving.json"
TURN_RPCS = ("Generate", "Chat", "ModelInfer", "ModelStreamInfer")
# PromQL words that are not metric names: keywords, and what follows `by`/`without` and `[`
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def get(port: int, path: str) -> tuple[int, str]:
    """The status and body of a GET of ``path`` on the metrics port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """The scraped samples by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture(scope="module")
def running(exported):
    started = ServerThread(exported, metrics_port=cluster.free_port())
    yield started
    started.stop()


def test_only_metrics_is_served_also_while_draining(exported) -> None:
    """A probe copied from a Triton setup (/v2/health/ready) must fail, not pass on any 200."""
    port = cluster.free_port()
    running = ServerThread(exported, metrics_port=port, drain_delay_s=2)
    status, text = get(port, "/metrics")
    assert status == 200 and "lstm_build_info" in text
    assert get(port, "/metrics?name[]=lstm_build_info")[0] == 200
    for path in ("/", "/v2/health/ready", "/v2/health/live", "/healthz", "/metrics/", "/favicon.ico"):
        status, text = get(port, path)
        assert (status, text) == (404, "Not Found: this port serves Prometheus metrics at /metrics only\n"), path
    stopping = asyncio.run_coroutine_threadsafe(running.server.stop(0), running.loop)
    try:
        deadline = time.monotonic() + 5
        while running.server.serving and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not running.server.serving and not stopping.done()  # draining
        assert get(port, "/v2/health/ready")[0] == 404
        assert get(port, "/metrics")[0] == 200
        stopping.result(30)
    finally:
        running.loop.call_soon_threadsafe(running.loop.stop)
    with pytest.raises(urllib.error.URLError):  # the port is closed with the server
        get(port, "/metrics")


class GaugeAtDecode:
    """A decoder wrapper reading a gauge at each decode call (on the decode thread)."""

    def __init__(self, inner, read) -> None:
        self.inner, self.name, self.sample, self.inputs = inner, inner.name, inner.sample, inner.inputs
        self.read, self.seen = read, []

    def decode(self, inputs):
        self.seen.append(self.read())
        return self.inner.decode(inputs)


def test_series_and_labels_after_real_calls(running) -> None:
    port = running.config.metrics_port
    before = samples(get(port, "/metrics")[1])
    stubs = Stubs(running.address)
    registry = running.server.metrics.registry
    engine = running.server.models.get("charlm").engine
    decoder = engine.wrap_decoder(
        lambda inner: GaugeAtDecode(
            inner, lambda: registry.get_sample_value("lstm_current_batch_size", {"model": "charlm"})
        )
    )
    try:
        session_id = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt="KING:\n")).session_id
        sampling = pb.SamplingParams(temperature=0, max_tokens=20)
        assert list(
            stubs.generation.Generate(pb.GenerateRequest(session_id=session_id, prompt="the ", sampling=sampling))
        )
    finally:
        engine.wrap_decoder(lambda wrapper: wrapper.inner)
    assert decoder.seen and set(decoder.seen) == {1.0}  # one row in each decode call, while it ran
    with pytest.raises(grpc.RpcError):
        stubs.sessions.GetSession(pb.GetSessionRequest(session_id="f00"))
    with pytest.raises(grpc.RpcError):  # a name no model has: no series of its own
        stubs.sessions.CreateSession(pb.CreateSessionRequest(model="nonesuch-1234"))
    stubs.classification.Classify(pb.ClassifyRequest(model="sentiment", texts=["good"]))
    requests = [raw_request(temperature=("double_param", 0.0), max_tokens=("int64_param", 12)) for _ in range(2)]
    inference = ip_grpc.GRPCInferenceServiceStub(stubs.channel)
    streamed = [raw_request(model="nonesuch"), *requests, raw_request(datatype="FP32")]
    assert len([r for r in inference.ModelStreamInfer(iter(streamed), timeout=30) if r.error_message]) == 2
    stubs.channel.close()
    status, text = get(port, "/metrics")
    assert status == 200
    after = samples(text)

    def change(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    calls = "lstm_requests_total"
    assert change(calls, method="CreateSession", code="OK", model="charlm", version="1") == 1
    assert change(calls, method="CreateSession", code="NOT_FOUND", model="", version="") == 1
    assert change(calls, method="Generate", code="OK", model="charlm", version="1") == 1  # named by its session
    assert change(calls, method="GetSession", code="NOT_FOUND", model="", version="") == 1
    assert change(calls, method="Classify", code="OK", model="sentiment", version="1") == 1
    assert change("lstm_request_duration_seconds_count", method="Classify", code="OK", model="sentiment", version="1")
    # ModelStreamInfer: each request of the stream, not the stream
    assert change(calls, method="ModelStreamInfer", code="OK", model="charlm", version="1") == 2
    assert change(calls, method="ModelStreamInfer", code="NOT_FOUND", model="", version="") == 1
    assert change(calls, method="ModelStreamInfer", code="INVALID_ARGUMENT", model="charlm", version="1") == 1
    errors = "lstm_errors_total"
    assert change(errors, method="GetSession", code="NOT_FOUND", reason="SESSION_NOT_FOUND") == 1
    assert change(errors, method="CreateSession", code="NOT_FOUND", reason="MODEL_NOT_FOUND") == 1
    assert change(errors, method="ModelStreamInfer", code="NOT_FOUND", reason="MODEL_NOT_FOUND") == 1
    assert change(errors, method="ModelStreamInfer", code="INVALID_ARGUMENT", reason="INVALID_INPUT") == 1
    assert {dict(labels).get("model") for _, labels in after} <= {None, "", "charlm", "sentiment"}
    # three turns: Generate's and the stream's two
    assert change("lstm_prompt_length_characters_count", model="charlm") == 3
    assert change("lstm_prompt_length_characters_sum", model="charlm") == len("the ") + 2 * len("hi")
    assert change("lstm_generated_length_characters_sum", model="charlm") == 20 + 2 * 12
    assert change("lstm_generated_length_characters_bucket", model="charlm", le="16.0") == 2
    assert change("lstm_finish_reasons_total", model="charlm", reason="length") == 3
    # no decode call now: the decode thread sets it once it finds nothing to run, just after the last turn's end
    # let its final message go (a moment later on a loaded machine)
    deadline = time.monotonic() + 5
    while registry.get_sample_value("lstm_current_batch_size", {"model": "charlm"}) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert samples(get(port, "/metrics")[1])[("lstm_current_batch_size", frozenset({("model", "charlm")}))] == 0
    helps = {family.name: family.documentation for family in text_string_to_metric_families(text)}
    for name in (
        "lstm_time_to_first_token_seconds",
        "lstm_inter_token_latency_seconds",
        "lstm_prompt_length_characters",
        "lstm_generated_length_characters",
        "lstm_finish_reasons",
        "lstm_tokens_generated",
    ):
        assert all(rpc in helps[name] for rpc in TURN_RPCS), name
    for name in ("lstm_requests", "lstm_request_duration_seconds", "lstm_errors"):
        services = ("Sessions", "Generation", "Classification", "Models", "inference.GRPCInferenceService")
        assert all(service in helps[name] for service in services), name


def exported_names(text: str) -> set[str]:
    """Every series name a scrape offers: each family's samples' names, a histogram's even before it has any."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",)}
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords, label names
    (in braces, after by/without) or durations (in brackets)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings first: they may hold anything
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr)
    return {name for name in names if name not in PROMQL_WORDS and not re.fullmatch(r"(?i)inf|nan", name)}


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: its panels' targets, and the metrics its variables query."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ()) if target.get("expr")
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(re.fullmatch(r"label_values\((\w+), *\w+\)", variable["definition"])[1])
    return queries


def test_the_metric_name_parser() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(lstm_a_bucket{model=~"$model", x="a{b}"}[5m])))'
        " / on (model) group_left sum without (kind) (lstm_b) * 2^30 > bool 1e3"
    )
    assert metric_names(expr) == {"lstm_a_bucket", "lstm_b"}


def test_every_metric_the_dashboard_queries_is_exported(running) -> None:
    exported = exported_names(get(running.config.metrics_port, "/metrics")[1])
    queries = dashboard_queries()
    used = set().union(*(metric_names(query) for query in queries))
    assert len(queries) >= 20 and len(used) >= 15
    assert used - exported == set()
    # the panels an operator expects
    needed = [
        "lstm_time_to_first_token_seconds_bucket",
        "lstm_inter_token_latency_seconds_bucket",
        "lstm_queue_depth",
        "lstm_current_batch_size",
        "lstm_active_sessions",
        "lstm_errors_total",
        "lstm_session_store_events_total",
        "lstm_tokens_generated_total",
    ]
    assert set(needed) <= used
