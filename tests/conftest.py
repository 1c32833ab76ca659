"""Shared fixtures: small data sets the tests make themselves (the suite never needs ../shared)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from lstm_export.pipeline import export_checkpoint
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
