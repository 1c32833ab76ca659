"""Every error path answers with the right status code and a message that says what to do."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from lstm.v1 import lstm_pb2 as pb

from ..serving import Stubs, array_of, tensor_of

PROMPT = "KING:\nthe "


@dataclass(frozen=True)
class Details:
    """The google.rpc details of an error, decoded: ErrorInfo's reason, domain and field; BadRequest's fields;
    RetryInfo's delay (None: no RetryInfo)."""

    reason: str
    domain: str
    field: str
    violations: tuple[str, ...]
    retry_after_s: float | None


def details_of(error: grpc.RpcError) -> Details:
    status = rpc_status.from_call(error)  # also checks the code and message match the call's
    assert status is not None, "the error carries no grpc-status-details-bin"
    info, bad, retry = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest(), None
    for detail in status.details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
        else:
            retry = error_details_pb2.RetryInfo()
            assert detail.Unpack(retry), detail.type_url
    delay = None if retry is None else retry.retry_delay.ToTimedelta().total_seconds()
    violations = tuple(f"{v.field}: {v.reason}" for v in bad.field_violations)
    return Details(info.reason, info.domain, info.metadata.get("field", ""), violations, delay)


def expect(code: grpc.StatusCode, match: str, call, *args, **kwargs) -> grpc.RpcError:
    """Make the call, which must fail with ``code`` and a message containing ``match``."""
    with pytest.raises(grpc.RpcError) as raised:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, pb.Session):
            list(result)
    assert raised.value.code() == code, raised.value.details()
    assert match in raised.value.details(), raised.value.details()
    return raised.value


def lstm_error(reason: str, field: str = "", retry_after_s: float | None = None) -> Details:
    """The details of an error of this API: ErrorInfo with ``reason``, and for INVALID_ARGUMENT with a field, a
    BadRequest naming it (``bad_request``)."""
    return Details(reason, "lstm.v1", field, (), retry_after_s)


def bad_request(reason: str, field: str) -> Details:
    return Details(reason, "lstm.v1", field, (f"{field}: {reason}",), None)


def new_session(stubs: Stubs, prompt: str = PROMPT) -> str:
    return stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm", prompt=prompt)).session_id


def test_unknown_model_and_session(stubs) -> None:
    error = expect(
        grpc.StatusCode.NOT_FOUND,
        "no model 'nope'; this server has charlm, sentiment",
        stubs.sessions.CreateSession,
        pb.CreateSessionRequest(model="nope"),
    )
    assert details_of(error) == lstm_error("MODEL_NOT_FOUND", "model")
    error = expect(
        grpc.StatusCode.NOT_FOUND, "no session 'f00'", stubs.sessions.GetSession, pb.GetSessionRequest(session_id="f00")
    )
    assert details_of(error) == lstm_error("SESSION_NOT_FOUND", "session_id")
    expect(grpc.StatusCode.NOT_FOUND, "no session", stubs.generation.Generate, pb.GenerateRequest(session_id="f00"))
    expect(
        grpc.StatusCode.NOT_FOUND,
        "no model",
        stubs.classification.Classify,
        pb.ClassifyRequest(model="nope", texts=["x"]),
    )
    expect(grpc.StatusCode.NOT_FOUND, "no model", stubs.models.DescribeModel, pb.DescribeModelRequest(model="nope"))


def test_wrong_task_for_the_model(stubs) -> None:
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "is a classification model, not generation: use Classify",
        stubs.sessions.CreateSession,
        pb.CreateSessionRequest(model="sentiment"),
    )
    assert details_of(error) == bad_request("WRONG_MODEL_TASK", "model")
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "is a generation model",
        stubs.classification.Classify,
        pb.ClassifyRequest(model="charlm", texts=["x"]),
    )


def test_unknown_characters_are_named_or_handled_by_the_chosen_rule(stubs) -> None:
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "not in the model's vocabulary: '#@'",
        stubs.sessions.CreateSession,
        pb.CreateSessionRequest(model="charlm", prompt="KING@ #"),
    )
    assert details_of(error) == lstm_error("UNKNOWN_CHARACTERS")
    skipped = stubs.sessions.CreateSession(
        pb.CreateSessionRequest(model="charlm", prompt="KING@ #", unknown_characters=pb.UNKNOWN_CHARACTERS_SKIP)
    )
    assert skipped.tokens_seen == len("KING ")
    replaced = stubs.sessions.CreateSession(
        pb.CreateSessionRequest(model="charlm", prompt="KING@ #", unknown_characters=pb.UNKNOWN_CHARACTERS_REPLACE)
    )
    assert replaced.tokens_seen == len("KING@ #")


