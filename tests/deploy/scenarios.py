"""Checks that run against any gateway in front of the replicas: the loopback cluster and the compose stack.

Each takes ``connect``: a function that returns a ``Client`` of the gateway (TLS and the tenant's token) for
the given client settings.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lstm.v1 import lstm_pb2 as pb

from lstm_client import Client, LstmError, TlsConfig, Unavailable, tensor_values

Connect = Callable[..., Client]

PROMPT = "KING:\n"
SAMPLING = {"seed": 1234, "temperature": 0.8}
TURNS = [("", 24), ("\nQUEEN:\n", 24), (" and", 24)]


def run_turn(session, prompt: str, max_tokens: int) -> str:
    return "".join(chunk.text for chunk in session.generate(prompt, max_tokens=max_tokens))


def uninterrupted(client: Client, model: str) -> tuple[list[str], pb.SessionState]:
    """The text of every turn of one session that nothing disturbs, and its final state: what a disturbed one
    must reproduce."""
    with client.session(model=model, prompt=PROMPT, **SAMPLING) as session:
        return [run_turn(session, prompt, n) for prompt, n in TURNS], session.export()


def assert_same_state(state: pb.SessionState, expected: pb.SessionState) -> None:
    """Equal (h, c), next-character logits and count: the text alone says little about the state."""
    assert state.tokens_seen == expected.tokens_seen
    for name in ("h", "c", "next_logits"):
        got, want = getattr(state, name), getattr(expected, name)
        assert list(got.shape) == list(want.shape), name
        np.testing.assert_allclose(tensor_values(got), tensor_values(want), atol=1e-5)


def assert_sticky(connect: Connect, turns: int = 5, model: str = "charlm") -> None:
    """Every call of a session, its creation included, reaches one replica; sessions spread over replicas."""
    seen_replicas = set()
    with connect() as client:
        for _ in range(40):  # until sessions were seen on two replicas (all 40 on one: 2^-39 by chance)
            with client.session(model=model, prompt=PROMPT, **SAMPLING) as session:
                replicas = [session.last_replica]
                for _ in range(turns):
                    run_turn(session, "", 4)
                    replicas.append(session.last_replica)
                    session.refresh()
                    replicas.append(session.last_replica)
                assert len(set(replicas)) == 1 and replicas[0], replicas
                seen_replicas.add(replicas[0])
            if len(seen_replicas) > 1:
                return
    raise AssertionError(f"40 sessions all went to {seen_replicas}: the gateway does not spread them")


def assert_failover(
    connect: Connect,
    kill: Callable[[str], None],
    restart: Callable[[str], None] | None = None,
    model: str = "charlm",
) -> None:
    """Kill the replica holding a session between two turns: the next turn runs on another replica and the text
    is identical to an uninterrupted run; then restart the killed replica (if given) and check it serves again."""
    with connect() as client:
        expected, expected_state = uninterrupted(client, model)
        session = client.session(model=model, prompt=PROMPT, **SAMPLING)
        got = [run_turn(session, *TURNS[0])]
        victim = session.last_replica
        kill(victim)
        try:
            got += [run_turn(session, *TURNS[1])]
            assert session.last_replica and session.last_replica != victim, (victim, session.last_replica)
        finally:
            if restart is not None:
                restart(victim)
        got += [run_turn(session, *TURNS[2])]
        assert got == expected
        assert_same_state(session.export(), expected_state)
        session.close()


def assert_gateway_security(address: str, ca: str, token: str) -> None:
    """The gateway speaks TLS only, with the certificate the CA signed, and the replicas behind it check the token
    it forwards: none or a wrong one is UNAUTHENTICATED, health answers without one."""
    tls = TlsConfig(ca=ca)
    with Client(address, tls=tls, token=token) as client:
        assert {m.name for m in client.models()} >= {"charlm"}
    for wrong in (None, "x" + token):
        with Client(address, tls=tls, token=wrong, retries=0) as client, pytest.raises(LstmError) as failure:
            client.models()
        assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED, failure.value
    with Client(address, token=token, retries=0, timeout=5) as client, pytest.raises(Unavailable):
        client.models()  # plaintext to a TLS port
    with grpc.secure_channel(address, tls.credentials()) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
