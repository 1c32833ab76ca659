"""Fuzzing every RPC: whatever a client sends, the answer is never INTERNAL or UNKNOWN, and the server stays
healthy and correct afterwards.

Requests are built from each message's descriptor: every field with values at and beyond its edges (huge and
negative numbers, NaN and infinities, enum numbers outside the enum, long and odd strings, wrong tensor shapes
and sizes), biased towards the ids and names the server knows so that the checks behind the first one run too;
plus bytes that are not a message at all, and session states signed with the server's key (so that the checks
behind the signature run).
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lstm.v1 import lstm_pb2 as pb

from ..serving import Stubs

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_TIMEOUT_S = 10  # a deadline hit means a hang
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
}
odd_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "KING:\n", "the ", "\x00", "é\U0001f600", "x" * 20_000]),
)


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
        return st.binary(max_size=2048)
    if field.name in known:
        return st.one_of(st.sampled_from(known[field.name]), odd_text)
    return odd_text


def message(descriptor, known: dict[str, list[str]], depth: int = 0):
    """A strategy for messages of ``descriptor``: each field left unset or filled."""
    fields = {}
    for field in descriptor.fields:
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


def build(descriptor, values: dict):
    made = GetMessageClass(descriptor)()
    for name, value in values.items():
        if value is None:
            continue
        field = descriptor.fields_by_name[name]
        try:
            if field.is_repeated:
                getattr(made, name).extend(value)
            elif field.type == F.TYPE_MESSAGE:
                getattr(made, name).CopyFrom(value)
            else:
                setattr(made, name, value)
        except (ValueError, TypeError):  # e.g. an oneof filled twice: the last one wins, as on the wire
            continue
    return made


def methods():
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            yield f"/{service.full_name}/{method.name}", method


def call(channel: grpc.Channel, path: str, method, request, raw: bool = False) -> grpc.StatusCode:
    serialize = (lambda b: b) if raw else (lambda m: m.SerializeToString())
    kwargs = {"request_serializer": serialize, "response_deserializer": lambda b: b}
    try:
        if method.client_streaming and method.server_streaming:
            for _ in channel.stream_stream(path, **kwargs)(iter([request]), timeout=CALL_TIMEOUT_S):
                pass
        elif method.server_streaming:
            for _ in channel.unary_stream(path, **kwargs)(request, timeout=CALL_TIMEOUT_S):
                pass
        else:
            channel.unary_unary(path, **kwargs)(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def fuzzed(exported):
    from ..serving import ServerThread

    running = ServerThread(exported, max_tokens_limit=64, default_max_tokens=16, max_prompt_chars=30_000)
    stubs = Stubs(running.address)
    session = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt="KING:\n"))
    state = stubs.sessions.ExportSession(pb.ExportSessionRequest(session_id=session.session_id))
    known = {"session_id": [session.session_id], "model": ["charlm", "sentiment"]}
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
        code = call(stubs.channel, path, method, request)
        assert code not in FORBIDDEN, (code, request)

    @FUZZ
    @given(data=st.binary(min_size=1, max_size=256))
    def check_raw(data: bytes) -> None:
        code = call(stubs.channel, path, method, data, raw=True)
        assert code not in FORBIDDEN, (code, data)

    check()
    check_raw()
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
