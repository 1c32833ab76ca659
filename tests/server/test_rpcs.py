"""Each RPC's happy path, health and reflection through grpc's own clients, metrics, and the replica header."""

from __future__ import annotations

import time
import urllib.request

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from lstm.v1 import lstm_pb2 as pb

from lstm_client import Client, InvalidArgument

from ..serving import array_of

PROMPT = "KING:\nthe "


def test_models_are_listed_and_described(stubs, exported) -> None:
    models = {m.name: m for m in stubs.models.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == {"charlm", "sentiment"}
    charlm = stubs.models.DescribeModel(pb.DescribeModelRequest(model="charlm"))
    assert charlm.task == "generation" and charlm.backend == "onnxruntime" and charlm.device == "cpu"
    assert charlm.num_layers == 2 and charlm.hidden_size == 12 and len(charlm.vocabulary) > 10
    assert charlm.quality.startswith("val_loss ")
    assert models["sentiment"].labels == ["negative", "positive"] and models["sentiment"].num_directions == 2


def test_session_lifecycle_rpcs(stubs) -> None:
    created = stubs.sessions.CreateSession(
        pb.CreateSessionRequest(model="charlm", prompt=PROMPT, defaults=pb.SamplingParams(temperature=0.5, seed=3))
    )
    assert len(created.session_id) == 32 and int(created.session_id, 16) >= 0
    assert created.tokens_seen == len(PROMPT) and created.defaults.temperature == 0.5 and not created.busy
    listed = {
        s.session_id
        for s in stubs.sessions.ListSessions(pb.ListSessionsRequest(model="charlm", page_size=1000)).sessions
    }
    assert created.session_id in listed
    fork = stubs.sessions.ForkSession(pb.ForkSessionRequest(session_id=created.session_id))
    assert fork.tokens_seen == created.tokens_seen and fork.defaults.seed == 3
    stubs.sessions.CloseSession(pb.CloseSessionRequest(session_id=fork.session_id))
    listed = {s.session_id for s in stubs.sessions.ListSessions(pb.ListSessionsRequest(page_size=1000)).sessions}
    assert fork.session_id not in listed and created.session_id in listed


def test_a_seed_is_chosen_and_reported_when_none_is_given(stubs) -> None:
    created = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt=PROMPT))
    assert created.defaults.HasField("seed")


def test_chat_keeps_the_session_across_turns(stubs, reference) -> None:
    def requests():
        yield pb.ChatRequest(
            create=pb.CreateSessionRequest(
                model="charlm", prompt=PROMPT, defaults=pb.SamplingParams(seed=8, max_tokens=15)
            ),
            keep_session=True,
        )
        yield pb.ChatRequest(text="the ")
        yield pb.ChatRequest(text="good ", sampling=pb.SamplingParams(max_tokens=5))

    responses = list(stubs.generation.Chat(requests()))
    assert responses[0].end_of_turn and responses[0].tokens_seen == len(PROMPT)
    turns, current = [], ""
    for response in responses[1:]:
        current += response.text
        if response.end_of_turn:
            turns.append(current)
            current = ""
    assert [len(t) for t in turns] == [15, 5]
    session_id = responses[0].session_id
    assert stubs.sessions.GetSession(pb.GetSessionRequest(session_id=session_id)).tokens_seen == (
        len(PROMPT) + 4 + 15 + 5 + 5
    )
    expected, _, _ = reference.generate(PROMPT + "the ", 15, seed=8)
    assert turns[0] == expected


def test_a_later_chat_message_without_text_continues_the_session(stubs, reference) -> None:
    """Only the first message may come without a turn; every later one is a turn, and an empty text continues the
    session where it stands (as Generate with an empty prompt does)."""

    def requests():
        yield pb.ChatRequest(
            create=pb.CreateSessionRequest(model="charlm", prompt=PROMPT, defaults=pb.SamplingParams(seed=8))
        )
        yield pb.ChatRequest(sampling=pb.SamplingParams(max_tokens=7))

    responses = list(stubs.generation.Chat(requests()))
    text = "".join(r.text for r in responses[1:])
    assert responses[0].end_of_turn and not responses[0].text  # the first message: no turn
    assert responses[-1].end_of_turn and responses[-1].tokens_seen == len(PROMPT) + 7
    assert text == reference.generate(PROMPT, 7, seed=8)[0]


