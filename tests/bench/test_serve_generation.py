"""bench/serve_generation.py's split of a server's CPU by thread, on a child process that burns known amounts."""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def module(monkeypatch):
    """bench/serve_generation.py imported in the test process (it imports deploy/cluster.py by path)."""
    spec = importlib.util.spec_from_file_location("serve_generation", ROOT / "bench" / "serve_generation.py")
    loaded = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "serve_generation", loaded)
    spec.loader.exec_module(loaded)
    return loaded


CHILD = """
import sys, threading, time
from lstm_server.engine.threads import name_os_thread

def burn(seconds):
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        pass

done = threading.Event()

def model():
    name_os_thread("model-test")
    burn(0.3)
    done.set()
    sys.stdin.read()  # stays alive (and named) until the test is done

threading.Thread(target=model, daemon=True).start()
done.wait()
burn(0.2)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc")
def test_the_cpu_of_a_named_model_thread_and_of_the_main_thread_are_told_apart(module) -> None:
    """A process whose thread named ``model-test`` burned 0.3 s of CPU and whose main thread burned 0.2 s."""
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        split = module.threads_cpu_s(child.pid)
    finally:
        child.communicate("", timeout=30)
    assert set(split) == {"event loop", "model threads", "other threads"}
    assert 0.25 <= split["model threads"] < 0.6
    assert split["event loop"] >= 0.15  # its burn, and the interpreter's start
    assert module.threads_cpu_s(child.pid) == {}  # the process has ended
