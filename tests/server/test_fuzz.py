"""Fuzzing every RPC on the port (lstm.v1, the Open Inference Protocol, grpc.health.v1, reflection): whatever a
client sends, the answer is never INTERNAL or UNKNOWN (nor a hang), in a status or in an Open Inference stream's
error response, and the server stays healthy and correct afterwards.

Requests are built from each message's descriptor: every field with values at and beyond its edges (huge and
negative numbers, NaN and infinities, enum numbers outside the enum, long, odd and deeply nested strings, wrong
tensor shapes and sizes), biased towards the ids and names the server knows so that the checks behind the first one
run too; plus bytes that are not a message at all, session states signed with the server's key (so that the checks
behind the signature run), and well-formed inference requests with parameters at their edges.
"""

from __future__ import annotations

import json
import struct

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lstm.v1 import lstm_pb2 as pb
from tritonclient.grpc import service_pb2 as ip

from ..serving import Stubs
from .test_errors import details_of, lstm_error

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_TIMEOUT_S = 10  # a deadline hit means a hang
FUZZ = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
SERVICES = [
    *pb.DESCRIPTOR.services_by_name.values(),
    ip.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
]
ENDLESS = {"/grpc.health.v1.Health/Watch"}  # answers until cancelled: its first response is the answer
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
PARAMETERS = [
    *("temperature", "top_k", "top_p", "seed", "max_tokens", "stop"),
    *("sequence_id", "sequence_start", "sequence_end", "triton_enable_empty_final_response", "priority"),
]
EDGE_STRINGS = [
    "[" * 3000,  # deep JSON
    "{" * 3000 + "}" * 3000,
    '["' + "[" * 3000 + '"]',  # brackets inside a string are not nesting
    '["' + "x" * 100_000 + '"]',
    json.dumps(["a"] * 5000),
    '["\\n\\n", "END"]',
    *("0.8", "-1", "1e999", "nan", "-inf", "9" * 5000, "0x10", "1_000", ""),
]
INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
}
odd_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "KING:\n", "the ", "\x00", "é\U0001f600", "x" * 20_000, *EDGE_STRINGS]),
)
HI = struct.pack("<I", 2) + b"hi"  # one BYTES element, length-prefixed
KNOWN = {  # names and values the server knows, by field name (besides lstm.v1's session and models)
    "model_name": ["charlm", "sentiment"],
    "name": ["charlm", "sentiment", "TEXT", "TEXT_OUT", "PROBS"],
    "datatype": ["BYTES", "FP32"],
    "version": ["", "1"],
    "model_version": ["", "1"],
    "key": PARAMETERS,  # a map's keys: the inference parameters
    "string_param": EDGE_STRINGS,
    "raw_input_contents": [HI, HI * 2, b"\xff\xff\xff\xff"],
    "bytes_contents": [b"hi", b"\xff"],
    "service": ["", "lstm.v1.Sessions", "inference.GRPCInferenceService"],
    "file_containing_symbol": ["lstm.v1.Sessions", "inference.ModelInferRequest", "grpc.health.v1.Health"],
    "file_by_filename": ["lstm/v1/lstm.proto", "grpc_service.proto"],
    "containing_type": ["inference.ModelInferRequest", "lstm.v1.SamplingParams"],
    "all_extension_numbers_of_type": ["inference.InferParameter"],
}


def scalar(field, known: dict[str, list[str]]):
    if field.type in INT_RANGES:
        low, high = INT_RANGES[field.type]
        return st.one_of(st.integers(low, high), st.sampled_from([low, high, 0, 1, -1 if low < 0 else 2]))
    if field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return st.one_of(st.floats(width=32), st.sampled_from([0.0, 1.0, -1.0, 1e30]))
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 2**31 - 1))
    if field.type == F.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=2048), *([st.sampled_from(known[field.name])] if field.name in known else [])
        )
    if field.name in known:
        return st.one_of(st.sampled_from(known[field.name]), odd_text)
    return odd_text


def message(descriptor, known: dict[str, list[str]], depth: int = 0):
    """A strategy for messages of ``descriptor``: each field left unset or filled."""
    fields = {}
    for field in descriptor.fields:
        if is_map(field):
            key, value = (field.message_type.fields_by_name[name] for name in ("key", "value"))
            if value.type == F.TYPE_MESSAGE and depth >= 2:
                continue
            values = (
                message(value.message_type, known, depth + 1) if value.type == F.TYPE_MESSAGE else scalar(value, known)
            )
            fields[field.name] = st.one_of(st.none(), st.dictionaries(scalar(key, known), values, max_size=4))
            continue
        if field.type == F.TYPE_MESSAGE:
            if depth >= 2:
                continue
            value = message(field.message_type, known, depth + 1)
        else:
            value = scalar(field, known)
        if field.is_repeated:
            value = st.lists(value, max_size=6)
        fields[field.name] = st.one_of(st.none(), value)
    return st.fixed_dictionaries(fields).map(lambda values: build(descriptor, values))


