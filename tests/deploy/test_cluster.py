"""The compose topology as loopback processes (deploy/cluster.py): TLS and tokens at the gateway, routing, failover,
Redis outages, a password on Redis."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cluster as topology
import grpc
import pytest
import redis
import requests
from lstm.v1 import lstm_pb2 as pb

from lstm_client import LstmError, TlsConfig, Unavailable

from .scenarios import (
    PROMPT,
    SAMPLING,
    TURNS,
    assert_failover,
    assert_gateway_security,
    assert_same_state,
    assert_sticky,
    run_turn,
    uninterrupted,
)


@pytest.fixture(scope="module")
def running(exported, cluster_binaries, tmp_path_factory):
    """The topology of ``make cluster``. redis-server and nginx must be installed: ``cluster_binaries`` looks them
    up, installs nothing, and skips naming ``make test-deps``."""
    workdir = tmp_path_factory.mktemp("cluster")
    # max_tokens_limit: room for a turn that is surely still running when its replica is killed
    cluster = topology.up(workdir, exported, replicas=2, threads=1, drain_delay_s=0, max_tokens_limit=LONG_TURN)
    yield cluster
    cluster.down()


LONG_TURN = 1_000_000  # characters: seconds of generation for the tiny model


# nginx skips a replica whose connection failed for fail_timeout (1 s, up to 2 on its clock of whole seconds), also
# once it is back: a replica restarted less than that ago may still be skipped, and killing the other one then
# leaves none (502, "no live upstreams": docs/deployment.md). Kills wait for that.
SKIPPED_FOR_S = 2.1
skipped_until = [0.0]  # monotonic time when the last restarted replica is surely taken back


def replace(cluster: topology.Cluster, name: str, process: topology.Process) -> None:
    """Put the restarted ``process`` in place of the replica ``name``."""
    cluster.replicas = [process if r.name == name else r for r in cluster.replicas]
    skipped_until[0] = time.monotonic() + SKIPPED_FOR_S


def every_replica_taken_back() -> None:
    time.sleep(max(0.0, skipped_until[0] - time.monotonic()))


def kill_replica(cluster: topology.Cluster, name: str) -> None:
    """kill -9 the replica ``name``, once the gateway uses every replica again."""
    every_replica_taken_back()
    topology.stop(cluster.replica(name), signal.SIGKILL)


def redis_password(cluster: topology.Cluster) -> str:
    return (Path(cluster.secrets) / "redis-password").read_text().strip()


def test_the_gateway_is_tls_and_the_replicas_check_the_token(running):
    assert_gateway_security(running.gateway.address, running.ca, running.token)


def test_calls_of_a_session_reach_one_replica(running):
    assert_sticky(running.client)


def test_kill_9_between_turns_continues_identically_on_another_replica(running):
    def kill(name: str) -> None:
        kill_replica(running, name)

    def restart(name: str) -> None:
        replace(running, name, topology.restart(running.replica(name)))

    assert_failover(running.client, kill, restart)


def test_a_turn_right_after_kill_9_goes_to_the_next_replica_without_a_client_retry(running):
    """nginx resends a call that no replica took; a replica that comes back is used again after fail_timeout (1 s,
    at most 2 on nginx's clock), so killing the other one then leaves a replica to serve (with 5 s, both were
    skipped: 502)."""
    with running.client(retries=0) as client:
        expected, expected_state = uninterrupted(client, "charlm")
        session = client.session(model="charlm", prompt=PROMPT, **SAMPLING)
        got = [run_turn(session, *TURNS[0])]
        for turn in TURNS[1:]:  # the second kill is of the replica that took over, once the first is back
            victim = session.last_replica
            kill_replica(running, victim)
            try:
                got.append(run_turn(session, *turn))
            finally:
                replace(running, victim, topology.restart(running.replica(victim)))
            assert session.last_replica != victim
        assert got == expected
        assert_same_state(session.export(), expected_state)


def kill_holder_when(running, ready, victim: str, *, then=None) -> threading.Thread:
    """In a thread: once ``ready()``, kill -9 the replica ``victim``, then call ``then``."""

    def kill() -> None:
        deadline = time.monotonic() + 20
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.005)
        topology.stop(running.replica(victim), signal.SIGKILL)  # callers wait for every_replica_taken_back first
        if then is not None:
            then()

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


def test_a_replica_lost_before_the_first_character_is_resent_by_the_client(running, caplog):
    """Through the gateway, a replica killed after the call's headers and before any character reaches the client
    as a reset stream (RST_STREAM INTERNAL_ERROR, mapped to UNAVAILABLE); the session is unchanged, so the client
    resends the turn, which continues exactly on the next replica. Redis is stopped meanwhile, so the replica's
    first step of the turn (the revision check) holds it between the two."""
    caplog.set_level(logging.INFO, logger="lstm_client")
    every_replica_taken_back()
    with running.client() as client:
        expected, expected_state = uninterrupted(client, "charlm")
        session = client.session(model="charlm", prompt=PROMPT, **SAMPLING)
        got = [run_turn(session, *TURNS[0])]
        victim, session.last_replica = session.last_replica, None
        os.kill(running.redis.pid, signal.SIGSTOP)
        try:
            killer = kill_holder_when(
                running,
                lambda: session.last_replica is not None,  # the replica's headers arrived
                victim,
                then=lambda: os.kill(running.redis.pid, signal.SIGCONT),
            )
            with ThreadPoolExecutor(1) as pool:
                got.append(pool.submit(run_turn, session, *TURNS[1]).result(timeout=60))
            killer.join()
        finally:
            os.kill(running.redis.pid, signal.SIGCONT)
            replace(running, victim, topology.restart(running.replica(victim)))
        resends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resending the turn")]
        assert len(resends) == 1 and "RST_STREAM with error code 2" in resends[0], resends
        assert session.last_replica != victim
        got.append(run_turn(session, *TURNS[2]))
        assert got == expected
        assert_same_state(session.export(), expected_state)


def redis_has_unread_requests(cluster: topology.Cluster) -> bool:
    """Whether a connection to Redis holds bytes Redis has not read (/proc/net/tcp: a replica asked a stopped
    Redis)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if int(local.split(":")[1], 16) == cluster.redis.port and state != "0A" and int(queues.split(":")[1], 16):
            return True  # 0A: the listening socket
    return False


