"""Data-parallel training with torchrun on CPU (gloo): every process ends with the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from lstm_training.checkpoint import load_checkpoint

from ..models import sentiment_args

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(TORCHRUN + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_two_process_ddp_ends_with_identical_weights(tmp_path, corpus_file) -> None:
    run([str(Path(__file__).with_name("ddp_worker.py")), str(corpus_file), str(tmp_path)], cwd=tmp_path)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], atol=0, rtol=0, msg=name)
    history = load_checkpoint(tmp_path / "last.pt")["metrics"]
    assert len(history) == 2 and history[1]["val_loss"] < history[0]["val_loss"]


def test_cli_under_torchrun_trains_and_writes_one_checkpoint(tmp_path, sst_files) -> None:
    run(["-m", "lstm_training.cli", *sentiment_args(*sst_files, tmp_path / "out")], cwd=tmp_path)
    payload = load_checkpoint(tmp_path / "out" / "best.pt", expected_kind="sentiment")
    assert payload["command"].startswith("lstm-train sentiment")
