"""The Open Inference Protocol (inference.GRPCInferenceService), driven by tritonclient's own client against the
in-process server: readiness and metadata, both models, sequences over streams and unary calls, errors, tenants.
Greedy text and labels must equal lstm.v1's for the same input, bitwise."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import struct
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from lstm.v1 import lstm_pb2 as pb
from tritonclient.grpc import service_pb2 as ip
from tritonclient.grpc import service_pb2_grpc as ip_grpc
from tritonclient.utils import InferenceServerException

from lstm_server.api.open_inference import Outbox
from lstm_server.api.open_inference_models import model_config
from lstm_server.api.sequences import Place, SequenceQueue, sequence_session_id
from lstm_server.config import ANONYMOUS

from ..serving import Stubs
from .test_errors import bad_request, details_of, lstm_error
from .test_session_store import store_settings

PROMPTS = ["KING:\nthe ", "and ", "good "]
TEXTS = ["a gorgeous film", "dull and lifeless", "meh", "the plot is thin but the actors shine"]
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}
INF = math.inf
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture
def client(server):
    made = tc.InferenceServerClient(server.address)
    yield made
    made.close()


@pytest.fixture
def raw(server):
    with grpc.insecure_channel(server.address) as channel:
        yield ip_grpc.GRPCInferenceServiceStub(channel)


def text_input(*texts: str, name: str = "TEXT") -> tc.InferInput:
    tensor = tc.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    return tensor


def texts_of(result: tc.InferResult, name: str) -> list[str]:
    return [value.decode() for value in result.as_numpy(name).tolist()]


def final(result: tc.InferResult) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


class Stream:
    """A tritonclient stream whose responses and errors are collected in order."""

    def __init__(self, client: tc.InferenceServerClient, **options) -> None:
        self.client = client
        self.results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: self.results.put((result, error)), **options)

    def send(self, prompt: str, **options) -> None:
        options.setdefault("parameters", GREEDY)
        self.client.async_stream_infer("charlm", [text_input(prompt)], **options)

    def until_final(self, count: int = 1) -> list[tuple]:
        """Responses and errors until ``count`` requests have ended (a final response or an error each)."""
        received = []
        for _ in range(10_000):
            if count == 0:
                return received
            result, error = self.results.get(timeout=30)
            received.append((result, error))
            count -= error is not None or final(result)
        raise AssertionError("a stream never ended its requests")

    def close(self) -> None:
        self.client.stop_stream()


def turn_text(responses: list[tuple]) -> str:
    """The text of one request's responses (no errors among them)."""
    assert all(error is None for _, error in responses), [str(e) for _, e in responses]
    return "".join(
        texts_of(result, "TEXT_OUT")[0] for result, _ in responses if result.as_numpy("TEXT_OUT") is not None
    )


def lstm_turns(stubs: Stubs, prompts: list[str], max_tokens: int = 12, metadata=()) -> list[str]:
    """The text of each turn of one lstm.v1 session, greedy."""
    session = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm"), metadata=metadata)
    sampling = pb.SamplingParams(temperature=0, max_tokens=max_tokens)
    turns = []
    for prompt in prompts:
        request = pb.GenerateRequest(session_id=session.session_id, prompt=prompt, sampling=sampling)
        turns.append("".join(r.text for r in stubs.generation.Generate(request, metadata=metadata)))
    stubs.sessions.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), metadata=metadata)
    return turns


def refused(code: grpc.StatusCode, call, *args, **kwargs) -> str:
    with pytest.raises(InferenceServerException) as error:
        call(*args, **kwargs)
    assert error.value.status() == str(code), error.value.message()
    return error.value.message()


# -- readiness and metadata -----------------------------------------------------------------------------------


