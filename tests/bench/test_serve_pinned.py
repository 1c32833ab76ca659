"""bench/serve_pinned.py's smoke run (``--quick``) on the shipped charlm/2: the served / in-process lines and their
numbers, alone and as an A/B of the working tree against itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

pytestmark = [
    pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed"),
    pytest.mark.skipif(len(CPUS) < 2, reason="needs two usable cores: one for the server, one for the client"),
    pytest.mark.skipif(not (ROOT / "models" / "charlm" / "2").is_dir(), reason="no shipped models/charlm/2"),
]


def run_quick(*extra: str) -> str:
    command = [sys.executable, str(ROOT / "bench" / "serve_pinned.py"), "--quick", "--versions", "2"]
    command += ["--server-cores", str(CPUS[0]), "--client-cores", str(CPUS[1]), *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def numbers(line: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*\.?\d*", line)]


def test_the_quick_run_prints_a_positive_ratio_per_concurrency() -> None:
    out = run_quick("--concurrency", "1", "2")
    assert "nproc" in out and "command:" in out
    rows = [line for line in out.splitlines() if re.match(r"\| [12] \| A \|", line)]
    assert len(rows) == 2
    for line in rows:  # sessions, served, in-process, ratio, TTFT, ITL p99: all positive
        assert all(value > 0 for value in numbers(line)[:6]), line
    ratios = re.findall(r"served / in-process, charlm/2 \(int8\), (\d) session\(s\): ([\d.]+)", out)
    assert [n for n, _ in ratios] == ["1", "2"]
    assert all(float(ratio) > 0 for _, ratio in ratios)
    assert f"server A [{CPUS[0]}]" in out and f"load generator [{CPUS[1]}]" in out  # pinned as asked


def test_an_ab_run_against_the_same_checkout_prints_both_ratios() -> None:
    out = run_quick("--concurrency", "1", "--ab", str(ROOT))
    match = re.search(r"1 session\(s\): A ([\d.]+), B ([\d.]+), B/A ([\d.]+)", out)
    assert match, out
    assert all(float(value) > 0 for value in match.groups())
    assert out.count(f"lstm_server from {ROOT / 'server' / 'src'}") == 2
