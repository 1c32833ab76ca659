"""Servers in the test process, and raw stubs: for the tests of the server and of the deployment, which need the
server's objects (its configuration, metrics, errors). The client's tests run ``lstm-server`` in a subprocess
instead (tests/client/conftest.py), so that their process never loads onnxruntime."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
from lstm.v1 import lstm_pb2 as pb
from lstm.v1 import lstm_pb2_grpc as rpc

from lstm_server.app import LstmServer
from lstm_server.config import ServerConfig

STATE_KEYS = "test-key:0123456789abcdef0123456789abcdef"  # shared by the replicas of a test


def array_of(tensor: pb.Tensor) -> np.ndarray:
    """A Tensor message's values (raw little-endian float32) as an array of its shape."""
    return np.frombuffer(tensor.data, "<f4").reshape(tuple(tensor.shape)).astype(np.float32)


def tensor_of(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(shape=list(array.shape), data=np.ascontiguousarray(array, "<f4").tobytes())


@contextlib.asynccontextmanager
async def joining_at_once(engine, jobs: int) -> AsyncIterator[None]:
    """Hold ``engine``'s model thread (a ``GenerationEngine``) until the block has submitted ``jobs`` jobs (turns,
    reads): the model thread then takes them in one go."""
    holding = threading.Event()

    def hold() -> None:
        with engine.paused() as wait_for_queued:
            holding.set()
            assert wait_for_queued(jobs), f"{jobs} jobs were never queued"

    holder = threading.Thread(target=hold)
    holder.start()
    assert await asyncio.to_thread(holding.wait, 10), "the model thread was never held"
    try:
        yield
    finally:
        await asyncio.to_thread(holder.join)


class ServerThread:
    """An LstmServer on 127.0.0.1 with an ephemeral port."""

    def __init__(self, models: Path, **overrides) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.config = self.settings(models, **overrides)
        self.server: LstmServer = self.run(self._start())
        self.address = f"127.0.0.1:{self.server.port}"

    @staticmethod
    def settings(models: Path | str, **overrides) -> ServerConfig:
        """A test server's configuration: loopback, an ephemeral port, no metrics port, one thread."""
        settings = {
            "port": 0,
            "metrics_port": 0,
            "http_port": 0,
            "replica_name": "test-replica",
            "threads": 1,
            "drain_delay_s": 0,
        }
        return ServerConfig(models=str(models), **{**settings, **overrides})

    async def _start(self) -> LstmServer:
        server = LstmServer(self.config)
        await server.start()
        return server

    def run(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float | None = 0) -> None:
        self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Stubs:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.sessions = rpc.SessionsStub(self.channel)
        self.generation = rpc.GenerationStub(self.channel)
        self.classification = rpc.ClassificationStub(self.channel)
        self.models = rpc.ModelsStub(self.channel)
