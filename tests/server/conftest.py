"""Fixtures of the server's tests: a server in the test process on the tiny exported models, raw stubs, the
in-process reference, private redis-servers."""

from __future__ import annotations

import cluster
import pytest

from ..reference import Reference
from ..serving import ServerThread, Stubs


@pytest.fixture(scope="module")
def server(exported):
    running = ServerThread(exported)
    yield running
    running.stop()


@pytest.fixture
def start_server(exported):
    """Start servers with special settings; all are stopped at the end of the test."""
    started = []

    def start(**overrides) -> ServerThread:
        running = ServerThread(exported, **overrides)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def stubs(server):
    made = Stubs(server.address)
    yield made
    made.channel.close()


@pytest.fixture(scope="module")
def reference(exported) -> Reference:
    return Reference(exported / "charlm" / "1")


@pytest.fixture
def start_redis(redis_binary, tmp_path):
    """Start private redis-servers (stopped at the end of the test); returns cluster.Process objects."""
    started = []

    def start(name: str = "redis") -> cluster.Process:
        process = cluster.start_redis(tmp_path / name, cluster.free_port(), redis_binary)
        started.append(process)
        return process

    yield start
    for process in started:
        cluster.stop(process)
