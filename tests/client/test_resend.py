"""When the client resends a ``generate`` turn (lstm_client/resend.py, docs/client.md#retries), against a fake
server whose Generate fails as the test says and whose GetSession reports the session as the test says."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from lstm.v1 import lstm_pb2 as pb
from lstm.v1 import lstm_pb2_grpc as rpc

from lstm_client import AsyncClient, Client, LstmError, Unavailable

SESSION = "s" * 32
BEFORE = 7  # the session's count when created


class Flaky(rpc.SessionsServicer, rpc.GenerationServicer):
    """Generate fails its first ``failures`` calls with ``code`` (after sending ``sent`` first); later calls stream
    "ok". GetSession answers ``tokens_seen`` and ``busy``."""

    def __init__(self, failures: int, code=grpc.StatusCode.UNAVAILABLE, sent: str = "", tokens_seen=BEFORE, busy=False):
        self.failures, self.code, self.sent = failures, code, sent
        self.tokens_seen, self.busy = tokens_seen, busy
        self.generates = 0

    def CreateSession(self, request, context):
        return pb.Session(session_id=SESSION, model="charlm", tokens_seen=BEFORE)

    def CloseSession(self, request, context):
        return pb.CloseSessionResponse()

    def GetSession(self, request, context):
        return pb.Session(session_id=SESSION, model="charlm", tokens_seen=self.tokens_seen, busy=self.busy)

    def Generate(self, request, context):
        self.generates += 1
        if self.generates <= self.failures:
            if self.sent:
                yield pb.GenerateResponse(text=self.sent, tokens_seen=BEFORE + len(self.sent))
            context.abort(self.code, "the replica went away")
        yield pb.GenerateResponse(text="ok", tokens_seen=BEFORE + 2, finish_reason=pb.FINISH_REASON_LENGTH)


def run_turn(address: str, **settings) -> str:
    with Client(address, backoff=0.001, **settings) as client:
        session = client.session()
        return "".join(chunk.text for chunk in session.generate(max_tokens=2))


def test_a_turn_that_failed_unavailable_before_any_character_is_resent(fake_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lstm_client")
    servicer = Flaky(failures=2)
    assert run_turn(fake_server(servicer), retries=3) == "ok"
    assert servicer.generates == 3
    resends = [r.getMessage() for r in caplog.records if r.name == "lstm_client"]
    assert len(resends) == 2 and all("the replica went away" in m for m in resends), resends


@pytest.mark.parametrize(
    "servicer, generates",
    [
        (Flaky(failures=1, sent="a"), 1),  # a character arrived
        (Flaky(failures=1, tokens_seen=BEFORE + 3), 1),  # the session moved on: the turn may have been saved
        (Flaky(failures=1, busy=True), 1),  # a turn still runs on it
        (Flaky(failures=1, code=grpc.StatusCode.INTERNAL), 1),  # not a lost replica
        (Flaky(failures=5), 4),  # retries=3: four attempts, then the failure
    ],
    ids=["after-a-character", "session-changed", "session-busy", "internal", "retries-used-up"],
)
def test_a_turn_is_not_resent_otherwise(fake_server, servicer, generates) -> None:
    with pytest.raises(LstmError) as failure:
        run_turn(fake_server(servicer), retries=3)
    assert failure.value.code == servicer.code and "the replica went away" in failure.value.details
    assert servicer.generates == generates


def test_retries_0_resends_nothing(fake_server) -> None:
    servicer = Flaky(failures=1)
    with pytest.raises(Unavailable):
        run_turn(fake_server(servicer), retries=0)
    assert servicer.generates == 1


def test_the_asyncio_client_resends_alike(fake_server) -> None:
    servicer = Flaky(failures=1)
    address = fake_server(servicer)

    async def run() -> str:
        async with AsyncClient(address, backoff=0.001) as client, client.session() as session:
            return "".join([chunk.text async for chunk in session.generate(max_tokens=2)])

    assert asyncio.run(run()) == "ok" and servicer.generates == 2
