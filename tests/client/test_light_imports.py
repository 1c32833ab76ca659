"""The client's tests run without torch and onnxruntime: the client needs neither, and its tests reach real servers
in subprocesses (``lstm-server`` on models/) and the onnxruntime reference in another, so their process never loads
them. tests/conftest.py stays light for the same reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "onnxruntime")
CLIENT_TESTS = Path(__file__).resolve().parent


def heavy_modules() -> list[str]:
    """The heavy packages (and their submodules) this process has loaded."""
    return sorted(name for name in sys.modules if name.split(".")[0] in HEAVY)


def test_the_client_tests_load_neither_torch_nor_onnxruntime(request: pytest.FixtureRequest, tmp_path) -> None:
    """Runs last (tests/client/conftest.py orders it). When this session holds client tests only, it looks at this
    process, which collected and ran them all; otherwise other folders' modules, collected first, have loaded torch
    here, so the client tests run alone in a subprocess, whose own run of this test looks at its process."""
    if all(CLIENT_TESTS in Path(item.path).resolve().parents for item in request.session.items):
        assert heavy_modules() == [], "the client's tests loaded these (find the import and make it lazy or move it)"
        return
    repo = CLIENT_TESTS.parents[1]
    command = [sys.executable, "-m", "pytest", str(CLIENT_TESTS), "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [*command, "--basetemp", str(tmp_path / "basetemp")], cwd=repo, capture_output=True, text=True, timeout=280
    )
    assert done.returncode == 0, f"pytest tests/client alone failed:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    assert " passed" in done.stdout.splitlines()[-1] and " failed" not in done.stdout.splitlines()[-1]
