"""Classify's memory per request (issue 20): the server's RSS before, at its peak and settled after each request.

One ``lstm-server`` process (``bench/serve_generation.py``'s ``start_server``, ``--threads`` 1 by default, any
``--server-arg`` passed on) gets one Classify request per case, one after the other, smallest first. Per case:
RSS before the request (``VmRSS`` of ``/proc/<pid>/status``), the peak while it ran (``VmHWM``, reset before the
request through ``/proc/<pid>/clear_refs``, and ``VmRSS`` polled every 10 ms, whichever is higher) and RSS
settled ``--settle-s`` seconds after the answer (default 5). A case is ``KIND:TEXTSxCHARS``: TEXTS texts of
CHARS characters of one kind of text:

- ``prose``: English sentences, about 5 characters per token of the sentiment tokenizer;
- ``dots``: ``.`` repeated, one token per character;
- ``integrals``: U+2A0C repeated (NFKC makes it four integral signs), four tokens per character: the most tokens
  (so the most model work and memory) any character makes with the sentiment tokenizer (checked over every
  character NFKC changes).

The default cases end with the worst request the server's defaults allow: ``max_classify_texts`` texts of
``max_classify_chars`` characters of ``integrals`` (256 x 4096: 4.2 million tokens), after smaller ones.
``--server-src DIR`` runs another checkout's server (``git archive <commit> server | tar -x -C DIR``) with this
venv's Python and ``PYTHONPATH=DIR/server/src``. ``--guard-mb`` (default 12000)
kills the server when its RSS passes it (the case reads "killed"; the cases after it are not run), so a run on
a shared machine cannot take all of its memory.

    .venv/bin/python bench/classify_memory.py                                  # the default cases
    .venv/bin/python bench/classify_memory.py --cases prose:64x4096 dots:256x4096 --settle-s 10
    .venv/bin/python bench/classify_memory.py --server-arg=--model-versions=sentiment=1   # the fp32 entry
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import serve_generation as sg

from lstm_client import Client
from lstm_server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
PROSE = (
    "A gorgeous film, with a terrible plot and wonderful acting; the kind of movie you forgive for its ending "
    "because the first hour was so good. "
)
KINDS = {"prose": PROSE, "dots": ".", "integrals": "\u2a0c"}
POLL_S = 0.01


def text_of(kind: str, chars: int) -> str:
    unit = KINDS[kind]
    return (unit * (chars // len(unit) + 1))[:chars]


def default_cases() -> list[str]:
    texts = ServerConfig.model_fields["max_classify_texts"].default
    chars = ServerConfig.model_fields["max_classify_chars"].default
    return [
        f"prose:1x{chars}",
        f"prose:64x{chars}",
        f"dots:16x{chars}",
        f"prose:{texts}x{chars}",
        f"dots:{texts}x{chars}",
        f"integrals:{texts}x{chars}",
    ]


def status_kb(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of process ``pid`` in kB; empty once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {
        key: int(value.split()[0])
        for key, _, value in (line.partition(":") for line in lines)
        if key in ("VmRSS", "VmHWM")
    }


def reset_peak(pid: int) -> bool:
    """Reset ``VmHWM`` of ``pid`` to its current RSS (``clear_refs`` 5); False where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Case:
    spec: str
    kind: str
    texts: int
    chars: int
    before_mb: float = 0.0
    peak_mb: float = 0.0
    settled_mb: float = 0.0
    seconds: float = 0.0
    outcome: str = "ok"

    @classmethod
    def parse(cls, spec: str) -> Case:
        kind, _, size = spec.partition(":")
        texts, _, chars = size.partition("x")
        if kind not in KINDS or not texts.isdigit() or not chars.isdigit():
            raise argparse.ArgumentTypeError(f"{spec!r}: expected KIND:TEXTSxCHARS, KIND one of {sorted(KINDS)}")
        return cls(spec, kind, int(texts), int(chars))


