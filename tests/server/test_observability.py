"""Request ids, log fields, trace spans and metrics, through real calls on an in-process server."""

from __future__ import annotations

import importlib.metadata
import io
import itertools
import json
import logging
import os
import platform
import re
from pathlib import Path

import grpc
import onnxruntime
import pytest
from lstm.v1 import lstm_pb2 as pb
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from lstm_server import tracing
from lstm_server.app import engine_for
from lstm_server.config import ServerConfig
from lstm_server.logs import JsonFormatter
from lstm_server.metrics import Metrics
from lstm_server.runtime.backends import load_backend
from lstm_server.runtime.model_repository import load_entry
from lstm_server.runtime.registry import LoadedModel

PROMPT = "KING:\nthe "
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
CHARLM = {"model": "charlm", "version": "1"}  # the labels of a call naming a served model
NO_MODEL = {"model": "", "version": ""}


def sent(request_id: str) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id),)


def header(metadata, key: str) -> str | None:
    return dict(metadata or ()).get(key)


@pytest.fixture
def log_lines():
    """The server's log lines as the JSON formatter writes them, decoded (debug lines too)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("test-replica"))
    logger = logging.getLogger("lstm_server")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def spans():
    """Every span the server records while the test runs, exported at once."""
    exporter = InMemorySpanExporter()
    tracing.setup_tracing(ServerConfig(), exporter)
    yield exporter
    tracing.setup_tracing(ServerConfig())  # off again


def test_a_request_id_is_echoed_and_one_is_made_when_absent_or_unusable(stubs) -> None:
    _, call = stubs.models.ListModels.with_call(pb.ListModelsRequest(), metadata=sent("client-id-1"))
    assert header(call.initial_metadata(), "x-request-id") == "client-id-1"
    for unusable in ("", "has space", "x" * 129):
        _, call = stubs.models.ListModels.with_call(pb.ListModelsRequest(), metadata=sent(unusable))
        assert re.fullmatch("[0-9a-f]{32}", header(call.initial_metadata(), "x-request-id"))
    _, call = stubs.models.ListModels.with_call(pb.ListModelsRequest())
    made = header(call.initial_metadata(), "x-request-id")
    assert re.fullmatch("[0-9a-f]{32}", made)
    _, again = stubs.models.ListModels.with_call(pb.ListModelsRequest())
    assert header(again.initial_metadata(), "x-request-id") != made
    # a failing call and a stream echo it too, an error in its trailers as well
    with pytest.raises(grpc.RpcError) as failed:
        stubs.sessions.GetSession(pb.GetSessionRequest(session_id="f00"), metadata=sent("client-id-2"))
    assert header(failed.value.initial_metadata(), "x-request-id") == "client-id-2"
    assert header(failed.value.trailing_metadata(), "x-request-id") == "client-id-2"
    session_id = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt=PROMPT)).session_id
    stream = stubs.generation.Generate(pb.GenerateRequest(session_id=session_id), metadata=sent("client-id-3"))
    assert header(stream.initial_metadata(), "x-request-id") == "client-id-3"
    assert list(stream)


def test_log_lines_carry_the_request_id_tenant_session_and_model(stubs, log_lines) -> None:
    with pytest.raises(grpc.RpcError):
        stubs.sessions.GetSession(pb.GetSessionRequest(session_id="f00"), metadata=sent("failing-call"))
    session_id = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt=PROMPT)).session_id
    with pytest.raises(grpc.RpcError):
        list(
            stubs.generation.Generate(
                pb.GenerateRequest(session_id=session_id, sampling=pb.SamplingParams(top_p=7)),
                metadata=sent("failing-turn"),
            )
        )
    stubs.models.ListModels(pb.ListModelsRequest(), metadata=sent("next-call"))
    by_id = {line.get("request_id"): line for line in log_lines() if line["message"] == "rpc"}
    assert "session" not in by_id["next-call"] and "model" not in by_id["next-call"]  # each call has its own
    assert by_id["next-call"]["level"] == "debug" and "trace_id" not in by_id["next-call"]  # tracing is off
    failed = by_id["failing-call"]
    assert (failed["method"], failed["code"], failed["tenant"], failed["session"]) == (
        "GetSession",
        "NOT_FOUND",
        "anonymous",
        "f00",
    )
    assert "no session 'f00'" in failed["error"] and failed["level"] == "warning"
    turn = by_id["failing-turn"]
    assert (turn["method"], turn["code"], turn["session"], turn["model"]) == (
        "Generate",
        "INVALID_ARGUMENT",
        session_id,
        "charlm",
    )


def test_the_rpc_line_of_a_call_that_succeeds_is_debug_and_of_an_error_warning(stubs, caplog) -> None:
    """At the default level (INFO) a call that succeeds writes no line; an error always does."""
    caplog.set_level(logging.INFO, logger="lstm_server")
    stubs.models.ListModels(pb.ListModelsRequest())
    session_id = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt=PROMPT)).session_id
    assert list(stubs.generation.Generate(pb.GenerateRequest(session_id=session_id)))
    with pytest.raises(grpc.RpcError):
        stubs.sessions.GetSession(pb.GetSessionRequest(session_id="f00"))
    lines = [(r.method, r.code, r.levelname) for r in caplog.records if r.getMessage() == "rpc"]
    assert lines == [("GetSession", "NOT_FOUND", "WARNING")]


def test_log_lines_carry_the_trace_and_span_ids(stubs, spans, log_lines) -> None:
    traceparent = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"), *sent("traced-call"))
    with pytest.raises(grpc.RpcError):
        stubs.sessions.GetSession(pb.GetSessionRequest(session_id="f00"), metadata=traceparent)
    stubs.models.ListModels(pb.ListModelsRequest(), metadata=sent("own-trace"))
    by_id = {line.get("request_id"): line for line in log_lines() if line["message"] == "rpc"}
    servers = {s.attributes["lstm.request_id"]: s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER}
    traced, own = by_id["traced-call"], by_id["own-trace"]
    assert (traced["trace_id"], traced["span_id"]) == (TRACE_ID, f"{servers['traced-call'].context.span_id:016x}")
    assert own["trace_id"] == f"{servers['own-trace'].context.trace_id:032x}" != TRACE_ID  # a trace of its own
    assert own["span_id"] == f"{servers['own-trace'].context.span_id:016x}"


def test_a_call_continues_the_callers_trace_with_spans_for_its_stages(stubs, spans) -> None:
    traceparent = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),)
    session_id = stubs.sessions.CreateSession(
        pb.CreateSessionRequest(model="charlm", prompt=PROMPT), metadata=traceparent
    ).session_id
    request = pb.GenerateRequest(session_id=session_id, prompt="the ", sampling=pb.SamplingParams(max_tokens=9))
    text = "".join(r.text for r in stubs.generation.Generate(request, metadata=traceparent))
    recorded = spans.get_finished_spans()
    assert {f"{s.context.trace_id:032x}" for s in recorded} == {TRACE_ID}
    servers = {s.name: s for s in recorded if s.kind == SpanKind.SERVER}
    assert set(servers) == {"lstm.v1.Sessions/CreateSession", "lstm.v1.Generation/Generate"}
    for server in servers.values():
        assert f"{server.parent.span_id:016x}" == PARENT_SPAN_ID
        assert server.attributes["rpc.grpc.status_code"] == 0
    children = {}
    for span in recorded:
        if span.kind != SpanKind.SERVER:
            children.setdefault(span.parent.span_id, []).append(span)
    created = {s.name: s for s in children[servers["lstm.v1.Sessions/CreateSession"].context.span_id]}
    assert set(created) == {"lstm.prefill", "lstm.store.save"}
    assert created["lstm.prefill"].attributes["lstm.characters"] == len(PROMPT)
    turn = {s.name: s for s in children[servers["lstm.v1.Generation/Generate"].context.span_id]}
    assert set(turn) == {"lstm.store.revision", "lstm.queue", "lstm.prefill", "lstm.decode", "lstm.store.save"}
    assert turn["lstm.prefill"].attributes["lstm.characters"] == len("the ")
    decode = turn["lstm.decode"].attributes
    assert decode["lstm.characters"] == len(text) == 9  # the turn's, the first (drawn with the prefill) included
    assert decode["lstm.model_calls"] >= 1 and decode["lstm.finish_reason"] == "length"
    stages = [turn[name] for name in ("lstm.queue", "lstm.prefill", "lstm.decode", "lstm.store.save")]
    assert all(a.end_time <= b.start_time for a, b in itertools.pairwise(stages))


def test_without_tracing_nothing_is_recorded(stubs) -> None:
    assert not tracing.enabled()
    with tracing.span("lstm.anything") as span:
        assert span is None
    assert stubs.models.ListModels(pb.ListModelsRequest()).models


@pytest.mark.skipif(platform.system() != "Linux", reason="thread names for the OS: Linux only")
def test_the_model_threads_are_named_for_the_operating_system(stubs) -> None:
    """``top -H`` and ``/proc`` show which thread is which model's (the server runs in this process here)."""
    session_id = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt=PROMPT)).session_id
    assert list(stubs.generation.Generate(pb.GenerateRequest(session_id=session_id)))
    stubs.classification.Classify(pb.ClassifyRequest(model="sentiment", texts=["a fine film"]))
    nice = {  # the 19th field of /proc/<pid>/task/<tid>/stat, counted after the parenthesised name
        task.joinpath("comm").read_text().strip(): int(task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[16])
        for task in Path("/proc/self/task").iterdir()
    }
    assert {"model-charlm", "model-charlm-in", "model-sentiment"} <= nice.keys()
    # one intra-op thread here (--threads 1): the decode thread yields the core to the others, 10 nicer than the
    # process (which may itself run niced)
    base = os.nice(0)
    assert (nice["model-charlm"], nice["model-charlm-in"], nice["model-sentiment"]) == (min(19, base + 10), base, base)