def test_a_session_a_chat_stream_opened_closes_with_the_stream_unless_kept(stubs) -> None:
    create = pb.CreateSessionRequest(model="charlm", prompt=PROMPT, defaults=pb.SamplingParams(max_tokens=3))
    finished = list(stubs.generation.Chat(iter([pb.ChatRequest(create=create), pb.ChatRequest(text="the ")])))
    cancelled = stubs.generation.Chat(iter([pb.ChatRequest(create=create, text="the ")]))
    cancelled_id = next(cancelled).session_id
    cancelled.cancel()  # the client goes away mid-turn
    named = stubs.sessions.CreateSession(create).session_id
    list(stubs.generation.Chat(iter([pb.ChatRequest(session_id=named, text="the ")])))
    for session_id in (finished[0].session_id, cancelled_id):
        with pytest.raises(grpc.RpcError) as gone:
            for _ in range(50):  # the cancelled stream's close lands once the server sees the cancellation
                stubs.sessions.GetSession(pb.GetSessionRequest(session_id=session_id))
                time.sleep(0.02)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert stubs.sessions.GetSession(pb.GetSessionRequest(session_id=named)).tokens_seen == len(PROMPT) + 4 + 3


def test_step_equals_the_in_process_model_and_chains(stubs, reference) -> None:
    first = stubs.generation.Step(pb.StepRequest(model="charlm", text="KING:\nthe"))
    second = stubs.generation.Step(pb.StepRequest(model="charlm", text=" good", h=first.h, c=first.c))
    logits, h, _ = reference.feed("KING:\nthe good")
    probabilities = np.exp(logits - logits.max())
    np.testing.assert_allclose(second.probabilities, probabilities / probabilities.sum(), atol=1e-5)
    np.testing.assert_allclose(array_of(second.h).ravel(), h.ravel(), atol=1e-5)
    assert list(second.h.shape) == [2, 1, 12]
    by_ids = stubs.generation.Step(
        pb.StepRequest(model="charlm", tokens=pb.TokenList(ids=[reference.index[ch] for ch in "KING:\nthe"]))
    )
    np.testing.assert_allclose(by_ids.probabilities, first.probabilities, atol=1e-6)


def test_classify_returns_labels_and_probabilities(stubs) -> None:
    response = stubs.classification.Classify(pb.ClassifyRequest(model="sentiment", texts=["a gorgeous film", "dull"]))
    assert len(response.results) == 2
    for result in response.results:
        assert set(result.probabilities) == {"negative", "positive"}
        assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert result.label == max(result.probabilities, key=result.probabilities.get)


def test_health_and_reflection_through_grpc_clients(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lstm.v1.Generation", "lstm.v1.Classification"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            "lstm.v1.Sessions",
            "lstm.v1.Generation",
            "lstm.v1.Classification",
            "lstm.v1.Models",
            "grpc.health.v1.Health",
        } <= services
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("lstm.v1.Generation").methods_by_name["Generate"]
        assert method.output_type.full_name == "lstm.v1.GenerateResponse"


def test_every_response_names_its_replica(server) -> None:
    with Client(server.address) as client:
        client.classify(["fine"])
        assert client.last_replica == "test-replica"
        with client.session(model="charlm", prompt=PROMPT) as session:
            list(session.generate(max_tokens=3))
            assert session.last_replica == "test-replica"


def test_prometheus_metrics_over_http(start_server) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = start_server(metrics_port=port)
    with Client(running.address) as client:
        with client.session(model="charlm", prompt=PROMPT) as session:
            list(session.generate(max_tokens=7))
        with pytest.raises(InvalidArgument):
            client.classify([])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'lstm_tokens_generated_total{model="charlm"} 7.0' in text
    assert 'lstm_requests_total{code="INVALID_ARGUMENT",method="Classify",model="sentiment",version="1"} 1.0' in text
    for name in (
        "lstm_batch_size_bucket",
        "lstm_time_to_first_token_seconds_bucket",
        "lstm_queue_wait_seconds",
        "lstm_inter_token_latency_seconds",
        "lstm_active_sessions",
    ):
        assert name in text, name
