"""The server and the chat CLI as real processes: graceful shutdown on SIGTERM, and a chat through a terminal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pexpect
from cluster import free_port
from lstm.v1 import lstm_pb2 as pb

from lstm_client import Client
from lstm_server.healthcheck import check

from ..serving import Stubs

BIN = Path(sys.executable).parent


def wait_for(predicate, timeout: float = 30.0, every: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(every)


def test_sigterm_drains_streams_and_exits_zero(exported, tmp_path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(
        [
            str(BIN / "lstm-server"),
            "--models",
            str(exported),
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--drain-delay-s",
            "2.0",
            "--grace-period-s",
            "20",
            "--threads",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: check(address, timeout_s=1) == "SERVING")
        client = Client(address)
        session = client.session(model="charlm", prompt="KING:\nthe ")
        received: list[str] = []
        finished = threading.Event()

        def read() -> None:
            for chunk in session.generate(max_tokens=3000, timeout=60):
                received.append(chunk.text)
            finished.set()

        reader = threading.Thread(target=read)
        reader.start()
        wait_for(lambda: received)
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: check(address, timeout_s=1) == "NOT_SERVING", timeout=2.0)
        reader.join(30)
        assert finished.is_set() and len("".join(received)) == 3000, "the running stream was cut off"
        assert process.wait(30) == 0
        log.flush()
        lines = (tmp_path / "server.log").read_text().splitlines()
        assert any('"message": "draining"' in line for line in lines)
        assert any('"message": "stopped"' in line for line in lines)
    finally:
        if process.poll() is None:
            process.kill()


def test_server_reports_a_missing_repository(tmp_path) -> None:
    result = subprocess.run(
        [str(BIN / "lstm-server"), "--models", str(tmp_path), "--port", "0", "--metrics-port", "0", "--http-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "no models found" in result.stderr


def test_chat_cli_through_a_pseudo_terminal(server) -> None:
    stubs = Stubs(server.address)
    before = {s.session_id for s in stubs.sessions.ListSessions(pb.ListSessionsRequest(page_size=1000)).sessions}
    chat = pexpect.spawn(
        str(BIN / "lstm-client"),
        ["--server", server.address, "chat", "--max-tokens", "20", "--seed", "3", "--stop", "@@"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        encoding="utf-8",
        timeout=30,
    )
    chat.expect("you> ")
    chat.sendline("KING:")
    chat.expect("charlm> ")
    chat.expect("you> ")
    first_answer = chat.before
    chat.sendline("the good")
    chat.expect("you> ")
    (session,) = [
        s
        for s in stubs.sessions.ListSessions(pb.ListSessionsRequest(page_size=1000)).sessions
        if s.session_id not in before
    ]
    assert session.tokens_seen == len("KING:\n") + 20 + len("the good\n") + 20  # one session across both turns
    assert len(first_answer.replace("\r\n", "\n").strip("\n")) > 0
    chat.sendline("")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    remaining = {s.session_id for s in stubs.sessions.ListSessions(pb.ListSessionsRequest(page_size=1000)).sessions}
    assert session.session_id not in remaining  # the CLI closes its session
    stubs.channel.close()


def test_classify_cli(server) -> None:
    result = subprocess.run(
        [str(BIN / "lstm-client"), "--server", server.address, "classify", "a gorgeous film", "dull"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[0] in ("positive", "negative")
    assert "positive" in lines[0] and lines[0].endswith("a gorgeous film")


def test_cli_reports_errors_with_the_status(server) -> None:
    result = subprocess.run(
        [str(BIN / "lstm-client"), "--server", server.address, "classify", "--model", "nope", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "NOT_FOUND: no model 'nope'" in result.stderr
