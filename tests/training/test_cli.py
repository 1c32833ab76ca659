"""``lstm-train`` end to end on tiny files: a few steps, a checkpoint that loads, clear errors. The tiny models'
options come from tests/models.py, and the language model is the session's (the ``checkpoints`` fixture)."""

from __future__ import annotations

import argparse

import pytest
import torch

from lstm_training.checkpoint import load_checkpoint, model_from_checkpoint
from lstm_training.cli import build_parser, main
from lstm_training.data import sha256_file
from lstm_training.tokenizer import encode, load_tokenizer

from ..models import HIDDEN_SIZE, NUM_LAYERS, sentiment_args


def test_charlm_cli_writes_a_checkpoint_that_loads(checkpoints) -> None:
    """The session's tiny language model: ``lstm-train charlm`` (tests/models.py) exited 0 and wrote this."""
    out = checkpoints["charlm"].parent
    payload = load_checkpoint(out / "best.pt", expected_kind="charlm")
    assert payload["data_sha256"] == sha256_file(checkpoints["corpus"])
    assert payload["command"].startswith("lstm-train charlm --data")
    model = model_from_checkpoint(payload)
    vocab = payload["vocab"]
    tokens = torch.tensor([[vocab.index(ch) for ch in "KING:"]])
    logits, hn, _ = model(tokens, *model.initial_state(1))
    assert logits.shape == (1, 5, len(vocab)) and hn.shape == (NUM_LAYERS, 1, HIDDEN_SIZE)
    assert {"metrics.jsonl", "curves.png", "last.pt"} <= {p.name for p in out.iterdir()}


def test_sentiment_cli_writes_a_checkpoint_that_loads(tmp_path, sst_files) -> None:
    """Trains for itself: the optimizer's flags (epochs, batch size, warmup, learning rate) make it learn."""
    out = tmp_path / "out"
    optimizer = ["--epochs", "6", "--batch-size", "16", "--warmup-steps", "1", "--lr", "1e-2"]
    assert main(sentiment_args(*sst_files, out, *optimizer, "--tokenizer-vocab-size", "80")) == 0
    payload = load_checkpoint(out / "best.pt", expected_kind="sentiment")
    assert payload["labels"] == ["negative", "positive"]
    model = model_from_checkpoint(payload)
    tokenizer = load_tokenizer(payload["tokenizer"])
    ids = encode(tokenizer, "A gorgeous, moving film!")
    logits, _, _ = model(torch.tensor([ids]), torch.tensor([len(ids)]), *model.initial_state(1))
    assert logits.shape == (1, 2)
    assert payload["best"]["val_accuracy"] > 0.9  # the toy task is separable


def test_cli_reports_a_missing_corpus(tmp_path, capsys) -> None:
    assert main(["charlm", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "neither a file nor a known corpus" in capsys.readouterr().err


def test_cli_refuses_cuda_without_a_gpu(tmp_path, corpus_file, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["charlm", "--data", str(corpus_file), "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_sentiment_resume_keeps_the_checkpoints_tokenizer(tmp_path, sst_files, monkeypatch) -> None:
    import lstm_training.cli as cli

    out = tmp_path / "out"
    common = sentiment_args(*sst_files, out, "--tokenizer-vocab-size", "80")
    assert main([*common, "--epochs", "1"]) == 0
    first = load_checkpoint(out / "last.pt")["tokenizer"]

    def must_not_train(*args, **kwargs):
        raise AssertionError("resume trained a new tokenizer")

    monkeypatch.setattr(cli, "train_tokenizer", must_not_train)
    assert main([*common, "--epochs", "2", "--resume", str(out / "last.pt")]) == 0
    assert load_checkpoint(out / "last.pt")["tokenizer"] == first


def test_compact_checkpoint_halves_the_weights_and_keeps_the_outputs(tmp_path, sst_files) -> None:
    """Trains for itself, wider than the tiny model: the weights must outweigh the tokenizer for halving to show."""
    out = tmp_path / "out"
    wider = ["--embedding-dim", "64", "--hidden-size", "64"]
    assert main(sentiment_args(*sst_files, out, "--tokenizer-vocab-size", "80", *wider)) == 0
    assert main(["compact", str(out / "best.pt"), "--out", str(tmp_path / "small.pt")]) == 0
    full, small = load_checkpoint(out / "best.pt"), load_checkpoint(tmp_path / "small.pt")
    assert small["weights_stored_as"] == "float16" and "training" not in small
    assert (tmp_path / "small.pt").stat().st_size < 0.6 * (out / "best.pt").stat().st_size
    tokens, lengths = torch.tensor([[5, 6, 7, 8]]), torch.tensor([4])
    a, b = model_from_checkpoint(full), model_from_checkpoint(small)
    assert next(b.parameters()).dtype == torch.float32
    torch.testing.assert_close(
        b(tokens, lengths, *b.initial_state(1))[0], a(tokens, lengths, *a.initial_state(1))[0], atol=1e-2, rtol=0
    )
    assert main(["compact", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.pt")]) == 2


def test_every_charlm_option_has_a_description_and_its_default() -> None:
    (commands,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    for action in commands.choices["charlm"]._actions:
        if action.dest != "help":
            assert action.help and ("(default:" in action.help or action.required), action.option_strings