def test_the_decode_thread_is_niced_only_on_one_intra_op_thread(exported) -> None:
    """With more intra-op threads onnxruntime's own workers run at the usual priority: no niceness then."""
    entry = load_entry(exported / "charlm" / "1")
    for threads, nice in ((1, 10), (2, 0)):
        config = ServerConfig(models=str(exported), threads=threads)
        backend = load_backend(entry, "onnxruntime", "cpu", threads)
        engine = engine_for(LoadedModel(entry, backend), config, Metrics())
        assert engine.config.decode_nice == nice


def test_metrics_of_real_calls(server, stubs) -> None:
    metrics = server.server.metrics

    def value(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    names = [
        ("lstm_request_duration_seconds_count", {"method": "CreateSession", "code": "OK", **CHARLM}),
        ("lstm_request_duration_seconds_count", {"method": "GetSession", "code": "NOT_FOUND", **NO_MODEL}),
        ("lstm_model_call_seconds_count", {"model": "charlm", "kind": "prefill"}),
        ("lstm_model_call_seconds_count", {"model": "charlm", "kind": "step"}),
        ("lstm_model_call_seconds_count", {"model": "charlm", "kind": "decode"}),
        ("lstm_model_call_seconds_count", {"model": "sentiment", "kind": "classify"}),
        ("lstm_prompt_characters_total", {"model": "charlm"}),
        ("lstm_prompt_characters_total", {"model": "sentiment"}),
        ("lstm_tokens_generated_total", {"model": "charlm"}),
        ("lstm_time_to_first_token_seconds_count", {"model": "charlm"}),
        ("lstm_inter_token_latency_seconds_count", {"model": "charlm"}),
    ]
    stubs.models.ClearPrefixCache(pb.ClearPrefixCacheRequest(model="charlm"))  # every prompt below is read
    before = [value(name, **labels) for name, labels in names]
    session_id = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt=PROMPT)).session_id
    with pytest.raises(grpc.RpcError):
        stubs.sessions.GetSession(pb.GetSessionRequest(session_id="f00"))
    stubs.generation.Step(pb.StepRequest(model="charlm", text="the"))
    engine = server.server.models.get("charlm").engine
    with engine.paused() as wait_for_queued:
        stream = stubs.generation.Generate(
            pb.GenerateRequest(session_id=session_id, prompt="the ", sampling=pb.SamplingParams(max_tokens=300))
        )
        assert wait_for_queued(1)
        assert value("lstm_queue_depth", model="charlm") == 1  # the turn waits for the model thread
    responses = list(stream)
    stubs.classification.Classify(pb.ClassifyRequest(model="sentiment", texts=["good", "not bad"]))
    after = [value(name, **labels) for name, labels in names]
    change = {
        f"{name}{sorted(labels.values())}": a - b for (name, labels), a, b in zip(names, after, before, strict=True)
    }
    assert change.pop("lstm_model_call_seconds_count['charlm', 'decode']") >= 1
    pieces = [r.text for r in responses if r.text]
    assert change == {
        "lstm_request_duration_seconds_count['1', 'CreateSession', 'OK', 'charlm']": 1,
        "lstm_request_duration_seconds_count['', '', 'GetSession', 'NOT_FOUND']": 1,
        "lstm_model_call_seconds_count['charlm', 'prefill']": 2,  # the session's prompt, the turn's
        "lstm_model_call_seconds_count['charlm', 'step']": 1,
        "lstm_model_call_seconds_count['classify', 'sentiment']": 1,
        "lstm_prompt_characters_total['charlm']": len(PROMPT) + len("the") + len("the "),
        "lstm_prompt_characters_total['sentiment']": len("good") + len("not bad"),
        "lstm_tokens_generated_total['charlm']": 300,
        "lstm_time_to_first_token_seconds_count['charlm']": 1,
        "lstm_inter_token_latency_seconds_count['charlm']": len(pieces) - 1,
    }
    assert value("lstm_queue_depth", model="charlm") == value("lstm_queue_depth", model="sentiment") == 0
    assert value("process_cpu_seconds_total") > 0 and value("process_resident_memory_bytes") > 0
    versions = {
        "version": importlib.metadata.version("lstm-server"),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }
    assert value("lstm_build_info", **versions) == 1
