"""``python -m lstm_server.healthcheck`` (the container images' health check) against a real server: usage with
``--help``, SERVING for the server and for a service, and an unknown service named with the ones that exist."""

from __future__ import annotations

import subprocess
import sys


def healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "lstm_server.healthcheck", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_help_prints_the_usage() -> None:
    done = healthcheck("--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m lstm_server.healthcheck")
    assert "[address] [service]" in done.stdout and "``" not in done.stdout


def test_serving_for_the_server_and_for_a_service(server) -> None:
    for service in ((), ("lstm.v1.Classification",)):
        done = healthcheck(server.address, *service, "--timeout", "5")
        assert (done.returncode, done.stdout) == (0, "SERVING\n")


def test_an_unknown_service_is_named_with_the_services_that_exist(server) -> None:
    done = healthcheck(server.address, "lstm.v1.Nope")
    assert done.returncode == 1
    assert done.stdout.startswith(
        "NOT_FOUND: the server has no health status for the service 'lstm.v1.Nope' (it knows "
    )
    assert "lstm.v1.Classification, lstm.v1.Generation" in done.stdout and "grpc." not in done.stdout
