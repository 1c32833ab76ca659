"""The client library: retries only idempotent calls on UNAVAILABLE, typed errors, the asyncio twin."""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import pytest
from lstm.v1 import lstm_pb2 as pb
from lstm.v1 import lstm_pb2_grpc as rpc

from lstm_client import AsyncClient, Client, InvalidArgument, LstmError, NotFound, Unavailable


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


@pytest.fixture
def flaky():
    def start(failures: int):
        servicer = Flaky(failures)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        rpc.add_ClassificationServicer_to_server(servicer, server)
        rpc.add_SessionsServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append(server)
        return servicer, f"127.0.0.1:{port}"

    started: list[grpc.Server] = []
    yield start
    for server in started:
        server.stop(0)


def test_idempotent_calls_are_retried_on_unavailable(flaky) -> None:
    servicer, address = flaky(failures=2)
    with Client(address, retries=3, backoff=0.01) as client:
        assert client.classify(["x"])[0].label == "positive"
    assert servicer.calls["Classify"] == 3


def test_retries_give_up_with_a_typed_error(flaky) -> None:
    servicer, address = flaky(failures=10)
    with Client(address, retries=2, backoff=0.01) as client, pytest.raises(Unavailable) as raised:
        client.classify(["x"])
    assert servicer.calls["Classify"] == 3 and raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert "try later" in str(raised.value)


def test_non_idempotent_calls_are_not_retried(flaky) -> None:
    servicer, address = flaky(failures=1)
    with Client(address, retries=4, backoff=0.01) as client, pytest.raises(Unavailable):
        client.session(model="charlm")
    assert servicer.calls["CreateSession"] == 1


def test_async_client_retries_too(flaky) -> None:
    servicer, address = flaky(failures=1)

    async def run():
        async with AsyncClient(address, retries=2, backoff=0.01) as client:
            return await client.classify(["x"])

    assert asyncio.run(run())[0].label == "positive" and servicer.calls["Classify"] == 2


def test_typed_errors_carry_the_status_code(server) -> None:
    with Client(server.address) as client:
        with pytest.raises(NotFound) as raised:
            client.attach("0" * 32)
        assert raised.value.code == grpc.StatusCode.NOT_FOUND and isinstance(raised.value, LstmError)
        with pytest.raises(InvalidArgument, match="not in the model's vocabulary"):
            client.session(model="charlm", prompt="§")


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
