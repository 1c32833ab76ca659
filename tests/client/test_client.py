"""The client library: gRPC's retry policy for the idempotent calls only, deadlines on every call (streams
included), typed errors with their rich details, and the asyncio twin's parity with the sync client."""

from __future__ import annotations

import asyncio
import inspect
import math

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from lstm.v1 import lstm_pb2 as pb
from lstm.v1 import lstm_pb2_grpc as rpc

from lstm_client import (
    AsyncChat,
    AsyncClient,
    AsyncSession,
    Chat,
    Client,
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    LstmError,
    NotFound,
    Session,
    Unavailable,
)
from lstm_client.errors import DETAILS_KEY, rich_details

from .conftest import Deadlines


class Flaky(rpc.ClassificationServicer, rpc.SessionsServicer):
    """Answers UNAVAILABLE to the first ``failures`` calls of each method."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}

    def _count(self, name: str, context) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try later")

    def Classify(self, request, context):
        self._count("Classify", context)
        return pb.ClassifyResponse(results=[pb.ClassifyResult(label="positive", probabilities={"positive": 1.0})])

    def CreateSession(self, request, context):
        self._count("CreateSession", context)
        return pb.Session(session_id="x")


# -- retries -------------------------------------------------------------------------------------------------------


def test_idempotent_calls_are_retried_on_unavailable(fake_server) -> None:
    servicer = Flaky(failures=2)
    with Client(fake_server(servicer), retries=3, backoff=0.01) as client:
        assert client.classify(["x"])[0].label == "positive"
    assert servicer.calls["Classify"] == 3


def test_retries_give_up_with_a_typed_error(fake_server) -> None:
    servicer = Flaky(failures=10)
    with Client(fake_server(servicer), retries=2, backoff=0.01) as client, pytest.raises(Unavailable) as raised:
        client.classify(["x"])
    assert servicer.calls["Classify"] == 3 and raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert "try later" in str(raised.value)


def test_non_idempotent_calls_are_not_retried(fake_server) -> None:
    servicer = Flaky(failures=1)
    with Client(fake_server(servicer), retries=4, backoff=0.01) as client, pytest.raises(Unavailable):
        client.session(model="charlm")
    assert servicer.calls["CreateSession"] == 1


def test_the_retries_are_grpcs_own_policy(fake_server) -> None:
    """With gRPC's retries switched off in the channel options, nothing retries: there is no loop of our own."""
    servicer = Flaky(failures=1)
    options = [("grpc.enable_retries", 0)]
    with Client(fake_server(servicer), retries=3, backoff=0.01, options=options) as client:
        with pytest.raises(Unavailable):
            client.classify(["x"])
    assert servicer.calls["Classify"] == 1


def test_async_client_retries_too(fake_server) -> None:
    servicer = Flaky(failures=1)
    address = fake_server(servicer)

    async def run():
        async with AsyncClient(address, retries=2, backoff=0.01) as client:
            return await client.classify(["x"])

    assert asyncio.run(run())[0].label == "positive" and servicer.calls["Classify"] == 2


@pytest.mark.parametrize(
    ("retries", "backoff"), [(5, 0.1), (-1, 0.1), (True, 0.1), (1.5, 0.1), (2, 0), (2, 1e-6), (2, math.inf)]
)
def test_retry_settings_are_checked(retries, backoff) -> None:
    with pytest.raises(ValueError, match=r"retries|backoff"):
        Client("127.0.0.1:1", retries=retries, backoff=backoff)


# -- deadlines -----------------------------------------------------------------------------------------------------


def run_every_kind_of_call(client: Client, **timeout: float) -> None:
    """A unary call, a Generate stream and a Chat stream (its opening and one turn)."""
    client.classify(["x"], **timeout)
    session = Session(client, pb.Session(session_id="s" * 32))
    assert "".join(chunk.text for chunk in session.generate("x", **timeout)) == "ab"
    with session.chat(**timeout) as chat:
        assert [chunk.text for chunk in chat.send("hi")] == ["HI"]


