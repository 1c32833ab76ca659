"""The compose topology as loopback processes (deploy/cluster.py): routing, failover, Redis outages."""

from __future__ import annotations

import json
import os
import signal

import cluster as topology
import grpc
import pytest

from lstm_client import Client, LstmError

from .scenarios import (
    PROMPT,
    SAMPLING,
    TURNS,
    assert_failover,
    assert_same_state,
    assert_sticky,
    run_turn,
    uninterrupted,
)


@pytest.fixture(scope="module")
def running(exported, tmp_path_factory):
    try:
        topology.ensure_packages()
    except topology.ClusterError as error:
        pytest.skip(f"cannot run the loopback cluster: {error}")
    workdir = tmp_path_factory.mktemp("cluster")
    cluster = topology.up(workdir, exported, replicas=2, threads=1, drain_delay_s=0)
    yield cluster
    cluster.down()


def replace(cluster: topology.Cluster, name: str, process: topology.Process) -> None:
    cluster.replicas = [process if r.name == name else r for r in cluster.replicas]


def test_calls_of_a_session_reach_one_replica(running):
    assert_sticky(running.gateway.address)


def test_kill_9_between_turns_continues_identically_on_another_replica(running):
    def kill(name: str) -> None:
        topology.stop(running.replica(name), signal.SIGKILL)

    def restart(name: str) -> None:
        replace(running, name, topology.restart(running.replica(name)))

    assert_failover(running.gateway.address, kill, restart)


def test_graceful_restart_loses_no_turn(running):
    with Client(running.gateway.address) as client:
        expected, expected_state = uninterrupted(client, "charlm")
        session = client.session(model="charlm", prompt=PROMPT, **SAMPLING)
        got = [run_turn(session, *TURNS[0])]
        for name in [r.name for r in running.replicas]:  # every replica restarts: nothing survives in memory
            topology.stop(running.replica(name), signal.SIGTERM)
            replace(running, name, topology.restart(running.replica(name)))
        got += [run_turn(session, *turn) for turn in TURNS[1:]]
        assert got == expected
        assert_same_state(session.export(), expected_state)


def test_redis_outage_is_unavailable_then_recovers_without_corruption(running):
    with Client(running.gateway.address, retries=0) as client:
        expected, expected_state = uninterrupted(client, "charlm")
        session = client.session(model="charlm", prompt=PROMPT, **SAMPLING)
        got = [run_turn(session, *TURNS[0])]
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
                assert "session store unavailable (redis at" in failure.value.details
                assert "retry when the store is back" in failure.value.details
        finally:
            running.redis = topology.restart(running.redis)
        got += [run_turn(session, *turn) for turn in TURNS[1:]]
        assert got == expected
        assert_same_state(session.export(), expected_state)
        assert session.refresh().tokens_seen == len(PROMPT) + sum(len(p) + n for p, n in TURNS)


def test_cluster_command_writes_state_and_stops_what_it_started(exported, tmp_path):
    workdir = tmp_path / "c"
    assert topology.main(["up", "--dir", str(workdir), "--models", str(exported), "--replicas", "2"]) == 0
    state = json.loads((workdir / "state.json").read_text())
    pids = [state["gateway"]["pid"], state["redis"]["pid"], *(r["pid"] for r in state["replicas"])]
    assert [r["name"] for r in state["replicas"]] == ["replica-1", "replica-2"]
    with Client(state["gateway"]["address"]) as client:
        assert {m.name for m in client.models()} == {"charlm", "sentiment"}
    assert topology.main(["down", "--dir", str(workdir)]) == 0
    assert not (workdir / "state.json").exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