def test_readiness_metadata_and_configuration(client, server) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("charlm") and client.is_model_ready("sentiment", "1")
    assert not client.is_model_ready("nonesuch") and not client.is_model_ready("charlm", "7")
    metadata = client.get_server_metadata()
    assert metadata.name == "lstm-server" and {"sequence", "parameters", "model_configuration"} <= set(
        metadata.extensions
    )

    charlm = client.get_model_metadata("charlm")
    assert (charlm.name, list(charlm.versions), charlm.platform) == ("charlm", ["1"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in charlm.inputs] == [("TEXT", "BYTES", [1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in charlm.outputs] == [
        ("TEXT_OUT", "BYTES", [1]),
        ("TOKENS_SEEN", "UINT64", [1]),
        ("FINISH_REASON", "BYTES", [1]),
    ]
    config = client.get_model_config("charlm", "1").config
    assert config.max_batch_size == 0 and config.model_transaction_policy.decoupled
    assert config.sequence_batching.max_sequence_idle_microseconds == int(server.config.idle_timeout_s * 1e6)
    forever = model_config(server.server.models.get("charlm"), server.config.model_copy(update={"idle_timeout_s": INF}))
    assert forever.sequence_batching.max_sequence_idle_microseconds == 2**64 - 1  # sessions that never expire

    sentiment = client.get_model_metadata("sentiment")
    labels = json.loads(client.get_model_config("sentiment").config.parameters["labels"].string_value)
    assert [(t.name, t.datatype, list(t.shape)) for t in sentiment.outputs] == [
        ("LABEL", "BYTES", [-1]),
        ("PROBS", "FP32", [-1, len(labels)]),
    ]
    sentiment_config = client.get_model_config("sentiment").config
    assert (
        not sentiment_config.HasField("sequence_batching") and not sentiment_config.model_transaction_policy.decoupled
    )
    index = client.get_model_repository_index()
    assert {(m.name, m.version, m.state) for m in index.models} == {
        ("charlm", "1", "READY"),
        ("sentiment", "1", "READY"),
    }


def test_the_service_is_in_health_and_reflection(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        check = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        assert health_pb2_grpc.HealthStub(channel).Check(check).status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in set(database.get_services())
        service = descriptor_pool.DescriptorPool(database).FindServiceByName("inference.GRPCInferenceService")
        method = service.methods_by_name["ModelInfer"]
        assert method.output_type.full_name == "inference.ModelInferResponse"


def test_unknown_models_and_versions_are_not_found(client) -> None:
    message = refused(grpc.StatusCode.NOT_FOUND, client.get_model_metadata, "nonesuch")
    assert "no model 'nonesuch'" in message and "charlm, sentiment" in message
    message = refused(grpc.StatusCode.NOT_FOUND, client.get_model_config, "charlm", "2")
    assert "version '2' is not served" in message and "serves version 1" in message
    refused(grpc.StatusCode.NOT_FOUND, client.infer, "nonesuch", [text_input("x")])


def test_readiness_follows_the_health_status(start_server) -> None:
    running = start_server()
    client = tc.InferenceServerClient(running.address)
    running.run(running.server._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))  # as when draining
    assert client.is_server_live()
    assert not client.is_server_ready() and not client.is_model_ready("charlm")
    client.close()


# -- classification ---------------------------------------------------------------------------------------------


def test_classification_equals_classify_bitwise(client, stubs, raw) -> None:
    expected = stubs.classification.Classify(pb.ClassifyRequest(model="sentiment", texts=TEXTS)).results
    labels = json.loads(client.get_model_config("sentiment").config.parameters["labels"].string_value)
    result = client.infer("sentiment", [text_input(*TEXTS)], request_id="c-1")
    assert result.get_response().id == "c-1"
    assert texts_of(result, "LABEL") == [r.label for r in expected]
    probabilities = result.as_numpy("PROBS")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(TEXTS), len(labels))
    want = np.array([[r.probabilities[label] for label in labels] for r in expected], np.float32)
    assert probabilities.tobytes() == want.tobytes()

    # the same texts in contents.bytes_contents instead of raw_input_contents; only the outputs asked for
    request = ip.ModelInferRequest(
        model_name="sentiment",
        inputs=[
            ip.ModelInferRequest.InferInputTensor(
                name="TEXT",
                datatype="BYTES",
                shape=[len(TEXTS)],
                contents=ip.InferTensorContents(bytes_contents=[t.encode() for t in TEXTS]),
            )
        ],
        outputs=[ip.ModelInferRequest.InferRequestedOutputTensor(name="PROBS")],
    )
    response = raw.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["PROBS"] and response.raw_output_contents[0] == want.tobytes()


# -- generation ---------------------------------------------------------------------------------------------------


def test_a_sequence_over_a_stream_equals_lstm_v1_turns(client, stubs) -> None:
    expected = lstm_turns(stubs, PROMPTS)
    stream = Stream(client)
    for i, prompt in enumerate(PROMPTS):
        flags = {"sequence_start": i == 0, "sequence_end": i == len(PROMPTS) - 1}
        stream.send(prompt, sequence_id=41, request_id=f"turn-{i}", enable_empty_final_response=True, **flags)
    turns = [stream.until_final() for _ in PROMPTS]
    seen = 0
    for i, (responses, prompt) in enumerate(zip(turns, PROMPTS, strict=True)):
        assert {r.get_response().id for r, _ in responses} == {f"turn-{i}"}
        *texts, end, (empty, _) = responses
        assert not any(final(r) for r, _ in [*texts, end])
        assert all(r.as_numpy("TOKENS_SEEN") is None for r, _ in texts)
        assert final(empty) and not empty.get_response().outputs  # the empty final response
        seen += len(prompt) + 12
        assert end[0].as_numpy("TOKENS_SEEN").tolist() == [seen]
        assert texts_of(end[0], "FINISH_REASON") == ["length"]
    assert [turn_text(t) for t in turns] == expected

    stream.send("more", sequence_id=41)  # it ended: no sequence 41 any more
    ((_, error),) = stream.until_final()
    assert "NOT_FOUND: sequence 41 of model 'charlm' is not open" in str(error) and "sequence_start" in str(error)
    stream.send("again ", sequence_id=41, sequence_start=True, sequence_end=True)  # the stream is still open
    assert turn_text(stream.until_final()) == lstm_turns(stubs, ["again "])[0]
    stream.close()


def test_without_empty_final_responses_the_last_text_comes_with_the_end(client, stubs) -> None:
    stream = Stream(client)
    stream.send(PROMPTS[0], request_id="one-off")  # no sequence: a sequence of its own
    responses = stream.until_final()
    stream.close()
    last = responses[-1][0]
    assert final(last) and last.as_numpy("TEXT_OUT") is not None
    assert last.as_numpy("TOKENS_SEEN").tolist() == [len(PROMPTS[0]) + 12]
    assert turn_text(responses) == lstm_turns(stubs, PROMPTS[:1])[0]


def test_pipelined_sequences_on_one_stream_run_in_order_each_and_together(client, stubs) -> None:
    expected = lstm_turns(stubs, PROMPTS)
    stream = Stream(client)
    for i, prompt in enumerate(PROMPTS):  # all sent before any answer: queued, not refused as busy
        for sequence_id in (7, "seven"):
            flags = {"sequence_start": i == 0, "sequence_end": i == len(PROMPTS) - 1}
            stream.send(prompt, sequence_id=sequence_id, request_id=f"{sequence_id}/{i}", **flags)
    responses = stream.until_final(2 * len(PROMPTS))
    stream.close()
    by_request: dict[str, list] = {}
    for result, error in responses:
        assert error is None, str(error)
        by_request.setdefault(result.get_response().id, []).append((result, None))
    for sequence_id in (7, "seven"):
        assert [turn_text(by_request[f"{sequence_id}/{i}"]) for i in range(len(PROMPTS))] == expected


def held_sequence_then_two_requests(running, client: tc.InferenceServerClient) -> tuple[Place, Stream]:
    """Sequence 99 held by an earlier request that has not ended (``Place.leave`` ends it), then a stream with one
    request of sequence 99 and one of sequence 100 (request ids "99", "100")."""
    service = running.server.inference

    async def hold() -> Place:
        return service.queue.join(sequence_session_id(service.sequence_key, ANONYMOUS, "charlm", 99))

    held = running.run(hold())
    stream = Stream(client)
    for sequence_id in (99, 100):
        stream.send(
            PROMPTS[0], sequence_id=sequence_id, sequence_start=True, sequence_end=True, request_id=str(sequence_id)
        )
    return held, stream


def release(running, held: Place) -> None:
    """End the earlier request of the held sequence (on the server's event loop)."""

    async def leave() -> None:
        held.leave()

    running.run(leave())


def test_a_sequence_that_waits_does_not_hold_up_another_on_the_same_stream(server, client, stubs) -> None:
    held, stream = held_sequence_then_two_requests(server, client)
    first = stream.until_final()
    assert {result.get_response().id for result, _ in first} == {"100"}
    release(server, held)
    second = stream.until_final()
    stream.close()
    assert {result.get_response().id for result, _ in second} == {"99"}
    assert turn_text(first) == turn_text(second) == lstm_turns(stubs, PROMPTS[:1])[0]


def test_inference_stream_requests_bounds_the_requests_of_a_stream_running_at_once(start_server, stubs) -> None:
    running = start_server(inference_stream_requests=1)
    client = tc.InferenceServerClient(running.address)
    held, stream = held_sequence_then_two_requests(running, client)  # 99 waits, holding the stream's one place
    release(running, held)
    responses = stream.until_final(2)
    stream.close()
    client.close()
    order = [result.get_response().id for result, _ in responses]
    assert order == sorted(order, key=lambda request: request != "99")  # 100 was read only once 99 had ended
    assert turn_text(responses[: order.count("99")]) == lstm_turns(stubs, PROMPTS[:1])[0]


def test_a_cancelled_stream_frees_its_sequence_for_the_next_request(client) -> None:
    stream = Stream(client)
    stream.send(PROMPTS[0], sequence_id=8, sequence_start=True, parameters={"max_tokens": 4000})
    first, error = stream.results.get(timeout=30)
    assert error is None and not final(first)
    client.stop_stream(cancel_requests=True)  # mid-turn
    result = client.infer("charlm", [text_input("")], sequence_id=8, sequence_end=True, parameters=GREEDY)
    assert texts_of(result, "FINISH_REASON") == ["length"]
    assert result.as_numpy("TOKENS_SEEN")[0] > len(PROMPTS[0]) + 12  # and what the cancelled turn generated


def test_unary_calls_continue_a_sequence_and_answer_whole_turns(client, stubs) -> None:
    expected = lstm_turns(stubs, PROMPTS)
    texts = []
    for i, prompt in enumerate(PROMPTS):
        flags = {"sequence_start": i == 0, "sequence_end": i == len(PROMPTS) - 1}
        result = client.infer(
            "charlm", [text_input(prompt)], sequence_id="u-1", request_id=f"u{i}", parameters=GREEDY, **flags
        )
        assert result.get_response().id == f"u{i}"
        assert texts_of(result, "FINISH_REASON") == ["length"]
        texts.append(texts_of(result, "TEXT_OUT")[0])
    assert texts == expected
    message = refused(grpc.StatusCode.NOT_FOUND, client.infer, "charlm", [text_input("x")], sequence_id="u-1")
    assert "send its first request with sequence_start" in message


def test_sampling_parameters_mean_what_lstm_v1_sampling_means(client, stubs) -> None:
    # as perf_analyzer sends them: a number may be a string
    parameters = {"temperature": "0.8", "top_k": 5, "top_p": 0.9, "seed": "11", "max_tokens": 30, "stop": '["e"]'}
    result = client.infer("charlm", [text_input(PROMPTS[0])], parameters=parameters)
    session = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm"))
    sampling = pb.SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=11, max_tokens=30, stop=["e"])
    request = pb.GenerateRequest(session_id=session.session_id, prompt=PROMPTS[0], sampling=sampling)
    responses = list(stubs.generation.Generate(request))
    assert texts_of(result, "TEXT_OUT") == ["".join(r.text for r in responses)]
    assert texts_of(result, "FINISH_REASON") == [pb.FinishReason.Name(responses[-1].finish_reason)[14:].lower()]


# -- errors -------------------------------------------------------------------------------------------------------


def raw_request(
    model: str = "charlm", datatype: str = "BYTES", shape=(1,), raw: bytes | None = None, name="TEXT", **parameters
) -> ip.ModelInferRequest:
    """A request of one input, "hi" unless ``raw`` says otherwise; parameters as NAME=(FIELD, VALUE)."""
    request = ip.ModelInferRequest(
        model_name=model,
        id="bad-1",
        inputs=[ip.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))],
    )
    request.raw_input_contents.append(struct.pack("<I", 2) + b"hi" if raw is None else raw)
    for key, value in parameters.items():
        setattr(request.parameters[key], value[0], value[1])
    return request