def is_map(field) -> bool:
    return field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def build(descriptor, values: dict):
    made = GetMessageClass(descriptor)()
    for name, value in values.items():
        if value is None:
            continue
        field = descriptor.fields_by_name[name]
        try:
            if is_map(field):
                for key, item in value.items():
                    if isinstance(item, bool | int | float | str | bytes):
                        getattr(made, name)[key] = item
                    else:
                        getattr(made, name)[key].CopyFrom(item)
            elif field.is_repeated:
                getattr(made, name).extend(value)
            elif field.type == F.TYPE_MESSAGE:
                getattr(made, name).CopyFrom(value)
            else:
                setattr(made, name, value)
        except (ValueError, TypeError):  # e.g. an oneof filled twice: the last one wins, as on the wire
            continue
    return made


def methods():
    for service in SERVICES:
        for method in service.methods:
            yield f"/{service.full_name}/{method.name}", method


def call(channel: grpc.Channel, path: str, method, request, raw: bool = False) -> list[grpc.StatusCode]:
    """The codes a call of one request ended with: its status's, and before it, in an Open Inference stream, the
    code of each error response (a request that failed while the stream went on)."""
    serialize = (lambda b: b) if raw else (lambda m: m.SerializeToString())
    parse = GetMessageClass(method.output_type).FromString
    kwargs = {"request_serializer": serialize, "response_deserializer": parse}
    codes = []
    try:
        if method.server_streaming:
            if method.client_streaming:
                responses = channel.stream_stream(path, **kwargs)(iter([request]), timeout=CALL_TIMEOUT_S)
            else:
                responses = channel.unary_stream(path, **kwargs)(request, timeout=CALL_TIMEOUT_S)
            for response in responses:
                if path in ENDLESS:
                    responses.cancel()
                    break
                if path == STREAM_INFER and response.error_message:
                    codes.append(grpc.StatusCode[response.error_message.split(":")[0]])
        elif method.client_streaming:
            channel.stream_unary(path, **kwargs)(iter([request]), timeout=CALL_TIMEOUT_S)
        else:
            channel.unary_unary(path, **kwargs)(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        return [*codes, error.code()]
    return [*codes, grpc.StatusCode.OK]


@pytest.fixture(scope="module")
def fuzzed(exported):
    from ..serving import ServerThread

    running = ServerThread(exported, max_tokens_limit=64, default_max_tokens=16, max_prompt_chars=30_000)
    stubs = Stubs(running.address)
    session = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt="KING:\n"))
    state = stubs.sessions.ExportSession(pb.ExportSessionRequest(session_id=session.session_id))
    known = {**KNOWN, "session_id": [session.session_id], "model": ["charlm", "sentiment"]}
    yield running, stubs, known, state
    stubs.channel.close()
    running.stop()


def assert_healthy(running, stubs: Stubs) -> None:
    health = health_pb2_grpc.HealthStub(stubs.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    session = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt="KING:\n"))
    request = pb.GenerateRequest(session_id=session.session_id, sampling=pb.SamplingParams(max_tokens=5))
    assert len("".join(r.text for r in stubs.generation.Generate(request, timeout=10))) == 5


@pytest.mark.parametrize(("path", "method"), list(methods()), ids=[path for path, _ in methods()])
def test_no_request_gets_internal_or_unknown(fuzzed, path, method) -> None:
    running, stubs, known, _ = fuzzed

    @FUZZ
    @given(request=message(method.input_type, known))
    def check(request) -> None:
        codes = call(stubs.channel, path, method, request)
        assert not FORBIDDEN.intersection(codes), (codes, str(request)[:2000])

    @FUZZ
    @given(data=st.binary(min_size=1, max_size=256))
    def check_raw(data: bytes) -> None:
        codes = call(stubs.channel, path, method, data, raw=True)
        assert not FORBIDDEN.intersection(codes), (codes, data)

    check()
    check_raw()
    assert_healthy(running, stubs)


