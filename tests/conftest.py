"""The suite's shared setup, light on purpose: importing it loads neither torch nor onnxruntime nor the training
and export packages, so tests/client runs without them (tests/client/test_light_imports.py checks).

- tests/datasets.py: the small data sets the tests make themselves (the suite never needs ../shared);
- tests/models.py: the tiny models' options and their training (torch); the fixtures ``checkpoints`` and
  ``exported`` below train and export them once a session, for the tests that ask;
- tests/serving.py: servers in the test process and raw stubs (lstm_server, onnxruntime);
- tests/reference.py: the exported language model stepped in-process with onnxruntime;
- tests/server/conftest.py: ``server``, ``start_server``, ``stubs``, ``reference``, ``start_redis``;
- tests/client/conftest.py: ``lstm-server`` in subprocesses on models/, fake servers, certificates.

redis-server and nginx are looked up, never installed: their tests skip, naming ``make test-deps``.
"""

from __future__ import annotations

import os

# Before anything imports gRPC: tests fork the test process while gRPC runs in it (pexpect starts lstm-client on a
# pseudo-terminal), and gRPC's fork handlers then restart its poller in the child, which can die (SIGABRT,
# "Epoll1Poller ... epoll_wait error: Bad file descriptor") before it execs: grpc/grpc#43055. Without fork support
# the child just execs the command.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# Before anything imports torch: one intra-op thread for the suite's torch (its training, tracing and reference
# runs, here and in the lstm-train children). The suite's models are tiny, so a second thread gains nothing, and
# beside any other busy process an OpenMP team on 2 cores waits for its descheduled thread at every parallel
# region: two training tests took 213 s instead of 6 s beside one niced training run (bench/results/
# 2026-12-06-suite-time.md). Servers set their own threads (--threads, --model-threads), so they are unaffected.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
from pathlib import Path

import cluster
import pytest

from .datasets import make_corpus, make_sst_rows, write_sst


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


# -- small trained and exported models, shared by the training, export, server and deploy tests -----------


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny language model and classifier (tests/models.py), trained once for the session."""
    from .models import train_tiny_checkpoints  # torch and lstm_training: only for the tests that ask

    return train_tiny_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def exported(checkpoints, tmp_path_factory) -> Path:
    """A model repository with charlm/1 and sentiment/1, exported once for the session."""
    from lstm_export.pipeline import export_checkpoint  # only for the tests that ask

    root = tmp_path_factory.mktemp("models")
    export_checkpoint(checkpoints["charlm"], root / "charlm" / "1", eval_data=checkpoints["corpus"])
    export_checkpoint(checkpoints["sentiment"], root / "sentiment" / "1", eval_data=checkpoints["dev"])
    return root


@pytest.fixture
def repository(exported, tmp_path) -> Path:
    """A private copy of the exported repository that a test may damage."""
    return Path(shutil.copytree(exported, tmp_path / "models"))


# -- redis-server and nginx: looked up, never installed -----------------------------------------------------


def installed(*binaries: str) -> dict[str, str]:
    """Paths of ``binaries`` (redis-server, nginx); skips the test, naming the command that installs them, when
    one is missing."""
    found = cluster.find_packages()
    missing = [binary for binary in binaries if found[binary] is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed: run `make test-deps` "
            f"(as root: `{cluster.install_command(missing)}`)"
        )
    return {binary: found[binary] for binary in binaries}


@pytest.fixture(scope="session")
def redis_binary() -> str:
    return installed("redis-server")["redis-server"]


@pytest.fixture(scope="session")
def cluster_binaries() -> dict[str, str]:
    """redis-server and nginx, for the loopback cluster (deploy/cluster.py)."""
    return installed("redis-server", "nginx")