def changed(request: ip.ModelInferRequest, change) -> ip.ModelInferRequest:
    change(request)
    return request


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (raw_request(name="PROMPT"), "takes one input, TEXT (BYTES, shape [1]); got inputs ['PROMPT']"),
        (changed(raw_request(), lambda r: r.raw_input_contents.append(b"")), "2 raw_input_contents for 1 input"),
        (changed(raw_request(), lambda r: r.outputs.add(name="LOGITS")), "has no output 'LOGITS'; its outputs are"),
        (
            changed(
                raw_request(),
                lambda r: r.inputs[0].parameters["shared_memory_region"].MergeFrom(ip.InferParameter(string_param="r")),
            ),
            "shared memory",
        ),
        (raw_request(datatype="FP32"), "input TEXT must have datatype BYTES, got 'FP32'"),
        (raw_request(shape=(2,)), "input TEXT must have shape [1]"),
        (raw_request(model="sentiment", shape=(2,)), "input TEXT has shape [2] but 1 elements: send 2"),
        (raw_request(raw=b"\x09\x00\x00\x00hi"), "element 0 says 9 bytes but 2 remain"),
        (raw_request(raw=struct.pack("<I", 2) + b"\xff\xfe"), "not UTF-8"),
        (raw_request(temperature=("string_param", "hot")), "parameter temperature must be a number"),
        (raw_request(seed=("bool_param", True)), "parameter seed must be an integer"),
        (raw_request(top_k=("double_param", 2.5)), "parameter top_k must be an integer"),
        (raw_request(max_tokens=("int64_param", 2**40)), "parameter max_tokens must fit a 32-bit integer"),
        (raw_request(max_tokens=("int64_param", 10**6)), "max_tokens must be in [0, 4096]"),
        (raw_request(stop=("string_param", "e")), "parameter stop must be a JSON list of strings"),
        (
            raw_request(sequence_start=("int64_param", 1), sequence_id=("int64_param", 3)),
            "sequence_start must be a bool",
        ),
        (raw_request(max_token=("int64_param", 3)), "takes no parameter 'max_token'"),
        (raw_request(model="sentiment", sequence_id=("int64_param", 3)), "takes no parameter 'sequence_id'"),
    ],
)
def test_bad_requests_are_invalid_argument_saying_what_to_fix(raw, request_, needle) -> None:
    with pytest.raises(grpc.RpcError) as error:
        raw.ModelInfer(request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in error.value.details()


def test_an_error_in_a_stream_names_its_request_and_leaves_the_stream_open(raw, stubs) -> None:
    good = raw_request(**{k: ("int64_param", v) for k, v in GREEDY.items()})
    good.id = "good-1"
    responses = list(raw.ModelStreamInfer(iter([raw_request(model="nonesuch"), raw_request(datatype="FP32"), good])))
    errors = [r for r in responses if r.error_message]
    assert [(r.infer_response.id, r.error_message.split(":")[0]) for r in errors] == [
        ("bad-1", "NOT_FOUND"),
        ("bad-1", "INVALID_ARGUMENT"),
    ]
    texts = [r.infer_response for r in responses if not r.error_message]
    assert {r.id for r in texts} == {"good-1"} and texts[-1].parameters["triton_final_response"].bool_param
    assert "".join(ip_text(r) for r in texts) == lstm_turns(stubs, ["hi"])[0]


def streamed(raw, *requests: ip.ModelInferRequest) -> dict[str, list[ip.ModelStreamInferResponse]]:
    """The responses of one stream of ``requests``, by request id (the stream must end OK)."""
    by_id: dict[str, list] = {}
    for response in raw.ModelStreamInfer(iter(requests), timeout=30):
        by_id.setdefault(response.infer_response.id, []).append(response)
    return by_id


def good_request(request_id: str = "good-1") -> ip.ModelInferRequest:
    good = raw_request(**{k: ("int64_param", v) for k, v in GREEDY.items()})
    good.id = request_id
    return good


@pytest.mark.parametrize(
    ("stop", "needle"),
    [
        ("[" * 3000, "not nested: got arrays or objects nested 3000 deep"),
        ('[["a"]]', "not nested: got arrays or objects nested 2 deep"),
        ('["' + "x" * 70_000 + '"]', "at most 65536 characters long; got 70004"),
        (json.dumps(["a"] * 9), "parameter stop may hold at most 8 strings (max_stop_strings), got 9"),
    ],
    ids=["deep", "nested", "long", "many"],
)
def test_a_stop_beyond_the_parsers_bounds_is_invalid_argument_for_its_request_only(raw, stubs, stop, needle) -> None:
    bad = raw_request(stop=("string_param", stop), max_tokens=("int64_param", 3))
    with pytest.raises(grpc.RpcError) as error:
        raw.ModelInfer(bad)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in error.value.details()
    assert error.value.details().startswith("parameter stop ")
    assert details_of(error.value) == bad_request("INVALID_PARAMETER", "parameters.stop")
    by_id = streamed(raw, bad, good_request())  # the stream goes on after the bad request's own error response
    assert [r.error_message.split(":")[0] for r in by_id["bad-1"]] == ["INVALID_ARGUMENT"]
    assert needle in by_id["bad-1"][0].error_message
    assert "".join(ip_text(r.infer_response) for r in by_id["good-1"]) == lstm_turns(stubs, ["hi"])[0]


def test_an_unexpected_error_in_a_stream_answers_its_request_only(server, raw, stubs, monkeypatch) -> None:
    service = server.server.inference
    prepare, turn = service._prepare, service._turn

    def failing_prepare(request, *args):
        if request.id == "bug-reading":
            raise RecursionError("a bug while reading")
        return prepare(request, *args)

    def failing_turn(job, tenant):
        if job.request.id == "bug-running":
            raise RuntimeError("a bug while running")
        return turn(job, tenant)

    monkeypatch.setattr(service, "_prepare", failing_prepare)
    monkeypatch.setattr(service, "_turn", failing_turn)
    by_id = streamed(raw, good_request("bug-reading"), good_request("bug-running"), good_request())
    for request_id, bug in [("bug-reading", "a bug while reading"), ("bug-running", "a bug while running")]:
        assert [r.error_message for r in by_id[request_id]] == [f"INTERNAL: internal error in ModelStreamInfer: {bug}"]
    assert "".join(ip_text(r.infer_response) for r in by_id["good-1"]) == lstm_turns(stubs, ["hi"])[0]


def both_contents(request: ip.ModelInferRequest) -> None:
    request.inputs[0].contents.bytes_contents.append(b"hi")


@pytest.mark.parametrize(
    ("request_", "details"),
    [
        (raw_request(name="PROMPT"), bad_request("INVALID_INPUT", "inputs[0].name")),
        (changed(raw_request(), lambda r: r.inputs.add(name="TEXT")), bad_request("INVALID_INPUT", "inputs")),
        (raw_request(datatype="FP32"), bad_request("INVALID_INPUT", "inputs[0].datatype")),
        (raw_request(shape=(2,)), bad_request("INVALID_INPUT", "inputs[0].shape")),
        (changed(raw_request(), both_contents), bad_request("INVALID_INPUT", "inputs[0].contents")),
        (raw_request(raw=b"\x09\x00\x00\x00hi"), bad_request("INVALID_INPUT", "raw_input_contents[0]")),
        (changed(raw_request(), lambda r: r.outputs.add(name="X")), bad_request("INVALID_OUTPUT", "outputs[0].name")),
        (raw_request(max_token=("int64_param", 3)), bad_request("UNKNOWN_PARAMETER", "parameters.max_token")),
        (raw_request(temperature=("string_param", "hot")), bad_request("INVALID_PARAMETER", "parameters.temperature")),
        (raw_request(sequence_id=("double_param", 1.5)), bad_request("INVALID_PARAMETER", "parameters.sequence_id")),
        (raw_request(top_p=("double_param", 2.0)), bad_request("INVALID_SAMPLING", "parameters.top_p")),
        (raw_request(model="sentiment", shape=(0,), raw=b""), bad_request("NO_TEXTS", "inputs[0]")),
        (raw_request(model="nonesuch"), lstm_error("MODEL_NOT_FOUND", "model_name")),
        (
            changed(raw_request(), lambda r: setattr(r, "model_version", "7")),
            lstm_error("MODEL_NOT_FOUND", "model_version"),
        ),
    ],
)
def test_errors_name_their_field_in_the_protocols_terms(raw, request_, details) -> None:
    with pytest.raises(grpc.RpcError) as error:
        raw.ModelInfer(request_)
    assert details_of(error.value) == details, error.value.details()


def test_a_request_with_both_raw_and_typed_contents_is_refused_not_half_read(raw) -> None:
    with pytest.raises(grpc.RpcError) as error:
        raw.ModelInfer(changed(raw_request(), both_contents))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input TEXT has both raw_input_contents and contents (bytes_contents): send one" in error.value.details()
    request = raw_request(raw=b"")
    del request.raw_input_contents[:]
    request.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(grpc.RpcError) as error:
        raw.ModelInfer(request)
    assert "send its elements in contents.bytes_contents (or raw_input_contents), not fp32_contents" in (
        error.value.details()
    )


UNSUPPORTED_RPCS = [
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
]


def test_the_rpcs_not_offered_are_unimplemented_saying_what_to_do_instead(raw, caplog) -> None:
    caplog.set_level(logging.INFO)
    methods = ip.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    instead = {"Repository": "restart it to change them", "SharedMemory": "send tensors in the request"}
    instead |= {"Trace": "--tracing", "Log": "--log-level"}
    for name in UNSUPPORTED_RPCS:
        with pytest.raises(grpc.RpcError) as error:
            getattr(raw, name)(GetMessageClass(methods[name].input_type)())
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED, error.value.details()
        (hint,) = [hint for key, hint in instead.items() if key in name]
        assert error.value.details().startswith(f"{name} is not supported by this server: ")
        assert hint in error.value.details()
        assert details_of(error.value) == lstm_error("UNIMPLEMENTED")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def ip_text(response: ip.ModelInferResponse) -> str:
    names = [o.name for o in response.outputs]
    if "TEXT_OUT" not in names:
        return ""
    return response.raw_output_contents[names.index("TEXT_OUT")][4:].decode()


# -- statistics ---------------------------------------------------------------------------------------------------


def test_model_statistics_count_this_protocols_requests_per_model(start_server) -> None:
    client = tc.InferenceServerClient(start_server().address)
    # served, but not listed: perf_analyzer 2.60 asks for statistics when it is, and then fails without -x
    assert "statistics" not in client.get_server_metadata().extensions
    before = client.get_inference_statistics().model_stats
    assert {(s.name, s.version, s.last_inference, s.execution_count) for s in before} == {
        ("charlm", "1", 0, 0),
        ("sentiment", "1", 0, 0),
    }
    client.infer("sentiment", [text_input(*TEXTS)])
    client.infer("sentiment", [text_input(TEXTS[0])])
    client.infer("charlm", [text_input(PROMPTS[0])], parameters=GREEDY)
    stream = Stream(client)
    for i, prompt in enumerate(PROMPTS[:2]):  # the second waits for the first: its queue time
        stream.send(prompt, sequence_id=6, sequence_start=i == 0, sequence_end=i == 1)
    stream.send("x", parameters={"max_tokens": 10**6})  # out of range: fails at its turn
    responses = stream.until_final(3)
    stream.close()
    assert sum(error is not None for _, error in responses) == 1
    refused(grpc.StatusCode.INVALID_ARGUMENT, client.infer, "charlm", [text_input("x")], parameters={"max_token": 3})
    refused(grpc.StatusCode.NOT_FOUND, client.infer, "nonesuch", [text_input("x")])  # counted nowhere

    stats = {s.name: s for s in client.get_inference_statistics().model_stats}
    sentiment, charlm = stats["sentiment"], stats["charlm"]
    assert (sentiment.inference_count, sentiment.execution_count) == (len(TEXTS) + 1, 2)  # texts; requests
    assert (charlm.inference_count, charlm.execution_count) == (3, 3)
    for model, succeeded, failed in ((sentiment, 2, 0), (charlm, 3, 2)):
        counts = model.inference_stats
        assert (counts.success.count, counts.fail.count) == (succeeded, failed)
        assert counts.success.ns > 0 and (counts.fail.ns > 0) == (failed > 0)
        assert counts.compute_infer.count == succeeded and 0 < counts.compute_infer.ns < counts.success.ns
        assert counts.compute_input.count == counts.compute_output.count == succeeded  # with no time (not timed)
        assert counts.compute_input.ns == counts.compute_output.ns == counts.cache_miss.count == 0
        assert abs(model.last_inference - time.time() * 1000) < 60_000
    assert sentiment.inference_stats.queue.count == 0 and charlm.inference_stats.queue.count == 3

    (only,) = client.get_inference_statistics("charlm", "1").model_stats
    assert only == charlm
    assert {s.name for s in client.get_inference_statistics("", "1").model_stats} == {"charlm", "sentiment"}
    assert not client.get_inference_statistics("", "2").model_stats
    assert "no model 'nonesuch'" in refused(grpc.StatusCode.NOT_FOUND, client.get_inference_statistics, "nonesuch")
    message = refused(grpc.StatusCode.NOT_FOUND, client.get_inference_statistics, "charlm", "2")
    assert "version '2' is not served" in message
    client.close()


# -- tenants ------------------------------------------------------------------------------------------------------


def test_tokens_are_required_and_a_tenant_cannot_continue_anothers_sequence(start_server, tmp_path, stubs) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(f"{tenant} {token}\n" for tenant, token in TOKENS.items()))
    running = start_server(auth_tokens=str(tokens))
    client = tc.InferenceServerClient(running.address)
    assert client.is_server_live() and client.is_server_ready()  # probes, like grpc.health.v1, need no token
    calls = ((client.is_model_ready, ("charlm",)), (client.get_model_metadata, ("charlm",)))
    for call, args in (*calls, (client.get_inference_statistics, ())):
        assert "needs authentication" in refused(grpc.StatusCode.UNAUTHENTICATED, call, *args)
    refused(grpc.StatusCode.UNAUTHENTICATED, client.infer, "charlm", [text_input("x")])
    stream = Stream(client)  # refused as it opens, before any request
    ((_, error),) = stream.until_final()
    assert "needs authentication" in str(error)
    stream.close()

    alice = {"authorization": f"Bearer {TOKENS['alice']}"}
    bob = {"authorization": f"Bearer {TOKENS['bob']}"}
    first = client.infer(
        "charlm", [text_input(PROMPTS[0])], sequence_id=5, sequence_start=True, parameters=GREEDY, headers=alice
    )
    message = refused(grpc.StatusCode.NOT_FOUND, client.infer, "charlm", [text_input("x")], sequence_id=5, headers=bob)
    assert "sequence 5 of model 'charlm' is not open" in message
    second = client.infer(
        "charlm", [text_input(PROMPTS[1])], sequence_id=5, sequence_end=True, parameters=GREEDY, headers=alice
    )
    # statistics are the caller's own: bob's refused request is his, alice's two turns hers
    (mine,) = client.get_inference_statistics("charlm", headers=alice).model_stats
    (his,) = client.get_inference_statistics("charlm", headers=bob).model_stats
    assert (mine.execution_count, mine.inference_stats.fail.count) == (2, 0)
    assert (his.execution_count, his.inference_stats.fail.count) == (0, 1)
    client.close()
    assert [texts_of(first, "TEXT_OUT")[0], texts_of(second, "TEXT_OUT")[0]] == lstm_turns(stubs, PROMPTS[:2])


