"""``lstm-client``: classify's labels in the model's order, ``--json`` for every command, ``-`` for standard input,
``--version``, ``--timeout``, help on everything, and chat's Ctrl-C (stops an answer, keeps the session; at the
prompt, quits with 130) and line history, through a pseudo-terminal. Against the real server (one that allows
very long answers) and fake ones."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import cluster
import pexpect
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from lstm.v1 import lstm_pb2 as pb
from lstm.v1 import lstm_pb2_grpc as rpc

from lstm_client import Client
from lstm_client.cli import build_parser
from lstm_client.cli import main as cli_main

from .conftest import Deadlines, Recorder, serve

CLI = str(Path(sys.executable).with_name("lstm-client"))
LABELS = ["zeta", "alpha", "mu", "beta", "kappa", "omega", "delta", "gamma"]  # neither sorted nor hash order


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """A real server that allows answers far longer than a test waits for (to stop them with Ctrl-C)."""
    running = serve(tmp_path_factory.mktemp("long-server"), "--max-tokens-limit", "10000000")
    yield running
    cluster.stop(running)


def run_cli(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], input=stdin, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines()]


class Labelled(rpc.ClassificationServicer, rpc.ModelsServicer):
    """A classifier whose labels come in a fixed order that is neither sorted nor the order they were set in."""

    def Classify(self, request, context):
        probabilities = {label: (i + 1) / 100 for i, label in enumerate(sorted(LABELS))}
        return pb.ClassifyResponse(
            results=[pb.ClassifyResult(label="alpha", probabilities=probabilities) for _ in request.texts]
        )

    def DescribeModel(self, request, context):
        return pb.ModelInfo(name=request.model, task="classification", labels=LABELS)


def test_classify_prints_the_labels_in_the_models_order(fake_server, capsys) -> None:
    address = fake_server(Labelled())
    assert cli_main(["--server", address, "classify", "one", "two"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].endswith("\tone")
    assert [part.split()[0] for part in lines[0].split("\t")[1].split("  ")] == LABELS
    assert cli_main(["--server", address, "--json", "classify", "one"]) == 0
    (record,) = json_lines(capsys.readouterr().out)
    assert record["text"] == "one" and record["label"] == "alpha" and list(record["probabilities"]) == LABELS


def test_classify_reads_stdin_and_prints_json(long_server) -> None:
    done = run_cli(
        "--server",
        long_server.address,
        "--json",
        "classify",
        "first",
        "-",
        stdin="a gorgeous film\n\ndull and lifeless\n",
    )
    assert done.returncode == 0, done.stderr
    records = json_lines(done.stdout)
    assert [r["text"] for r in records] == ["first", "a gorgeous film", "dull and lifeless"]
    with Client(long_server.address) as client:
        expected = client.classify([r["text"] for r in records])
        labels = list(client.describe("sentiment").labels)
    for record, result in zip(records, expected, strict=True):
        assert record["label"] == result.label and list(record["probabilities"]) == labels
        assert record["probabilities"] == pytest.approx(result.probabilities)


def test_classify_splits_more_texts_than_one_call_takes_and_keeps_their_order(long_server) -> None:
    """600 lines through ``-`` (the server takes 256 per call): three calls, every line answered in input order, each
    as the library classifies it alone."""
    texts = [f"{'a gorgeous film' if i % 3 else 'dull and lifeless'} {i}" for i in range(600)]
    done = run_cli("--server", long_server.address, "--json", "classify", "-", stdin="".join(t + "\n" for t in texts))
    assert done.returncode == 0, done.stderr
    records = json_lines(done.stdout)
    assert [r["text"] for r in records] == texts
    with Client(long_server.address) as client:
        for i in (0, 1, 255, 256, 257, 599):
            (expected,) = client.classify([texts[i]])
            assert records[i]["label"] == expected.label
            assert records[i]["probabilities"] == pytest.approx(expected.probabilities)
    plain = run_cli("--server", long_server.address, "classify", "--batch-size", "7", *texts[:20])
    assert plain.returncode == 0 and [line.split("\t")[-1] for line in plain.stdout.splitlines()] == texts[:20]


class Limited(Labelled):
    """A classifier that takes at most 3 texts per call (refused as the real server does) and records each call's."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def Classify(self, request, context):
        self.sizes.append(len(request.texts))
        if len(request.texts) > 3:
            info = error_details_pb2.ErrorInfo(reason="TOO_MANY_TEXTS", domain="lstm.v1")
            detail = any_pb2.Any()
            detail.Pack(info)
            message = f"{len(request.texts)} texts in one call; the limit is 3 (max_classify_texts): split the batch"
            status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
            context.abort_with_status(rpc_status.to_status(status))
        return super().Classify(request, context)


