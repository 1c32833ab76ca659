"""Small checkpoints of both kinds, trained by the tests, and their exported repository entries."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lstm_export.pipeline import export_checkpoint
from lstm_training.cli import main as train_main

from ..conftest import make_corpus, make_sst_rows, write_sst

SMALL = ["--embedding-dim", "8", "--hidden-size", "12", "--num-layers", "2", "--device", "cpu", "--epochs", "1"]


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
                *SMALL,
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
                *SMALL,
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