def test_an_idempotent_call_lost_mid_call_is_resent_by_the_client(running, caplog):
    """GetSession's replica is killed while it waits for a stopped Redis (after its headers went out): the gateway
    resets the stream, which gRPC's retry policy cannot resend; the client does, and the next replica answers."""
    caplog.set_level(logging.INFO, logger="lstm_client")
    every_replica_taken_back()
    with running.client() as client:
        session = client.session(model="charlm", prompt=PROMPT, **SAMPLING)
        victim = session.last_replica
        os.kill(running.redis.pid, signal.SIGSTOP)
        try:
            killer = kill_holder_when(
                running,
                lambda: redis_has_unread_requests(running),
                victim,
                then=lambda: os.kill(running.redis.pid, signal.SIGCONT),
            )
            with ThreadPoolExecutor(1) as pool:
                info = pool.submit(session.refresh).result(timeout=60)
            killer.join()
        finally:
            os.kill(running.redis.pid, signal.SIGCONT)
            replace(running, victim, topology.restart(running.replica(victim)))
        assert info.session_id == session.id and info.tokens_seen == len(PROMPT)
        assert session.last_replica != victim
        resends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resending a call")]
        assert len(resends) == 1 and "RST_STREAM with error code 2" in resends[0], resends


def test_a_replica_lost_after_characters_arrived_is_unavailable_and_not_resent(running, caplog):
    """A turn whose characters began to arrive is never resent: the client gets UNAVAILABLE (the gateway's reset),
    and the session keeps its last saved turn, so sending the turn again continues exactly."""
    caplog.set_level(logging.INFO, logger="lstm_client")
    every_replica_taken_back()
    with running.client() as client:
        expected, expected_state = uninterrupted(client, "charlm")
        session = client.session(model="charlm", prompt=PROMPT, **SAMPLING)
        got = [run_turn(session, *TURNS[0])]
        victim, received = session.last_replica, []
        killer = kill_holder_when(running, lambda: received, victim)
        try:
            with pytest.raises(Unavailable) as lost:
                for chunk in session.generate(TURNS[1][0], max_tokens=LONG_TURN):
                    received.append(chunk.text)
            killer.join()
        finally:
            replace(running, victim, topology.restart(running.replica(victim)))
        assert "RST_STREAM with error code 2" in lost.value.details
        assert not [r for r in caplog.records if r.getMessage().startswith("resending the turn")]
        assert session.refresh().tokens_seen == len(PROMPT) + len(TURNS[0][0]) + TURNS[0][1]  # the saved turn
        got += [run_turn(session, *turn) for turn in TURNS[1:]]
        assert got == expected
        assert_same_state(session.export(), expected_state)


