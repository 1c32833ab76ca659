"""A real server on loopback, run on its own event loop in a thread, and an in-process reference generator."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from lstm.v1 import lstm_pb2_grpc as rpc

from lstm_server.app import LstmServer
from lstm_server.config import ServerConfig
from lstm_server.model_repository import load_entry
from lstm_server.sampling import sample


class ServerThread:
    """An LstmServer on 127.0.0.1 with an ephemeral port."""

    def __init__(self, models: Path, **overrides) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.config = ServerConfig(
            models=str(models), port=0, metrics_port=0, replica_name="test-replica", threads=1, **overrides
        )
        self.server: LstmServer = self.run(self._start())
        self.address = f"127.0.0.1:{self.server.port}"

    async def _start(self) -> LstmServer:
        server = LstmServer(self.config)
        await server.start()
        return server

    def run(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float = 0) -> None:
        self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(exported):
    running = ServerThread(exported)
    yield running
    running.stop()


@pytest.fixture
def start_server(exported):
    """Start servers with special settings; all are stopped at the end of the test."""
    started = []

    def start(**overrides) -> ServerThread:
        running = ServerThread(exported, **overrides)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


class Stubs:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.sessions = rpc.SessionsStub(self.channel)
        self.generation = rpc.GenerationStub(self.channel)
        self.classification = rpc.ClassificationStub(self.channel)
        self.models = rpc.ModelsStub(self.channel)


@pytest.fixture
def stubs(server):
    made = Stubs(server.address)
    yield made
    made.channel.close()


class Reference:
    """The exported language model stepped in-process with onnxruntime: what a session must produce."""

    def __init__(self, entry_dir: Path) -> None:
        self.entry = load_entry(entry_dir)
        self.session = ort.InferenceSession(str(self.entry.file("model.onnx")), providers=["CPUExecutionProvider"])
        self.index = {ch: i for i, ch in enumerate(self.entry.vocab)}
        self.state_shape = (self.entry.num_layers, 1, self.entry.hidden_size)

    def feed(self, text: str, h=None, c=None):
        h = np.zeros(self.state_shape, np.float32) if h is None else h
        c = np.zeros(self.state_shape, np.float32) if c is None else c
        ids = np.array([[self.index[ch] for ch in text]], np.int64)
        logits, h, c = self.session.run(None, {"tokens": ids, "h0": h, "c0": c})
        return logits[0, -1], h, c

    def generate(self, prompt: str, n: int, *, temperature=1.0, top_k=0, top_p=1.0, seed=0, stop=()):
        """(generated text, h, c after it) for a fresh session reading ``prompt`` then sampling ``n`` characters."""
        logits, h, c = self.feed(prompt)
        position, text = len(prompt), ""
        for _ in range(n):
            token = sample(
                logits[None],
                np.array([temperature]),
                np.array([top_k]),
                np.array([top_p]),
                np.array([seed], np.uint64),
                np.array([position], np.uint64),
            )[0]
            text += self.entry.vocab[token]
            position += 1
            logits, h, c = self.feed(self.entry.vocab[token], h, c)
            if any(text.endswith(s) for s in stop):
                break
        return text, h, c


@pytest.fixture(scope="module")
def reference(exported) -> Reference:
    return Reference(exported / "charlm" / "1")
