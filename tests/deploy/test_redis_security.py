"""The Redis session store behind a password and over TLS (``rediss://``), through real servers: what the
compose stack and ``make cluster`` rely on (a password), and what a managed Redis usually needs (TLS)."""

from __future__ import annotations

from pathlib import Path

import certs
import cluster
import pytest
import redis

from lstm_client import Client
from lstm_server.app import StartupError

from ..serving import ServerThread

PASSWORD = "p4ss-" + "0123456789abcdef" * 2
STATE_KEYS = "k2:second-key-for-tests-0123456789,k1:first-key-for-tests-0123456789"


def redis_conf(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "redis.conf"
    path.write_text(f"requirepass {PASSWORD}\n")
    return path


def store(url: str, **overrides) -> dict:
    return {"session_store": "redis", "redis_url": url, "state_keys": STATE_KEYS, **overrides}


def carries_on(models: Path, url: str) -> str:
    """A session made on one replica continues on a second one that shares the store: its state went through
    Redis. Returns the session's id."""
    first, second = ServerThread(models, **store(url)), ServerThread(models, **store(url))
    try:
        with Client(first.address) as one, Client(second.address) as two:
            session = one.session(model="charlm", prompt="KING:", seed=5)
            text = "".join(c.text for c in session.generate(max_tokens=10))
            moved = two.attach(session.id)
            assert moved.info.tokens_seen == len("KING:") + 10 and len(text) == 10
            assert len("".join(c.text for c in moved.generate(max_tokens=6))) == 6
            assert session.refresh().tokens_seen == len("KING:") + 16  # the first replica reloads the newer state
            return session.id
    finally:
        first.stop()
        second.stop()


@pytest.fixture
def tls_files(tmp_path) -> certs.DevCerts:
    return certs.write_dev_certs(tmp_path / "tls", clients=["lstm-server"])


def start_tls_redis(workdir: Path, binary: str, made: certs.DevCerts, *, client_certs: bool = False):
    """redis-server with a password, TLS only (no plaintext port); skips where this build has no TLS."""
    port = cluster.free_port()
    tls = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(made.server_cert)]
    tls += ["--tls-key-file", str(made.server_key), "--tls-ca-cert-file", str(made.ca)]
    tls += ["--tls-auth-clients", "yes" if client_certs else "no"]
    try:
        return cluster.start_redis(workdir, port, binary, config=redis_conf(workdir), extra_args=tls)
    except cluster.ClusterError as error:
        if "tls" in str(error).lower():
            pytest.skip(f"this redis-server has no TLS: {str(error).splitlines()[-1]}")
        raise


def test_a_password_protected_store(exported, redis_binary, tmp_path) -> None:
    server = cluster.start_redis(tmp_path / "r", cluster.free_port(), redis_binary, config=redis_conf(tmp_path / "r"))
    try:
        url = f"redis://:{PASSWORD}@{server.address}/0"
        session_id = carries_on(exported, url)
        host, port = server.address.split(":")
        with redis.Redis(host=host, port=int(port), password=PASSWORD) as direct:
            assert direct.hget(f"lstm:session:{session_id}", "tenant") is not None
        with redis.Redis(host=host, port=int(port)) as anonymous, pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
        # A wrong password: the server gives up at start, saying why, without showing either password.
        with pytest.raises(StartupError) as failure:
            ServerThread(exported, **store(f"redis://:wrong-{PASSWORD}@{server.address}/0", store_connect_timeout_s=0))
        message = str(failure.value)
        assert f"redis at redis://:***@{server.address}/0" in message and PASSWORD not in message
    finally:
        cluster.stop(server)


def test_a_tls_store_rediss(exported, redis_binary, tls_files, tmp_path) -> None:
    server = start_tls_redis(tmp_path / "r", redis_binary, tls_files)
    try:
        url = f"rediss://:{PASSWORD}@{server.address}/0?ssl_ca_certs={tls_files.ca}"
        carries_on(exported, url)
        # The store's certificate is checked: another CA's trust is refused.
        other = certs.write_dev_certs(tmp_path / "other")
        with pytest.raises(StartupError) as failure:
            bad = f"rediss://:{PASSWORD}@{server.address}/0?ssl_ca_certs={other.ca}"
            ServerThread(exported, **store(bad, store_connect_timeout_s=0))
        assert "certificate verify failed" in str(failure.value) and PASSWORD not in str(failure.value)
        # Plaintext to the TLS port gets nowhere.
        with pytest.raises(StartupError):
            ServerThread(exported, **store(f"redis://:{PASSWORD}@{server.address}/0", store_connect_timeout_s=0))
    finally:
        cluster.stop(server)


def test_a_tls_store_that_requires_client_certificates(exported, redis_binary, tls_files, tmp_path) -> None:
    server = start_tls_redis(tmp_path / "r", redis_binary, tls_files, client_certs=True)
    try:
        cert, key = tls_files.clients["lstm-server"]
        url = f"rediss://:{PASSWORD}@{server.address}/0?ssl_ca_certs={tls_files.ca}"
        carries_on(exported, f"{url}&ssl_certfile={cert}&ssl_keyfile={key}")
        with pytest.raises(StartupError):  # no client certificate
            ServerThread(exported, **store(url, store_connect_timeout_s=0))
    finally:
        cluster.stop(server)
