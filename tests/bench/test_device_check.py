"""bench/device_check.py on the CPU, on the tiny exported models: it runs, every invariance check holds, the
throughput table has its rows, and a device onnxruntime cannot use is refused in one line (exit 2)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "device_check.py"


@pytest.fixture
def module(monkeypatch):
    """bench/device_check.py imported in the test process."""
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    loaded = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "device_check", loaded)  # its dataclasses look their module up
    spec.loader.exec_module(loaded)
    return loaded


def device_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )


def table(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header starts with ``header``, as lists of cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_cpu_run_holds_and_reports_every_batch(exported, tmp_path):
    out = tmp_path / "device_check.md"
    done = device_check(
        *("--models", str(exported), "--device", "cpu", "--batches", "1,4", "--invariance-batches", "4,16"),
        *("--steps", "3", "--seconds", "0.05", "--matmul-size", "128", "--threads", "1", "--out", str(out)),
    )
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "### device_check.py on cpu" in text and "onnxruntime " in text and "MatMul 128x128 fp32 on cpu" in text

    rates = table(text, "| entry | graph |")
    got = sorted((r[0], r[1], int(r[2])) for r in rates)
    want = sorted(
        (entry, graph, batch)
        for entry, graph in (
            ("charlm/1", "model.onnx (step)"),
            ("charlm/1", "decode.onnx"),
            ("sentiment/1", "model.onnx (classify)"),
        )
        for batch in (1, 4)
    )
    assert got == want
    for r in rates:
        assert float(r[4].replace(",", "")) > 0 and float(r[5].replace(",", "")) > 0  # µs per call, chars/s

    checks = table(text, "| entry | invariance check |")
    assert {(c[0], c[1]) for c in checks} == {
        ("charlm/1", "step, 6-token prompt"),
        ("charlm/1", "decode, greedy, K 3"),
        ("charlm/1", "decode, seeded, K 3"),
        ("sentiment/1", "classify, padded among longer texts"),
    }
    assert all(c[2] == "4, 16" and c[3] == "held" for c in checks), checks
    assert re.search(r"bitwise, .*: all 4 held\.", text)


def test_cuda_without_its_provider_is_refused_in_one_line(exported):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    done = device_check("--models", str(exported), "--device", "cuda", "--batches", "1")
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA provider" in lines[0] and lines[0].startswith("device_check.py: error:")


def test_a_difference_breaks_the_check(module):
    alone = [{"logits": np.array([1.0, 2.0], np.float32), "sampled": np.array([3, 4])}]
    assert module.compare(alone, [{k: v.copy() for k, v in alone[0].items()}]) == (True, "")
    nudged = np.nextafter(np.float32(2.0), np.float32(3.0))
    held, detail = module.compare(
        alone, [{"logits": np.array([1.0, nudged], np.float32), "sampled": alone[0]["sampled"]}]
    )
    assert not held and detail.startswith("logits max abs diff 2.38e-07")


def test_a_broken_check_is_reported_and_exits_1(module, exported, monkeypatch, tmp_path):
    monkeypatch.setattr(module, "compare", lambda alone, batched: (False, "logits max abs diff 1e-07"))
    out = tmp_path / "broken.md"
    args = ["--models", str(exported), "--device", "cpu", "--batches", "1", "--invariance-batches", "4"]
    assert module.main([*args, "--steps", "2", "--seconds", "0.01", "--matmul-size", "64", "--out", str(out)]) == 1
    text = out.read_text()
    assert "| broken: batch 4: logits max abs diff 1e-07 |" in text and "all 4 held" not in text
    assert "4 of 4 broken" in text