def test_sampling_limits(stubs) -> None:
    session_id = new_session(stubs)
    for params, message, field in [
        (pb.SamplingParams(temperature=-1), "temperature must be a finite number >= 0", "temperature"),
        (pb.SamplingParams(top_p=0), "top_p must be in (0, 1]", "top_p"),
        (pb.SamplingParams(top_k=-2), "top_k must be >= 0", "top_k"),
        (pb.SamplingParams(max_tokens=10**6), "max_tokens must be in [0, 4096] (max_tokens_limit)", "max_tokens"),
        (pb.SamplingParams(stop=[""]), "stop strings must be 1 to 64 characters long", "stop"),
        (pb.SamplingParams(stop=["a"] * 9), "at most 8 stop strings", "stop"),
    ]:
        error = expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            message,
            stubs.generation.Generate,
            pb.GenerateRequest(session_id=session_id, sampling=params),
        )
        assert details_of(error) == bad_request("INVALID_SAMPLING", f"sampling.{field}")
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature must be",
        stubs.sessions.CreateSession,
        pb.CreateSessionRequest(model="charlm", defaults=pb.SamplingParams(temperature=float("nan"))),
    )
    assert details_of(error) == bad_request("INVALID_SAMPLING", "defaults.temperature")
    # the refused calls left the session usable
    assert list(
        stubs.generation.Generate(pb.GenerateRequest(session_id=session_id, sampling=pb.SamplingParams(max_tokens=3)))
    )


def test_prompt_length_limit(stubs, server) -> None:
    limit = server.config.max_prompt_chars
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the limit is {limit} (max_prompt_chars)",
        stubs.sessions.CreateSession,
        pb.CreateSessionRequest(model="charlm", prompt="a" * (limit + 1)),
    )
    assert details_of(error) == bad_request("PROMPT_TOO_LONG", "prompt")


def test_a_fresh_session_needs_a_prompt(stubs) -> None:
    empty = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm")).session_id
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "has read no text yet: give a non-empty prompt",
        stubs.generation.Generate,
        pb.GenerateRequest(session_id=empty),
    )
    assert details_of(error) == bad_request("PROMPT_REQUIRED", "prompt")


def test_stop_strings_and_zero_max_tokens(stubs) -> None:
    session_id = new_session(stubs)
    responses = list(
        stubs.generation.Generate(
            pb.GenerateRequest(
                session_id=session_id, sampling=pb.SamplingParams(stop=["e", "a", "o", " "], max_tokens=500, seed=1)
            )
        )
    )
    text = "".join(r.text for r in responses)
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP and text[-1] in "eao " and len(text) < 500
    read_only = list(
        stubs.generation.Generate(
            pb.GenerateRequest(session_id=session_id, prompt="the ", sampling=pb.SamplingParams(max_tokens=0))
        )
    )
    assert [r.text for r in read_only] == [""] and read_only[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert read_only[-1].tokens_seen == len(PROMPT) + len(text) + 4


def test_classify_limits(stubs, server) -> None:
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "at least one text",
        stubs.classification.Classify,
        pb.ClassifyRequest(model="sentiment"),
    )
    assert details_of(error) == bad_request("NO_TEXTS", "texts")
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "(max_classify_texts): split the batch",
        stubs.classification.Classify,
        pb.ClassifyRequest(model="sentiment", texts=["x"] * (server.config.max_classify_texts + 1)),
    )
    assert details_of(error) == bad_request("TOO_MANY_TEXTS", "texts")
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "texts[1] has",
        stubs.classification.Classify,
        pb.ClassifyRequest(model="sentiment", texts=["ok", "x" * (server.config.max_classify_chars + 1)]),
    )
    assert details_of(error) == bad_request("TEXT_TOO_LONG", "texts[1]")
    for empty in ("", "   \n"):  # nothing to classify: refused, not read as one [UNK] token
        error = expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            "texts[1] is empty",
            stubs.classification.Classify,
            pb.ClassifyRequest(model="sentiment", texts=["fine", empty]),
        )
        assert details_of(error) == bad_request("EMPTY_TEXT", "texts[1]")


