"""The compose stack (docker-compose.yml) through its gateway: sessions stay on one replica, a session whose
replica is killed carries on, on the other one, with the same text, and a restarted replica gets sessions again.

Needs the running stack: ``make compose-test`` (deploy/compose-test.sh) brings it up under Docker or podman and runs
this file with LSTM_COMPOSE_GATEWAY (host:port of the gateway), LSTM_COMPOSE_HTTP (its HTTPS base URL),
LSTM_COMPOSE_PROJECT (the compose project, whose
containers carry the label com.docker.compose.project) and LSTM_COMPOSE_SECRETS (the stack's secrets folder, made by
deploy/credentials.py: the CA that signed the gateway's certificate and the tenant ``dev``'s token).
LSTM_COMPOSE_ENGINE names the container CLI (podman, or docker for a stack brought up with docker compose), which
the script sets to the engine it used.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import credentials
import pytest
import requests

from lstm_client import Client, TlsConfig
from lstm_client.errors import Unavailable

from .scenarios import assert_failover, assert_gateway_security, assert_sticky

GATEWAY = os.environ.get("LSTM_COMPOSE_GATEWAY", "")
HTTP = os.environ.get("LSTM_COMPOSE_HTTP", "")  # the gateway's HTTPS base URL
PROJECT = os.environ.get("LSTM_COMPOSE_PROJECT", "")
SECRETS = Path(os.environ.get("LSTM_COMPOSE_SECRETS", "deploy/secrets"))
ENGINE = os.environ.get("LSTM_COMPOSE_ENGINE", "podman")
HEALTHY_TIMEOUT_S = 120.0

pytestmark = pytest.mark.skipif(
    not (GATEWAY and PROJECT),
    reason="needs the compose stack: run `make compose-test`, which sets LSTM_COMPOSE_GATEWAY, LSTM_COMPOSE_PROJECT "
    "and LSTM_COMPOSE_SECRETS",
)


def token() -> str:
    return credentials.read_token(SECRETS / "auth-tokens", credentials.TENANT)


def connect(**settings: Any) -> Client:
    """A client of the gateway: TLS against the stack's CA, the tenant dev's token."""
    return Client(GATEWAY, token=token(), tls=TlsConfig(ca=SECRETS / "ca.pem"), **settings)


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ENGINE, *args], check=check, capture_output=True, text=True, timeout=60)


def container_of(replica: str) -> str:
    """The container of the compose service named ``replica`` (its LSTM_SERVER_REPLICA_NAME is the same name)."""
    names = run(
        "ps",
        "-a",
        "--filter",
        f"label=com.docker.compose.project={PROJECT}",
        "--filter",
        f"label=com.docker.compose.service={replica}",
        "--format",
        "{{.Names}}",
    ).stdout.split()
    assert len(names) == 1, f"expected one container for service {replica!r} of {PROJECT!r}, found {names}"
    return names[0]


def kill(replica: str) -> None:
    run("kill", "--signal", "KILL", container_of(replica))


def healthy(container: str) -> bool:
    if ENGINE == "podman":  # podman runs no health checks by itself here: run it
        return run("healthcheck", "run", container, check=False).returncode == 0
    status = run("inspect", "--format", "{{.State.Health.Status}}", container, check=False).stdout.strip()
    return status == "healthy"


def restart(replica: str) -> None:
    """Start the killed replica again (its restart policy may have done so already) and wait until it is healthy."""
    container = container_of(replica)
    run("start", container)
    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    while not healthy(container):
        assert time.monotonic() < deadline, f"{container} not healthy {HEALTHY_TIMEOUT_S:.0f}s after a restart"
        time.sleep(1.0)


def sessions_reach(replica: str, timeout_s: float = 30.0) -> bool:
    """Whether new sessions through the gateway land on ``replica`` again within ``timeout_s``.

    Until the gateway has looked the names up again (every GATEWAY_RESOLVE_INTERVAL_S), it may know only stale
    addresses and answer UNAVAILABLE; after its reload, connections made before it stay with the old worker. So
    each attempt is a new connection, and UNAVAILABLE means "not yet".
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with connect(retries=0) as client:
            try:
                with client.session(model="charlm", prompt="KING:\n") as session:
                    if session.last_replica == replica:
                        return True
            except Unavailable:
                pass
        time.sleep(0.2)
    return False


def test_the_gateway_is_tls_and_the_replicas_check_the_token() -> None:
    assert_gateway_security(GATEWAY, str(SECRETS / "ca.pem"), token())


def test_session_stays_on_one_replica() -> None:
    assert_sticky(connect)


def test_session_survives_the_loss_of_its_replica() -> None:
    assert_failover(connect, kill=kill, restart=restart)


def test_a_restarted_replica_gets_sessions_again() -> None:
    """A restarted container may come back on another address; the gateway must find it there."""
    kill("replica-2")
    restart("replica-2")
    assert sessions_reach("replica-2"), "no new session reached replica-2 after its restart"


def test_http_through_the_gateway_is_tls_authenticated_and_sticky() -> None:
    """The HTTP port through the gateway: HTTPS against the stack's CA, the token required, a sequence's requests
    (with ``x-sequence-id``) on one replica, an OpenAI completion."""
    ca, auth = str(SECRETS / "ca.pem"), {"authorization": f"Bearer {token()}"}
    assert requests.get(f"{HTTP}/v2/health/ready", verify=ca, timeout=30).status_code == 200
    assert requests.get(f"{HTTP}/v1/models", verify=ca, timeout=30).status_code == 401
    replicas = set()
    for i in range(3):
        body = {"text_input": "KING:\n", "max_tokens": 10, "sequence_id": 9, "sequence_start": i == 0}
        headers = {**auth, "x-sequence-id": "9"}
        answer = requests.post(f"{HTTP}/v2/models/charlm/generate", json=body, headers=headers, verify=ca, timeout=60)
        assert answer.status_code == 200, answer.text
        replicas.add(answer.headers["x-replica"])
    assert len(replicas) == 1
    body = {"model": "charlm", "prompt": "KING:\n", "max_tokens": 10, "temperature": 0}
    completion = requests.post(f"{HTTP}/v1/completions", json=body, headers=auth, verify=ca, timeout=60)
    assert completion.status_code == 200 and len(completion.json()["choices"][0]["text"]) == 10
