"""The suite's tiny models: one set of options, trained once a session (the ``checkpoints`` fixture in
tests/conftest.py) and reused by the training CLI's tests, the export tests, the server tests and the deploy tests.
A test that must train for itself (to try a flag) takes the same options through ``charlm_args`` or
``sentiment_args``, appending what it changes (the last occurrence of an option wins)."""

from __future__ import annotations

from pathlib import Path

import torch

from lstm_training.cli import main as train_main

from .datasets import make_corpus, make_sst_rows, write_sst

EMBEDDING_DIM, HIDDEN_SIZE, NUM_LAYERS = 8, 12, 2

#: The tiny model's options, for every tiny training run of the suite.
TINY_MODEL = [
    *("--embedding-dim", str(EMBEDDING_DIM), "--hidden-size", str(HIDDEN_SIZE), "--num-layers", str(NUM_LAYERS)),
    *("--device", "cpu", "--epochs", "1"),
]


def charlm_args(data: Path, out: Path, *extra: str) -> list[str]:
    """``lstm-train charlm`` arguments: the tiny model on ``data`` into ``out``, 5 steps of 4 x 16 characters an
    epoch, then ``extra``."""
    common = ["--batch-size", "4", "--seq-len", "16", "--max-steps-per-epoch", "5"]
    return ["charlm", "--data", str(data), "--out", str(out), *common, *TINY_MODEL, *extra]


def sentiment_args(train: Path, dev: Path, out: Path, *extra: str) -> list[str]:
    """``lstm-train sentiment`` arguments: the tiny classifier on ``train`` and ``dev`` into ``out``, a tokenizer
    of 60 pieces, then ``extra``."""
    files = ["--train", str(train), "--dev", str(dev), "--out", str(out)]
    return ["sentiment", *files, "--tokenizer-vocab-size", "60", *TINY_MODEL, *extra]


def train_tiny_checkpoints(root: Path) -> dict[str, Path]:
    """Train the tiny language model and classifier under ``root`` (with their data): paths of the checkpoints
    (``charlm``, ``sentiment``), of the corpus and of the classifier's dev set."""
    (root / "corpus.txt").write_text(make_corpus(150))
    write_sst(root / "train.tsv", make_sst_rows(120, seed=1))
    write_sst(root / "dev.tsv", make_sst_rows(30, seed=2), "content")
    torch.manual_seed(0)
    assert train_main(charlm_args(root / "corpus.txt", root / "charlm")) == 0
    assert train_main(sentiment_args(root / "train.tsv", root / "dev.tsv", root / "sentiment")) == 0
    return {
        "charlm": root / "charlm" / "best.pt",
        "sentiment": root / "sentiment" / "best.pt",
        "corpus": root / "corpus.txt",
        "dev": root / "dev.tsv",
    }