def test_classify_batch_size_and_a_server_with_a_lower_limit(fake_server, capsys) -> None:
    servicer = Limited()
    address = fake_server(servicer)
    texts = [str(i) for i in range(8)]
    assert cli_main(["--server", address, "classify", "--batch-size", "3", *texts]) == 0
    assert servicer.sizes == [3, 3, 2]
    assert [line.split("\t")[-1] for line in capsys.readouterr().out.splitlines()] == texts
    assert cli_main(["--server", address, "classify", *texts]) == 1
    assert "the limit is 3" in (err := capsys.readouterr().err) and "lower --batch-size" in err
    with pytest.raises(SystemExit):
        cli_main(["--server", address, "classify", "--batch-size", "0", "x"])
    assert "--batch-size: a whole number above 0" in capsys.readouterr().err


def test_classify_names_a_line_that_is_not_utf8_and_can_replace_its_bytes(fake_server) -> None:
    address = fake_server(Labelled())
    latin1 = b"fine\ncaf\xe9\n"
    done = subprocess.run([CLI, "--server", address, "classify", "-"], input=latin1, capture_output=True, timeout=60)
    assert done.returncode == 1 and done.stdout == b""
    error = done.stderr.decode()
    assert error.startswith("lstm-client: line 2 of standard input is not UTF-8 (byte 0xe9 at byte 4)")
    assert "--replace-invalid" in error and "surrogate" not in error and error.count("\n") == 1
    argument = subprocess.run([CLI, "--server", address, "classify", "ok", b"caf\xe9"], capture_output=True, timeout=60)
    assert argument.returncode == 1 and b"TEXT 2 is not UTF-8" in argument.stderr
    replaced = subprocess.run(
        [CLI, "--server", address, "--json", "classify", "--replace-invalid", "-"], input=latin1, capture_output=True
    )
    assert replaced.returncode == 0, replaced.stderr
    assert [r["text"] for r in json_lines(replaced.stdout.decode())] == ["fine", "caf\ufffd"]


def test_classify_refuses_an_empty_text_naming_it(fake_server, capsys, monkeypatch) -> None:
    recorder = Recorder()
    address = fake_server(recorder)
    assert cli_main(["--server", address, "classify", "fine", ""]) == 1
    assert (
        capsys.readouterr().err == "lstm-client: TEXT 2 is empty or only whitespace: there is nothing to classify; "
        "remove it\n"
    )
    monkeypatch.setattr("sys.stdin", io.StringIO("fine\n\n   \n"))  # an empty line is skipped; spaces are not
    assert cli_main(["--server", address, "classify", "-"]) == 1
    assert "line 3 of standard input is empty or only whitespace" in capsys.readouterr().err
    assert recorder.calls == []  # refused before any call


def test_generate_reads_prompts_from_stdin(long_server) -> None:
    options = ["generate", "-", "--max-tokens", "7", "--seed", "4", "--temperature", "0"]
    done = run_cli("--server", long_server.address, "--json", *options, stdin="KING:\nQUEEN:\n")
    assert done.returncode == 0, done.stderr
    records = json_lines(done.stdout)
    assert [(r["prompt"], len(r["text"]), r["finish_reason"]) for r in records] == [
        ("KING:", 7, "length"),
        ("QUEEN:", 7, "length"),
    ]
    assert [r["tokens_seen"] for r in records] == [len("KING:") + 7, len("QUEEN:") + 7]
    plain = run_cli("--server", long_server.address, *options, stdin="KING:\nQUEEN:\n")
    assert plain.stdout == "".join(r["text"] + "\n" for r in records)  # greedy: the same text again
    with Client(long_server.address) as client:
        assert not {r["session_id"] for r in records} & {s.session_id for s in client.list_sessions(page_size=1000)}


def test_sessions_as_json(fake_server, capsys) -> None:
    recorder = Recorder(sessions=3)
    assert cli_main(["--server", fake_server(recorder), "--json", "sessions"]) == 0
    records = json_lines(capsys.readouterr().out)
    assert [r["session_id"] for r in records] == [s.session_id for s in recorder.sessions]
    assert set(records[0]) == {
        "session_id",
        "model",
        "model_version",
        "tokens_seen",
        "busy",
        "created_at",
        "last_used_at",
    }


def test_version() -> None:
    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout == f"lstm-client {version('lstm-client')}\n"