def test_the_timeout_is_the_deadline_of_every_call_streams_included(fake_server) -> None:
    servicer = Deadlines()
    with Client(fake_server(servicer), timeout=7) as client:
        run_every_kind_of_call(client)
        run_every_kind_of_call(client, timeout=3)  # each call's own
    for method in ("Classify", "Generate", "Chat"):
        default, own = servicer.remaining[method][0], servicer.remaining[method][-1]
        assert 6 < default < 7.1 and 2 < own < 3.1, (method, servicer.remaining[method])  # gRPC rounds up


def test_no_timeout_means_no_deadline(fake_server) -> None:
    servicer = Deadlines()
    with Client(fake_server(servicer), timeout=None) as client:
        run_every_kind_of_call(client)
    remaining = [value for values in servicer.remaining.values() for value in values]
    assert len(remaining) == 4 and all(value is None or value > 1e6 for value in remaining), remaining


@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf])
def test_a_timeout_that_is_not_above_0_is_refused(timeout: float) -> None:
    with pytest.raises(ValueError, match="above 0, or None for no deadline"):
        Client("127.0.0.1:1", timeout=timeout)
    with Client("127.0.0.1:1") as client, pytest.raises(ValueError, match="above 0"):
        client.classify(["x"], timeout=timeout)


def test_streams_past_their_deadline_raise_deadline_exceeded(fake_server) -> None:
    address = fake_server(Deadlines())
    with Client(address, timeout=0.2) as client:
        session = Session(client, pb.Session(session_id="s" * 32))
        with pytest.raises(DeadlineExceeded):
            list(session.generate("hang"))
        with session.chat() as chat, pytest.raises(DeadlineExceeded):
            list(chat.send("hang"))

    async def run() -> None:
        async with AsyncClient(address, timeout=0.2) as client:
            session = AsyncSession(client, pb.Session(session_id="s" * 32))
            with pytest.raises(DeadlineExceeded):
                [chunk async for chunk in session.generate("hang")]
            async with session.chat() as chat:
                with pytest.raises(DeadlineExceeded):
                    [chunk async for chunk in chat.send("hang")]

    asyncio.run(run())


# -- errors --------------------------------------------------------------------------------------------------------


def packed(message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


class RichErrors(rpc.ClassificationServicer):
    """Fails Classify with a ``google.rpc.Status`` carrying ErrorInfo, BadRequest and RetryInfo; plainly for
    the text "plain"."""

    def Classify(self, request, context):
        if request.texts[0] == "plain":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "plain")
        bad = error_details_pb2.BadRequest()
        bad.field_violations.add(field="texts[1]", description="must not be empty")
        bad.field_violations.add(field="model", description="no such model")
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(1500)
        info = error_details_pb2.ErrorInfo(reason="EMPTY_TEXT", domain="lstm.v1")
        details = [packed(info), packed(bad), packed(retry)]
        status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="two fields are wrong", details=details)
        context.abort_with_status(rpc_status.to_status(status))


def assert_rich(error: LstmError) -> None:
    assert isinstance(error, InvalidArgument) and error.details == "two fields are wrong"
    assert error.reason == "EMPTY_TEXT" and error.retry_delay == 1.5
    assert error.field_violations == (
        FieldViolation("texts[1]", "must not be empty"),
        FieldViolation("model", "no such model"),
    )


def test_errors_carry_the_rich_details_when_present(fake_server) -> None:
    address = fake_server(RichErrors())
    with Client(address) as client:
        with pytest.raises(InvalidArgument) as raised:
            client.classify(["x", ""])
        assert_rich(raised.value)
        with pytest.raises(LstmError) as raised:
            client.classify(["plain"])
    plain = raised.value
    assert plain.code == grpc.StatusCode.RESOURCE_EXHAUSTED and plain.details == "plain"
    assert plain.reason is None and plain.field_violations == () and plain.retry_delay is None

    async def run() -> LstmError:
        async with AsyncClient(address) as client:
            try:
                await client.classify(["x", ""])
            except LstmError as error:
                return error
        raise AssertionError("no error")

    assert_rich(asyncio.run(run()))