class Watch:
    """Polls the server's RSS while a request runs: the highest seen, and a kill past ``guard_kb``."""

    def __init__(self, pid: int, guard_kb: int) -> None:
        self.pid, self.guard_kb = pid, guard_kb
        self.highest_kb = 0
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = status_kb(self.pid).get("VmRSS", 0)
            self.highest_kb = max(self.highest_kb, rss)
            if rss > self.guard_kb and not self.killed:
                self.killed = True
                os.kill(self.pid, signal.SIGKILL)
            self._stop.wait(POLL_S)


def measure(client: Client, pid: int, case: Case, settle_s: float, guard_kb: int, timeout_s: float) -> None:
    texts = [text_of(case.kind, case.chars)] * case.texts
    case.before_mb = status_kb(pid)["VmRSS"] / 1024
    hwm_reset = reset_peak(pid)
    started = time.perf_counter()
    with Watch(pid, guard_kb) as watch:
        try:
            results = client.classify(texts, timeout=timeout_s)
            assert len(results) == case.texts
        except Exception as error:  # the report says what happened
            case.outcome = "killed past --guard-mb" if watch.killed else f"failed: {type(error).__name__}: {error}"
    case.seconds = time.perf_counter() - started
    peaks = [watch.highest_kb, status_kb(pid).get("VmHWM", 0) if hwm_reset else 0]
    case.peak_mb = max(peaks) / 1024
    if case.outcome == "ok":
        time.sleep(settle_s)
        case.settled_mb = status_kb(pid)["VmRSS"] / 1024


def token_count(kind: str, chars: int, models: Path) -> int:
    """Tokens of one text of the case, by the served sentiment entry's tokenizer (the highest version's)."""
    from tokenizers import Tokenizer

    version = max((p for p in (models / "sentiment").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return len(Tokenizer.from_file(str(version / "tokenizer.json")).encode(text_of(kind, chars)).ids)


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
        return commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--threads", type=int, default=1, help="the server's --threads (default 1)")
    parser.add_argument("--cases", nargs="+", type=Case.parse, help="KIND:TEXTSxCHARS ... (default: see above)")
    parser.add_argument("--settle-s", type=float, default=5.0, help="wait after each answer before 'settled'")
    parser.add_argument("--guard-mb", type=float, default=12000, help="kill the server past this RSS")
    parser.add_argument("--timeout-s", type=float, default=900, help="deadline of each request")
    parser.add_argument("--server-arg", action="append", default=[], help="one argument for the server")
    parser.add_argument("--server-src", type=Path, help="run this checkout's server (its server/src first)")
    args = parser.parse_args(argv)
    cases = args.cases or [Case.parse(spec) for spec in default_cases()]
    print(
        f"commit {git_commit()}{f'; server from {args.server_src}' if args.server_src else ''}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"server --threads {args.threads} {' '.join(args.server_arg)}",
        flush=True,
    )
    env = {"PYTHONPATH": str(args.server_src.resolve() / "server" / "src")} if args.server_src else None
    server = sg.start_server(args.models, args.threads, extra=tuple(args.server_arg), env=env)
    try:
        time.sleep(1)
        start_mb = status_kb(server.pid)["VmRSS"] / 1024
        print(f"server pid {server.pid}, RSS at start {start_mb:.0f} MB", flush=True)
        print(
            "| case | tokens/text | token-rows | s | RSS before MB | peak MB | settled MB "
            "| peak - before, KB/char | settled - start MB |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        with Client(server.address) as client:
            for case in cases:
                tokens = token_count(case.kind, case.chars, args.models)
                measure(client, server.pid, case, args.settle_s, int(args.guard_mb * 1024), args.timeout_s)
                per_char = (case.peak_mb - case.before_mb) * 1024 / (case.texts * case.chars)
                settled = f"{case.settled_mb:.0f}" if case.outcome == "ok" else case.outcome
                grown = f"{case.settled_mb - start_mb:+.0f}" if case.outcome == "ok" else ""
                print(
                    f"| {case.spec} | {tokens} | {tokens * case.texts} | {case.seconds:.1f} | {case.before_mb:.0f} | "
                    f"{case.peak_mb:.0f} | {settled} | {per_char:.2f} | {grown} |",
                    flush=True,
                )
                if case.outcome != "ok":
                    break
    finally:
        sg.cluster.stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