def test_every_option_and_command_has_help() -> None:
    def parsers(parser: argparse.ArgumentParser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, choice.dest
                for sub in action.choices.values():
                    yield from parsers(sub)

    for parser in parsers(build_parser()):
        for action in parser._actions:
            assert action.help, f"{parser.prog}: {action.option_strings or action.dest} has no help"


def test_timeout_is_each_calls_deadline(fake_server, capsys) -> None:
    servicer = Deadlines()
    address = fake_server(servicer)
    assert cli_main(["--server", address, "--timeout", "4", "classify", "x"]) == 0
    assert 3 < servicer.remaining["Classify"][-1] < 4.1
    assert cli_main(["--server", address, "classify", "x"]) == 0  # the default
    assert 29 < servicer.remaining["Classify"][-1] < 30.1
    done = run_cli("--server", address, "classify", "hang", env={"LSTM_CLIENT_TIMEOUT": "0.2"})
    assert done.returncode == 1 and done.stderr.startswith("lstm-client: DEADLINE_EXCEEDED")
    for bad in ("0", "-1", "soon"):
        with pytest.raises(SystemExit) as raised:
            cli_main(["--server", address, "--timeout", bad, "classify", "x"])
        assert raised.value.code == 2 and "--timeout: a number of seconds above 0" in capsys.readouterr().err


def test_chat_reads_a_pipe_and_prints_json(long_server) -> None:
    options = ["chat", "--max-tokens", "5", "--seed", "2", "--no-history"]
    done = run_cli("--server", long_server.address, "--json", *options, stdin="KING:\nthe good\n")
    assert done.returncode == 0, done.stderr
    first, second = json_lines(done.stdout)
    assert first["session_id"] == second["session_id"] and first["prompt"] == "KING:\n"
    assert [len(first["text"]), first["finish_reason"], first["tokens_seen"]] == [5, "length", len("KING:\n") + 5]
    assert second["tokens_seen"] == first["tokens_seen"] + len("the good\n") + 5
    with Client(long_server.address) as client:
        assert first["session_id"] not in {s.session_id for s in client.list_sessions(page_size=1000)}


def new_session(client: Client, before: set[str]) -> pb.Session:
    (session,) = [s for s in client.list_sessions(page_size=1000) if s.session_id not in before]
    return session


def settled_session(client: Client, before: set[str], timeout_s: float = 10.0) -> pb.Session:
    """The new session once its stopped turn has settled: the prompt comes back as soon as the client cancels,
    and the server ends the turn (one model call, the save) just after; a next turn sent meanwhile waits for it."""
    deadline = time.monotonic() + timeout_s
    while (session := new_session(client, before)).busy:
        assert time.monotonic() < deadline, "the stopped turn never settled"
        time.sleep(0.02)
    return session


def as_from_a_shell() -> None:
    """In the chat's child, before it execs: Ctrl-C as a shell leaves it (SIGINT at its default and not blocked).
    A signal ignored or blocked in the test process would carry over the exec, and Python then never raises
    KeyboardInterrupt: the chat would not stop (seen in full runs only, never with tests/client alone)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def spawn_chat(server, *options: str) -> pexpect.spawn:
    return pexpect.spawn(
        CLI,
        ["--server", server.address, "chat", "--max-tokens", "5000000", "--stop", "@@", *options],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        encoding="utf-8",
        timeout=30,
        preexec_fn=as_from_a_shell,
    )


def test_a_terminal_child_of_this_process_execs_while_grpc_runs_here(fake_server) -> None:
    """spawn_chat forks this process while gRPC runs in it: each child must reach its command (with gRPC's fork
    support on, about one in seven died first, SIGABRT after "epoll_wait error: Bad file descriptor":
    tests/client/__init__.py)."""
    with Client(fake_server(Labelled())) as client:
        client.describe("sentiment")  # the channel and gRPC's poller are up
        for _ in range(30):
            child = pexpect.spawn("/bin/echo", ["exec'd"], encoding="utf-8", timeout=10)
            child.expect(pexpect.EOF)
            child.close()
            assert child.before.strip() == "exec'd" and child.exitstatus == 0, (child.before, child.signalstatus)


def test_chat_ctrl_c_stops_the_answer_keeps_the_session_and_quits_at_the_prompt(long_server, tmp_path) -> None:
    history = tmp_path / "state" / "history"
    with Client(long_server.address) as client:
        before = {s.session_id for s in client.list_sessions(page_size=1000)}
        chat = spawn_chat(long_server, "--history", str(history))
        try:
            chat.expect_exact("you> ")
            seen = []
            for line in ("KING:", "the good"):
                chat.sendline(line)
                chat.expect_exact("charlm> ")
                chat.expect(r"(?s).{200}")  # the answer is streaming
                chat.sendintr()  # Ctrl-C during the answer: stops it
                chat.expect_exact("you> ")  # and the chat goes on
                session = settled_session(client, before)
                seen.append((session.session_id, session.tokens_seen))
            chat.sendintr()  # Ctrl-C at the prompt: quits
            chat.expect(pexpect.EOF)
        finally:
            chat.close(force=True)
        assert chat.exitstatus == 130
        (first_id, first), (second_id, second) = seen
        assert first_id == second_id  # one session across the stopped answers
        assert first > len("KING:\n") + 100 and second > first + len("the good\n") + 100
        assert first_id not in {s.session_id for s in client.list_sessions(page_size=1000)}  # closed on the way out
    assert history.read_text().splitlines()[-2:] == ["KING:", "the good"]
    assert history.stat().st_mode & 0o777 == 0o600