def test_graceful_restart_loses_no_turn(running):
    with running.client() as client:
        expected, expected_state = uninterrupted(client, "charlm")
        session = client.session(model="charlm", prompt=PROMPT, **SAMPLING)
        got = [run_turn(session, *TURNS[0])]
        for name in [r.name for r in running.replicas]:  # every replica restarts: nothing survives in memory
            topology.stop(running.replica(name), signal.SIGTERM)
            replace(running, name, topology.restart(running.replica(name)))
        got += [run_turn(session, *turn) for turn in TURNS[1:]]
        assert got == expected
        assert_same_state(session.export(), expected_state)


def test_step_state_round_trips_through_the_gateway(running):
    """The bytes tensors of Step pass the gateway unchanged, and a (values, shape) state is accepted."""
    from lstm_client import tensor_values

    with running.client() as client:
        first = client.step("charlm", text="KING:")
        again = client.step("charlm", text="\n", state=first.state)
        plain = (tensor_values(first.h), list(first.h.shape)), (tensor_values(first.c), list(first.c.shape))
        assert client.step("charlm", text="\n", state=plain).probabilities == again.probabilities
        assert isinstance(first.h, pb.Tensor) and len(first.h.data) == 4 * len(tensor_values(first.h))


def test_redis_needs_the_password(running):
    host, port = running.redis.address.split(":")
    with redis.Redis(host=host, port=int(port), socket_timeout=5) as anonymous:
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
    password = redis_password(running)
    with redis.Redis(host=host, port=int(port), password=password, socket_timeout=5) as allowed:
        assert allowed.ping()
    assert all(password not in " ".join(p.command) for p in running.processes)  # never on a command line


def test_a_tenant_added_to_the_token_file_works_without_a_restart_and_sees_only_its_sessions(running):
    tokens = Path(running.secrets) / "auth-tokens"
    original = tokens.read_text()
    other = "other-tenant-token-" + os.urandom(8).hex()
    with running.client() as dev, dev.session(model="charlm", prompt=PROMPT) as mine:
        with open(tokens, "a") as handle:
            handle.write(f"other {other}\n")
        try:
            with dataclasses.replace(running, token=other).client(retries=0) as stranger:
                deadline = time.monotonic() + 20
                while True:  # the replicas re-read the file when it changes
                    try:
                        stranger.models()
                        break
                    except LstmError as error:
                        assert error.code == grpc.StatusCode.UNAUTHENTICATED
                        assert time.monotonic() < deadline, "the new token was not accepted within 20 s"
                        time.sleep(0.2)
                with pytest.raises(LstmError) as failure:
                    stranger.attach(mine.id)
                assert failure.value.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
            # ListSessions lists the sessions of the replica that answers: ask the one holding the session (on
            # loopback, plaintext with the token), a page of one at a time.
            holder = running.replica(mine.last_replica).address
            with running.client(holder) as direct:
                assert mine.id in {s.session_id for s in direct.list_sessions(page_size=1)}
            with dataclasses.replace(running, token=other).client(holder) as stranger:
                assert mine.id not in {s.session_id for s in stranger.list_sessions()}
        finally:
            tokens.write_text(original)