@pytest.mark.parametrize(("path", "method"), list(methods()), ids=[path for path, _ in methods()])
def test_a_request_that_does_not_parse_is_invalid_argument(fuzzed, path, method) -> None:
    _, stubs, _, _ = fuzzed
    parse = GetMessageClass(method.output_type).FromString
    kwargs = {"request_serializer": lambda b: b, "response_deserializer": parse}
    calls = {
        (False, False): lambda: stubs.channel.unary_unary(path, **kwargs)(b"\xff\xff\xff", timeout=CALL_TIMEOUT_S),
        (False, True): lambda: list(stubs.channel.unary_stream(path, **kwargs)(b"\xff\xff\xff", timeout=5)),
        (True, True): lambda: list(stubs.channel.stream_stream(path, **kwargs)(iter([b"\xff\xff\xff"]), timeout=5)),
    }
    with pytest.raises(grpc.RpcError) as error:
        calls[method.client_streaming, method.server_streaming]()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert "is not a valid message of its type" in error.value.details()
    assert details_of(error.value) == lstm_error("MALFORMED_REQUEST")


def parameter_values():
    """InferParameter messages at the edges of every kind."""
    return st.one_of(
        st.builds(lambda v: ip.InferParameter(bool_param=v), st.booleans()),
        st.builds(
            lambda v: ip.InferParameter(int64_param=v), st.sampled_from([-(2**63), -1, 0, 1, 64, 2**31, 2**63 - 1])
        ),
        st.builds(lambda v: ip.InferParameter(uint64_param=v), st.sampled_from([0, 1, 2**63, 2**64 - 1])),
        st.builds(lambda v: ip.InferParameter(double_param=v), st.floats(width=64)),
        st.builds(
            lambda v: ip.InferParameter(string_param=v), st.one_of(st.sampled_from(EDGE_STRINGS), st.text(max_size=20))
        ),
        st.just(ip.InferParameter()),  # no value
    )


def infer_request(model: str, parameters: dict, request_id: str) -> ip.ModelInferRequest:
    tensor = ip.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
    request = ip.ModelInferRequest(model_name=model, id=request_id, inputs=[tensor], raw_input_contents=[HI])
    for name, value in parameters.items():
        request.parameters[name].CopyFrom(value)
    return request


def test_inference_parameters_at_their_edges_fail_their_request_only(fuzzed) -> None:
    running, stubs, _, _ = fuzzed
    methods = ip.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    good = infer_request("charlm", {"max_tokens": ip.InferParameter(int64_param=3)}, "good")

    @FUZZ
    @given(
        model=st.sampled_from(["charlm", "sentiment"]),
        parameters=st.dictionaries(st.sampled_from(PARAMETERS), parameter_values(), max_size=4),
    )
    def check(model: str, parameters: dict) -> None:
        request = infer_request(model, parameters, "fuzzed")
        codes = call(stubs.channel, "/inference.GRPCInferenceService/ModelInfer", methods["ModelInfer"], request)
        assert not FORBIDDEN.intersection(codes), (codes, str(request)[:2000])
        responses = stubs.channel.stream_stream(
            STREAM_INFER,
            request_serializer=ip.ModelInferRequest.SerializeToString,
            response_deserializer=ip.ModelStreamInferResponse.FromString,
        )(iter([request, good]), timeout=CALL_TIMEOUT_S)
        by_id: dict[str, list] = {}
        for response in responses:  # the stream ends OK, whatever became of the fuzzed request
            by_id.setdefault(response.infer_response.id, []).append(response)
        errors = [r.error_message for r in by_id.get("fuzzed", []) if r.error_message]
        assert not [e for e in errors if e.startswith(("INTERNAL", "UNKNOWN"))], errors
        assert by_id["good"][-1].infer_response.parameters["triton_final_response"].bool_param
        assert not any(r.error_message for r in by_id["good"])

    for name in ("stop", "temperature", "seed", "sequence_id"):  # each edge, whatever the random draws
        for edge in EDGE_STRINGS:
            check = example(model="charlm", parameters={name: ip.InferParameter(string_param=edge)})(check)
    check()
    assert_healthy(running, stubs)


def test_signed_states_with_any_fields_are_checked_not_crashed_on(fuzzed) -> None:
    running, stubs, known, state = fuzzed
    signer = running.server.signer

    @FUZZ
    @given(fields=message(pb.SessionState.DESCRIPTOR, known), keep=st.sets(st.sampled_from(["h", "c", "next_logits"])))
    def check(fields, keep) -> None:
        forged = pb.SessionState()
        forged.CopyFrom(state)
        for name in ("model", "model_version", "tokens_seen", "defaults", *({"h", "c", "next_logits"} - keep)):
            if fields.HasField(name) if name in ("defaults", "h", "c", "next_logits") else True:
                forged.ClearField(name)
                if name in ("defaults", "h", "c", "next_logits"):
                    getattr(forged, name).CopyFrom(getattr(fields, name))
                else:
                    setattr(forged, name, getattr(fields, name))
        signer.sign(forged)
        try:
            stubs.sessions.ImportSession(pb.ImportSessionRequest(state=forged), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            assert error.code() not in FORBIDDEN, (error.code(), error.details())

    check()
    assert_healthy(running, stubs)