def test_details_that_do_not_parse_are_ignored() -> None:
    assert rich_details([(DETAILS_KEY, b"\xff\xff not a status")]) == {}
    assert rich_details([("other-bin", b"x")]) == {} and rich_details(None) == {}


def test_typed_errors_carry_the_status_code_and_the_servers_details(server) -> None:
    """The reasons and fields of docs/observability.md's error model, from the real server."""
    with Client(server.address) as client:
        with pytest.raises(NotFound) as raised:
            client.attach("0" * 32)
        assert raised.value.code == grpc.StatusCode.NOT_FOUND and isinstance(raised.value, LstmError)
        assert raised.value.reason == "SESSION_NOT_FOUND"
        with pytest.raises(InvalidArgument, match="not in the model's vocabulary"):
            client.session(model="charlm", prompt="§")
        with client.session(model="charlm", prompt="KING:") as session, pytest.raises(InvalidArgument) as raised:
            list(session.generate(max_tokens=-1))
        assert raised.value.reason == "INVALID_SAMPLING"
        assert [(v.field, v.reason) for v in raised.value.field_violations] == [
            ("sampling.max_tokens", "INVALID_SAMPLING")
        ]


# -- the example, and the asyncio twin -----------------------------------------------------------------------------


def test_the_design_example_works(server) -> None:
    with Client(server.address) as client:
        results = client.classify(["a gorgeous film", "dull and lifeless"], model="sentiment")
        assert results[0].label in ("negative", "positive") and set(results[0].probabilities) == {
            "negative",
            "positive",
        }
        with client.session(model="charlm") as session:
            text = "".join(c.text for c in session.generate("KING:", max_tokens=30, temperature=0.8, seed=7))
            assert session.id in {s.session_id for s in client.list_sessions("charlm")}
        assert len(text) == 30
        assert session.id not in {s.session_id for s in client.list_sessions()}


def public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_the_asyncio_classes_have_the_sync_ones_methods() -> None:
    assert public(AsyncClient) == public(Client) and public(AsyncSession) == public(Session)
    assert public(AsyncChat) - public(Chat) == {"open"}
    for name in public(Client) - {"asyncio", "deadline", "metadata", "chat", "session"}:
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name


def test_async_session_streams_like_the_sync_one(server) -> None:
    async def run() -> str:
        async with AsyncClient(server.address) as client, client.session(model="charlm", prompt="KING:") as session:
            chunks = [chunk async for chunk in session.generate(max_tokens=25, seed=5)]
            assert chunks[-1].finish_reason == "length" and session.last_replica == "test-replica"
            assert (await session.refresh()).tokens_seen == len("KING:") + 25
            return "".join(c.text for c in chunks)

    with Client(server.address) as client, client.session(model="charlm", prompt="KING:") as session:
        expected = "".join(c.text for c in session.generate(max_tokens=25, seed=5))
    assert asyncio.run(run()) == expected


def test_the_async_client_steps_describes_attaches_forks_exports_imports_and_lists(server) -> None:
    with Client(server.address) as client, client.session(model="charlm", prompt="KING:", seed=3) as original:
        sync_step, described = client.step("charlm", text="KING:"), client.describe("charlm")

        async def run() -> list[str]:
            async with AsyncClient(server.address) as aclient:
                step = await aclient.step("charlm", text="KING:")
                assert step.probabilities == sync_step.probabilities and step.h == sync_step.h
                assert await aclient.describe("charlm") == described
                attached = await aclient.attach(original.id)
                assert attached.info.tokens_seen == len("KING:")
                opened = await aclient.session(model="charlm").open()  # the spelling before session() was awaitable
                await opened.close()
                fork = await attached.fork()
                imported = await aclient.import_session(await fork.export())
                listed = {s.session_id for s in await aclient.list_sessions("charlm")}
                assert {original.id, fork.id, imported.id} <= listed and len({fork.id, imported.id}) == 2
                texts = []
                for session in (fork, imported):
                    async with session:
                        texts.append("".join([c.text async for c in session.generate(max_tokens=12)]))
                return texts

        texts = asyncio.run(run())
        assert texts == 2 * ["".join(c.text for c in original.generate(max_tokens=12))]