def test_another_replica_continues_a_sequence_from_the_redis_store(start_redis, start_server, stubs) -> None:
    redis_ = start_redis()
    replicas = [tc.InferenceServerClient(start_server(**store_settings(redis_)).address) for _ in range(2)]
    texts = []
    for i, prompt in enumerate(PROMPTS):  # on replica 0, 1, then 0 again, whose copy is stale by then
        flags = {"sequence_start": i == 0, "sequence_end": i == len(PROMPTS) - 1}
        result = replicas[i % 2].infer("charlm", [text_input(prompt)], sequence_id=3, parameters=GREEDY, **flags)
        texts.append(texts_of(result, "TEXT_OUT")[0])
    assert texts == lstm_turns(stubs, PROMPTS)
    refused(grpc.StatusCode.NOT_FOUND, replicas[1].infer, "charlm", [text_input("x")], sequence_id=3)
    for replica in replicas:
        replica.close()


# -- the sequence queue -----------------------------------------------------------------------------------------


def test_the_sequence_queue_lets_requests_go_in_arrival_order_even_when_one_gives_up() -> None:
    async def scenario() -> list[str]:
        sequences, order = SequenceQueue(), []
        first, second, third = (sequences.join("s") for _ in range(3))
        other = sequences.join("t")

        async def run(name: str, place: Place) -> None:
            await place.wait()
            order.append(name)

        waiting = [asyncio.ensure_future(run("third", third)), asyncio.ensure_future(run("second", second))]
        await run("other", other)  # another sequence does not wait
        other.leave()
        waiting[1].cancel()  # the second gives up while it waits; the third still waits for the first
        second.leave()
        await asyncio.gather(waiting[1], return_exceptions=True)
        await run("first", first)
        assert not waiting[0].done() and order == ["other", "first"]
        first.leave()
        await waiting[0]
        third.leave()
        assert not sequences._last  # nothing kept once every place has left
        return order

    assert asyncio.run(scenario()) == ["other", "first", "third"]


