"""Shared fixtures: small data sets the tests make themselves (the suite never needs ../shared)."""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
from lstm.v1 import lstm_pb2 as pb
from lstm.v1 import lstm_pb2_grpc as rpc

from lstm_export.pipeline import export_checkpoint
from lstm_server.app import LstmServer
from lstm_server.config import ServerConfig
from lstm_server.model_repository import load_entry
from lstm_server.sampling import sample
from lstm_training.cli import main as train_main

WORDS = "the king queen shall speak hear me good lord sweet love night day fair death".split()


def make_corpus(n_lines: int = 400, seed: int = 0) -> str:
    """A small play-like text with a learnable structure."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        speaker = rng.choice(["KING", "QUEEN", "LORD"])
        lines.append(f"{speaker}:\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + ".\n")
    return "\n".join(lines)


POSITIVE = "a gorgeous , moving film|wonderful and funny|the best acting of the year|sweet , smart and touching".split(
    "|"
)
NEGATIVE = "dull and lifeless|a boring , ugly mess|the worst script ever|it does n't work at all".split("|")


def make_sst_rows(n: int = 200, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        rows.append((rng.choice(POSITIVE if label else NEGATIVE), label))
    return rows


def write_sst(path: Path, rows: list[tuple[str, int]], text_column: str = "sentence") -> Path:
    path.write_text(f"label\t{text_column}\n" + "".join(f"{label}\t{text}\n" for text, label in rows))
    return path


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus())
    return path


@pytest.fixture
def sst_files(tmp_path: Path) -> tuple[Path, Path]:
    train = write_sst(tmp_path / "train.tsv", make_sst_rows(200, seed=1))
    dev = write_sst(tmp_path / "dev.tsv", make_sst_rows(40, seed=2), text_column="content")
    return train, dev


# -- small trained and exported models, shared by the export and server tests --------------

TINY_MODEL = ["--embedding-dim", "8", "--hidden-size", "12", "--num-layers", "2", "--device", "cpu", "--epochs", "1"]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    (root / "corpus.txt").write_text(make_corpus(150))
    write_sst(root / "train.tsv", make_sst_rows(120, seed=1))
    write_sst(root / "dev.tsv", make_sst_rows(30, seed=2), "content")
    torch.manual_seed(0)
    assert (
        train_main(
            [
                "charlm",
                "--data",
                str(root / "corpus.txt"),
                "--out",
                str(root / "charlm"),
                "--batch-size",
                "4",
                "--seq-len",
                "16",
                "--max-steps-per-epoch",
                "5",
                *TINY_MODEL,
            ]
        )
        == 0
    )
    assert (
        train_main(
            [
                "sentiment",
                "--train",
                str(root / "train.tsv"),
                "--dev",
                str(root / "dev.tsv"),
                "--out",
                str(root / "sentiment"),
                "--tokenizer-vocab-size",
                "60",
                *TINY_MODEL,
            ]
        )
        == 0
    )
    return {
        "charlm": root / "charlm" / "best.pt",
        "sentiment": root / "sentiment" / "best.pt",
        "corpus": root / "corpus.txt",
        "dev": root / "dev.tsv",
    }


@pytest.fixture(scope="session")
def exported(checkpoints, tmp_path_factory) -> Path:
    """A model repository with charlm/1 and sentiment/1, exported once for the session."""
    root = tmp_path_factory.mktemp("models")
    export_checkpoint(checkpoints["charlm"], root / "charlm" / "1", eval_data=checkpoints["corpus"])
    export_checkpoint(checkpoints["sentiment"], root / "sentiment" / "1", eval_data=checkpoints["dev"])
    return root


@pytest.fixture
def repository(exported, tmp_path) -> Path:
    """A private copy of the exported repository that a test may damage."""
    return Path(shutil.copytree(exported, tmp_path / "models"))


# -- a real server on loopback, and the in-process reference generator ------------------

STATE_KEYS = "test-key:0123456789abcdef0123456789abcdef"  # shared by the replicas of a test


def array_of(tensor: pb.Tensor) -> np.ndarray:
    """A Tensor message's values (raw little-endian float32) as an array of its shape."""
    return np.frombuffer(tensor.data, "<f4").reshape(tuple(tensor.shape)).astype(np.float32)


def tensor_of(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(shape=list(array.shape), data=np.ascontiguousarray(array, "<f4").tobytes())


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
        settings = {"port": 0, "metrics_port": 0, "replica_name": "test-replica", "threads": 1, "drain_delay_s": 0}
        return ServerConfig(models=str(models), **{**settings, **overrides})

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


# -- Redis, for the session store --------------------------------------------------------


@pytest.fixture(scope="session")
def redis_binary() -> str:
    import cluster

    try:
        return cluster.ensure_packages()["redis-server"]
    except cluster.ClusterError as error:
        pytest.skip(f"no redis-server: {error}")


@pytest.fixture
def start_redis(redis_binary, tmp_path):
    """Start private redis-servers (stopped at the end of the test); returns cluster.Process objects."""
    import cluster

    started = []

    def start(name: str = "redis") -> cluster.Process:
        process = cluster.start_redis(tmp_path / name, cluster.free_port(), redis_binary)
        started.append(process)
        return process

    yield start
    for process in started:
        cluster.stop(process)
