"""bench/serve_generation.py's split of a server's CPU by thread, on this test process."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import threading
import time
from pathlib import Path

import pytest

from lstm_server.engine.threads import name_os_thread

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def module(monkeypatch):
    """bench/serve_generation.py imported in the test process (it imports deploy/cluster.py by path)."""
    spec = importlib.util.spec_from_file_location("serve_generation", ROOT / "bench" / "serve_generation.py")
    loaded = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "serve_generation", loaded)
    spec.loader.exec_module(loaded)
    return loaded


def burn(seconds: float) -> None:
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        pass


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc")
def test_the_cpu_of_a_named_model_thread_and_of_the_main_thread_are_told_apart(module) -> None:
    pid = os.getpid()
    assert set(module.threads_cpu_s(pid)) == {"event loop", "model threads", "other threads"}
    seen: dict[str, float] = {}

    def model() -> None:  # measured from inside: once it ends, its time leaves the split with it
        name_os_thread("model-test")
        before = module.threads_cpu_s(pid)
        burn(0.3)
        after = module.threads_cpu_s(pid)
        seen.update({role: after[role] - before[role] for role in after})

    thread = threading.Thread(target=model)
    thread.start()
    thread.join()
    assert seen["model threads"] >= 0.25 and seen["event loop"] < 0.1  # the main thread waited in join()
    before = module.threads_cpu_s(pid)
    burn(0.2)
    after = module.threads_cpu_s(pid)
    assert after["event loop"] - before["event loop"] >= 0.15 and after["model threads"] == before["model threads"]
    assert module.threads_cpu_s(-1) == {}  # no such process