# Last of the tests on `running`: after Redis comes back, a replica's first store call may fail once (reported).
def test_redis_outage_is_unavailable_then_recovers_without_corruption(running):
    with running.client(retries=0) as client:
        expected, expected_state = uninterrupted(client, "charlm")
        session = client.session(model="charlm", prompt=PROMPT, **SAMPLING)
        got = [run_turn(session, *TURNS[0])]
        password = redis_password(running)
        topology.stop(running.redis)
        try:
            for call in (
                lambda: run_turn(session, *TURNS[1]),
                lambda: client.session(model="charlm", prompt=PROMPT),
                session.refresh,
            ):
                with pytest.raises(LstmError) as failure:
                    call()
                assert failure.value.code == grpc.StatusCode.UNAVAILABLE
                assert "session store unavailable (redis at redis://:***@127.0.0.1:" in failure.value.details
                assert "retry when the store is back" in failure.value.details
                assert password not in failure.value.details
        finally:
            running.redis = topology.restart(running.redis)
        got += [run_turn(session, *turn) for turn in TURNS[1:]]
        assert got == expected
        assert_same_state(session.export(), expected_state)
        assert session.refresh().tokens_seen == len(PROMPT) + sum(len(p) + n for p, n in TURNS)


def test_cluster_command_writes_state_and_stops_what_it_started(exported, cluster_binaries, tmp_path, capsys):
    workdir = tmp_path / "c"
    assert topology.main(["up", "--dir", str(workdir), "--models", str(exported), "--replicas", "2"]) == 0
    state_file = workdir / "state.json"
    assert state_file.stat().st_mode & 0o777 == 0o600  # it holds the token
    state = json.loads(state_file.read_text())
    pids = [state["gateway"]["pid"], state["redis"]["pid"], *(r["pid"] for r in state["replicas"])]
    assert [r["name"] for r in state["replicas"]] == ["replica-1", "replica-2"]
    assert state["tenant"] == "dev" and len(state["token"]) >= 32
    assert state["ca"] == str(workdir / "secrets" / "ca.pem")
    from lstm_client import Client

    with Client(state["gateway"]["address"], token=state["token"], tls=TlsConfig(ca=state["ca"])) as client:
        assert {m.name for m in client.models()} == {"charlm", "sentiment"}
        assert isinstance(client.list_sessions(), list)
    capsys.readouterr()
    assert topology.main(["env", "--dir", str(workdir)]) == 0
    exports = capsys.readouterr().out
    assert f"export LSTM_CLIENT_SERVER={state['gateway']['address']}\n" in exports
    assert f"export LSTM_CLIENT_TOKEN={state['token']}\n" in exports and "LSTM_CLIENT_CA=" in exports
    assert topology.main(["down", "--dir", str(workdir)]) == 0
    assert not state_file.exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_an_http_sequence_through_the_gateway_is_sticky_and_survives_kill_9(running):
    """Over HTTPS through the gateway: a sequence's requests (sent with ``x-sequence-id``) reach one replica; after
    kill -9 of that replica the next request continues the sequence on another, giving the text an uninterrupted
    sequence gives."""
    url = f"{running.http}/v2/models/charlm/generate"
    turns = [(PROMPT, 40), *TURNS]

    def request(sequence: int, i: int) -> requests.Response:
        prompt, length = turns[i]
        body = {"text_input": prompt, "max_tokens": length, "temperature": 0.8, "seed": 3 + i}
        body |= {"sequence_id": sequence, "sequence_start": i == 0, "sequence_end": i == len(turns) - 1}
        headers = {"authorization": f"Bearer {running.token}", "x-sequence-id": str(sequence)}
        response = requests.post(url, json=body, headers=headers, verify=running.ca, timeout=60)
        assert response.status_code == 200, response.text
        return response

    expected = [request(71, i).json()["text_output"] for i in range(len(turns))]
    first = [request(72, i) for i in range(2)]
    holder = first[0].headers["x-replica"]
    assert first[1].headers["x-replica"] == holder  # sticky
    kill_replica(running, holder)
    try:
        rest = [request(72, i) for i in range(2, len(turns))]
    finally:
        replace(running, holder, topology.restart(running.replica(holder)))
    assert all(response.headers["x-replica"] != holder for response in rest)
    assert [r.json()["text_output"] for r in first + rest] == expected