def test_step_errors(stubs) -> None:
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "Step needs a non-empty text or token list",
        stubs.generation.Step,
        pb.StepRequest(model="charlm"),
    )
    assert details_of(error) == bad_request("EMPTY_INPUT", "input")
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "token ids out of range",
        stubs.generation.Step,
        pb.StepRequest(model="charlm", tokens=pb.TokenList(ids=[0, 999])),
    )
    assert details_of(error) == bad_request("TOKEN_OUT_OF_RANGE", "tokens.ids")
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "h must have shape [2, 1, 12]",
        stubs.generation.Step,
        pb.StepRequest(
            model="charlm", text="the", h=pb.Tensor(shape=[1], data=bytes(4)), c=pb.Tensor(shape=[1], data=bytes(4))
        ),
    )
    assert details_of(error) == bad_request("INVALID_TENSOR", "h")
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "give both h and c",
        stubs.generation.Step,
        pb.StepRequest(model="charlm", text="the", h=pb.Tensor(shape=[2, 1, 12], data=bytes(96))),
    )
    assert details_of(error) == bad_request("PARTIAL_STATE", "c")  # the one missing


def test_import_refuses_altered_or_foreign_state(server, stubs) -> None:
    session_id = new_session(stubs)
    state = stubs.sessions.ExportSession(pb.ExportSessionRequest(session_id=session_id))

    def changed(sign: bool = True, **fields) -> pb.SessionState:
        copy = pb.SessionState()
        copy.CopyFrom(state)
        for name, value in fields.items():
            setattr(copy, name, value) if not isinstance(value, pb.Tensor) else getattr(copy, name).CopyFrom(value)
        return server.server.signer.sign(copy) if sign else copy

    def refused(code, match, altered) -> Details:
        return details_of(expect(code, match, stubs.sessions.ImportSession, pb.ImportSessionRequest(state=altered)))

    h = array_of(state.h)
    c = array_of(state.c)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    # a client cannot forge a state: any change without the server's key is refused
    forged = refused(invalid, "its signature does not match", changed(sign=False, tokens_seen=2**64 - 2))
    assert forged == bad_request("STATE_SIGNATURE_INVALID", "state")
    refused(invalid, "its signature does not match", changed(sign=False, mac=b""))
    refused(invalid, "which this server does not hold", changed(sign=False, key_id="old-deployment"))
    foreign = refused(grpc.StatusCode.PERMISSION_DENIED, "belongs to another tenant", changed(tenant="someone-else"))
    assert foreign == lstm_error("STATE_OTHER_TENANT")
    # and even a signed state is checked against the model and the limits before anything is stored
    too_far = refused(invalid, "tokens_seen 18446744073709551614 is beyond the limit", changed(tokens_seen=2**64 - 2))
    assert too_far == bad_request("INVALID_STATE", "state.tokens_seen")
    nan = refused(invalid, "state.h holds NaN", changed(h=tensor_of(np.where(h == h.flat[0], np.nan, h))))
    assert nan == bad_request("INVALID_TENSOR", "state.h")
    refused(invalid, "state.h holds values beyond +-1", changed(h=tensor_of(h * 0 + 1.5)))
    refused(invalid, "state.c holds values beyond", changed(c=tensor_of(c * 0 + 1e6)))
    refused(invalid, "state.c must have shape", changed(c=tensor_of(c[:1])))
    refused(invalid, "next_logits must be given exactly when", changed(next_logits=pb.Tensor()))
    other_version = refused(
        grpc.StatusCode.FAILED_PRECONDITION,
        "written by charlm version 7, but this server runs version 1",
        changed(model_version=7),
    )
    assert other_version == lstm_error("MODEL_VERSION_MISMATCH", "state.model_version")
    no_model = refused(grpc.StatusCode.NOT_FOUND, "no model 'nope'", changed(model="nope"))
    assert no_model == lstm_error("MODEL_NOT_FOUND", "state.model")
    bad_defaults = pb.SessionState()
    bad_defaults.CopyFrom(state)
    bad_defaults.defaults.top_p = 7.0
    bad = refused(invalid, "top_p must be in (0, 1]", server.server.signer.sign(bad_defaults))
    assert bad == bad_request("INVALID_SAMPLING", "defaults.top_p")
    before = len(list(stubs.sessions.ListSessions(pb.ListSessionsRequest(page_size=1000)).sessions))
    assert stubs.sessions.ImportSession(pb.ImportSessionRequest(state=state)).tokens_seen == state.tokens_seen
    after = len(list(stubs.sessions.ListSessions(pb.ListSessionsRequest(page_size=1000)).sessions))
    assert after == before + 1  # only the untouched state made a session


def test_chat_protocol_errors(stubs) -> None:
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "the first Chat message must name a session",
        stubs.generation.Chat,
        iter([pb.ChatRequest(text="hi")]),
    )
    assert details_of(error) == bad_request("CHAT_WITHOUT_SESSION", "session")
    session_id = new_session(stubs)
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "only the first Chat message may name",
        stubs.generation.Chat,
        iter([pb.ChatRequest(session_id=session_id), pb.ChatRequest(session_id=session_id, text="the ")]),
    )
    assert details_of(error) == bad_request("CHAT_SESSION_RENAMED", "session")
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "only the first Chat message may name",
        stubs.generation.Chat,
        iter([pb.ChatRequest(session_id=session_id), pb.ChatRequest(keep_session=True, text="the ")]),
    )
    assert details_of(error) == bad_request("CHAT_SESSION_RENAMED", "keep_session")


