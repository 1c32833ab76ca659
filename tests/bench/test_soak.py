"""bench/soak.py's smoke run: a few seconds, four sessions, on the shipped models; the CSV has its rows and the run
exits 0 (no error code, the server alive)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not (ROOT / "models" / "charlm").is_dir(), reason="no shipped models/charlm")


def test_a_short_soak_writes_its_samples_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "soak.csv"
    command = [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.2", "--interval-s", "4"]
    command += ["--sessions", "4", "--turn-timeout-s", "20", "--csv", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) >= 3, rows
    assert all(row["errors"] == "none" for row in rows)
    assert all(float(row["rss_mib"]) > 0 and int(row["fds"]) > 0 for row in rows)
    assert sum(int(row["turns"]) for row in rows) > 0 and float(rows[-1]["elapsed_s"]) >= 11
    assert "summary over" in done.stdout and "errors by code: none" in done.stdout