def test_a_request_cancelled_while_its_response_waits_for_room_frees_its_sequence_once_its_turn_ends(server) -> None:
    service = server.server.inference
    start = raw_request(sequence_id=("int64_param", 12), sequence_start=("bool_param", True))
    start.parameters["max_tokens"].int64_param = 4000
    after = raw_request(sequence_id=("int64_param", 12), sequence_end=("bool_param", True))

    async def scenario() -> ip.ModelInferResponse:
        outbox = Outbox(1)  # its client reads nothing: the second response waits for room
        job = service._prepare(start, ANONYMOUS)
        task = asyncio.ensure_future(service._stream_one(job, ANONYMOUS, outbox, time.perf_counter()))
        while outbox._queue.empty():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()  # as the stream's end cancels it, mid-turn
        await asyncio.gather(task, return_exceptions=True)
        job.place.leave()  # as the stream's done callback does
        (response,) = [r async for r in service._run(service._prepare(after, ANONYMOUS), ANONYMOUS, False)]
        return response

    response = server.run(scenario())
    names = [output.name for output in response.outputs]
    (seen,) = np.frombuffer(response.raw_output_contents[names.index("TOKENS_SEEN")], "<u8")
    assert seen > len("hi") + 1  # the next request ran after the cancelled turn, on what it generated


def test_an_end_cancelled_before_its_turn_leaves_the_sequence_to_the_requests_before_it(server) -> None:
    service = server.server.inference
    flags = {"sequence_id": ("int64_param", 13)}
    start, end = (raw_request(**flags, **{name: ("bool_param", True)}) for name in ("sequence_start", "sequence_end"))

    async def answer(request: ip.ModelInferRequest) -> ip.ModelInferResponse:
        (response,) = [r async for r in service._run(service._prepare(request, ANONYMOUS), ANONYMOUS, False)]
        return response

    async def scenario() -> ip.ModelInferResponse:
        await answer(start)
        held = service.queue.join(sequence_session_id(service.sequence_key, ANONYMOUS, "charlm", 13))
        ending = asyncio.ensure_future(answer(end))
        await asyncio.sleep(0.05)
        ending.cancel()  # while it waits behind the held request
        await asyncio.gather(ending, return_exceptions=True)
        held.leave()
        return await answer(end)  # the sequence is still there

    assert server.run(scenario()).id == "bad-1"