def test_session_limit(start_server) -> None:
    running = start_server(max_sessions=2)
    stubs = Stubs(running.address)
    first = new_session(stubs)
    new_session(stubs)
    error = expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "session limit reached: max_sessions is 2", new_session, stubs)
    assert details_of(error) == lstm_error("SESSION_LIMIT")  # no RetryInfo: sessions must be closed first
    expect(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "max_sessions is 2",
        stubs.sessions.ForkSession,
        pb.ForkSessionRequest(session_id=first),
    )
    stubs.sessions.CloseSession(pb.CloseSessionRequest(session_id=first))
    new_session(stubs)  # closing made room
    stubs.channel.close()


def test_message_size_limit(start_server) -> None:
    running = start_server(max_message_bytes=2000)
    stubs = Stubs(running.address)
    expect(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
        stubs.classification.Classify,
        pb.ClassifyRequest(model="sentiment", texts=["a" * 3000]),
    )
    stubs.channel.close()


def test_idle_sessions_expire_and_any_call_keeps_them_alive(start_server) -> None:
    import time

    running = start_server(idle_timeout_s=0.4)
    stubs = Stubs(running.address)
    kept, left = new_session(stubs), new_session(stubs)
    for _ in range(6):  # 0.6 s in all: GetSession, a read, keeps `kept` alive, as the Redis store does
        time.sleep(0.1)
        stubs.sessions.GetSession(pb.GetSessionRequest(session_id=kept))
    gone = pb.GetSessionRequest(session_id=left)
    expect(grpc.StatusCode.NOT_FOUND, "expired after 0.4 s idle", stubs.sessions.GetSession, gone)
    time.sleep(0.5)
    gone = pb.GetSessionRequest(session_id=kept)
    expect(grpc.StatusCode.NOT_FOUND, "expired after 0.4 s idle", stubs.sessions.GetSession, gone)


def test_a_busy_session_and_a_tenant_turn_limit_ask_for_a_retry_and_a_stranger_to_authenticate(
    start_server, tmp_path
) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("alice alice-token-0123456789\n")
    running = start_server(auth_tokens=str(tokens), tenant_max_turns=1)
    stubs = Stubs(running.address)
    alice = (("authorization", "Bearer alice-token-0123456789"),)
    create = pb.CreateSessionRequest(model="charlm", prompt=PROMPT)
    error = expect(grpc.StatusCode.UNAUTHENTICATED, "needs authentication", stubs.sessions.CreateSession, create)
    assert details_of(error) == lstm_error("UNAUTHENTICATED")
    busy, other = (stubs.sessions.CreateSession(create, metadata=alice).session_id for _ in range(2))
    with running.server.models.get("charlm").engine.paused() as wait_for_queued:
        stream = stubs.generation.Generate(pb.GenerateRequest(session_id=busy), metadata=alice)
        assert wait_for_queued(1)  # the turn has started: it waits for the held model thread
        error = expect(
            grpc.StatusCode.ABORTED,
            "busy with another turn",
            stubs.sessions.ForkSession,
            pb.ForkSessionRequest(session_id=busy),
            metadata=alice,
        )
        assert details_of(error) == lstm_error("SESSION_BUSY", retry_after_s=1.0)
        error = expect(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "(tenant_max_turns); wait for one to finish",
            stubs.generation.Generate,
            pb.GenerateRequest(session_id=other),
            metadata=alice,
        )
        assert details_of(error) == lstm_error("TENANT_TURN_LIMIT", retry_after_s=1.0)
    assert list(stream)[-1].finish_reason == pb.FINISH_REASON_LENGTH
    stubs.channel.close()


def test_malformed_requests_and_protocol_errors_have_reasons(stubs, server) -> None:
    raw = stubs.channel.unary_unary("/lstm.v1.Sessions/GetSession")  # bytes in and out
    error = expect(grpc.StatusCode.INVALID_ARGUMENT, "not a valid message of its type", raw, b"\xff\xff\xff")
    assert details_of(error) == lstm_error("MALFORMED_REQUEST")
    error = expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "must name a session",
        stubs.generation.Chat,
        iter([pb.ChatRequest(text="hi")]),
    )
    assert details_of(error) == bad_request("CHAT_WITHOUT_SESSION", "session")  # on a stream too
