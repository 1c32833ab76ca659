"""The trainer: truncated BPTT, overfitting, resume equivalence, divergence handling, checkpoints."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from lstm_training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from lstm_training.data import CharVocab
from lstm_training.models import CharLM, CharLMConfig, ClassifierConfig, SentimentClassifier
from lstm_training.tasks import LanguageModelTask
from lstm_training.trainer import TrainConfig, Trainer, TrainingDiverged

from ..datasets import make_corpus


def lm_task(batch_size: int = 4, seq_len: int = 16, hidden: int = 24) -> LanguageModelTask:
    text = make_corpus(100)  # about 55 batches an epoch: every property holds, in half the time
    vocab = CharVocab.from_text(text)
    ids = torch.tensor(vocab.encode(text))
    cut = int(len(ids) * 0.9)
    config = CharLMConfig(vocab_size=len(vocab), embedding_dim=8, hidden_size=hidden, num_layers=2, dropout=0.1)
    return LanguageModelTask(ids[:cut], ids[cut:], vocab, config, batch_size, seq_len)


def graph_size(tensor: torch.Tensor) -> int:
    """Number of autograd nodes reachable from ``tensor``."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def test_truncated_bptt_detaches_state_between_windows() -> None:
    task = lm_task()
    model = task.build_model()
    sizes = []
    for i, batch in enumerate(task.batches(random.Random(0))):
        loss = task.loss(model, batch, torch.device("cpu"))
        sizes.append(graph_size(loss))
        assert not task.state[0].requires_grad and not task.state[1].requires_grad
        assert task.state[0].abs().sum() > 0  # the state is carried, not reset
        if i == 5:
            break
    assert len(set(sizes[1:])) == 1, f"autograd graph grows from window to window: {sizes}"


def test_state_is_reset_at_each_epoch() -> None:
    task = lm_task()
    model = task.build_model()
    batches = task.batches(random.Random(0))
    task.loss(model, next(batches), torch.device("cpu"))
    assert task.state is not None
    task.batches(random.Random(1)).__next__()
    assert task.state is None


def test_language_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = CharLM(CharLMConfig(vocab_size=12, embedding_dim=8, hidden_size=32, num_layers=1, dropout=0.0))
    x = torch.randint(0, 12, (4, 20))
    y = torch.randint(0, 12, (4, 20))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        logits, _, _ = model(x, *model.initial_state(4))
        loss = F.cross_entropy(logits.reshape(-1, 12), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_classifier_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = SentimentClassifier(ClassifierConfig(vocab_size=40, embedding_dim=8, hidden_size=16, dropout=0.0))
    tokens = torch.randint(1, 40, (8, 9))
    lengths = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2])
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        logits, _, _ = model(tokens, lengths, *model.initial_state(8))
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.01
    assert (logits.argmax(1) == labels).all()


def train(tmp_path, epochs: int, resume: str | None = None, patience: int = 10) -> Trainer:
    config = TrainConfig(epochs=epochs, lr=5e-3, warmup_steps=5, patience=patience, seed=7, log_every=1)
    trainer = Trainer(lm_task(), config, tmp_path, torch.device("cpu"), data_sha256="abc", command="test")
    if resume:
        trainer.resume(resume)
    trainer.fit()
    return trainer


def test_two_epochs_equal_one_epoch_resume_and_one_more(tmp_path) -> None:
    straight = train(tmp_path / "straight", epochs=2)
    train(tmp_path / "interrupted", epochs=1)
    resumed = train(tmp_path / "interrupted", epochs=2, resume=str(tmp_path / "interrupted" / "last.pt"))
    assert resumed.step == straight.step and resumed.epoch == 2
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, atol=0, rtol=0, msg=name)
    assert [m["val_loss"] for m in resumed.history] == [m["val_loss"] for m in straight.history]


def test_training_writes_checkpoints_metrics_and_plot(tmp_path) -> None:
    trainer = train(tmp_path, epochs=2)
    payload = load_checkpoint(tmp_path / "best.pt", expected_kind="charlm")
    for key in ("state_dict", "config", "vocab", "metrics", "data_sha256", "git_commit", "command"):
        assert key in payload, key
    assert payload["vocab"] == trainer.task.vocab.chars
    assert payload["data_sha256"] == "abc" and payload["command"] == "test"
    assert "training" not in payload and "training" in load_checkpoint(tmp_path / "last.pt")
    assert payload["best"]["val_loss"] == min(m["val_loss"] for m in payload["metrics"])
    model = model_from_checkpoint(payload)
    assert trainer.task.evaluate(model, torch.device("cpu"))["val_loss"] == pytest.approx(payload["best"]["val_loss"])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert sum('"type": "epoch"' in line for line in lines) == 2
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_improves_over_training(tmp_path) -> None:
    trainer = train(tmp_path, epochs=3)
    losses = [m["val_loss"] for m in trainer.history]
    assert losses[-1] < losses[0] < math.log(len(trainer.task.vocab))


def test_early_stopping_stops_after_patience(tmp_path) -> None:
    trainer = Trainer(
        lm_task(), TrainConfig(epochs=10, lr=0.0, warmup_steps=1, patience=2), tmp_path, torch.device("cpu")
    )
    trainer.fit()
    assert trainer.epoch == 3  # epoch 1 sets the best; two epochs without improvement stop it


def test_non_finite_loss_stops_without_writing_a_checkpoint(tmp_path, monkeypatch) -> None:
    task = lm_task()
    real_loss = task.loss
    calls = {"n": 0}

    def poisoned(model, batch, device):
        calls["n"] += 1
        loss = real_loss(model, batch, device)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(task, "loss", poisoned)
    trainer = Trainer(task, TrainConfig(epochs=1), tmp_path, torch.device("cpu"))
    with pytest.raises(TrainingDiverged, match=r"at step 3 \(epoch 1\)"):
        trainer.fit()
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "last.pt").exists()
    assert '"event": "non_finite"' in (tmp_path / "metrics.jsonl").read_text()


def test_exploding_gradient_is_reported_with_its_step(tmp_path, capsys) -> None:
    config = TrainConfig(epochs=1, explode_threshold=1e-9, max_steps_per_epoch=3, log_every=100)
    Trainer(lm_task(), config, tmp_path, torch.device("cpu")).fit()
    events = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "exploding_gradient" in line]
    assert len(events) == 3 and '"step": 0' in events[0]
    assert "exploding_gradient at step 0" in capsys.readouterr().err


def test_resume_refuses_a_best_checkpoint_and_another_kind(tmp_path) -> None:
    train(tmp_path, epochs=1)
    trainer = Trainer(lm_task(), TrainConfig(epochs=2), tmp_path / "b", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"resume from last\.pt"):
        trainer.resume(tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="expected 'sentiment'"):
        load_checkpoint(tmp_path / "last.pt", expected_kind="sentiment")
    (tmp_path / "broken.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "broken.pt")


def test_weight_averaging_is_the_mean_of_the_epochs_and_ships_when_better(tmp_path) -> None:
    def run(epochs: int, average_from: int = 0, out: str = "x", resume: str | None = None) -> Trainer:
        config = TrainConfig(epochs=epochs, lr=5e-3, warmup_steps=5, patience=10, seed=7, average_from=average_from)
        trainer = Trainer(lm_task(), config, tmp_path / out, torch.device("cpu"))
        if resume:
            trainer.resume(resume)
        trainer.fit()
        return trainer

    per_epoch = [run(n, out=f"plain{n}").model.state_dict() for n in (1, 2, 3)]
    averaged = run(3, average_from=1, out="avg")
    for key, value in averaged.average.items():
        expected = sum(state[key] for state in per_epoch) / 3
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=key)
    assert all("average" in m for m in averaged.history)
    best = load_checkpoint(tmp_path / "avg" / "best.pt")
    model = model_from_checkpoint(best)
    assert averaged.task.evaluate(model, torch.device("cpu"))["val_loss"] == pytest.approx(best["best"]["val_loss"])
    run(2, average_from=1, out="resumed")
    resumed = run(3, average_from=1, out="resumed", resume=str(tmp_path / "resumed" / "last.pt"))
    for key, value in averaged.average.items():
        torch.testing.assert_close(resumed.average[key], value, atol=0, rtol=0, msg=key)


def test_resume_refuses_other_options_and_keeps_one_log(tmp_path) -> None:
    train(tmp_path, epochs=1)
    other_model = Trainer(lm_task(hidden=30), TrainConfig(epochs=2), tmp_path, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"other options \(hidden_size\)"):
        other_model.resume(tmp_path / "last.pt")
    other_lr = Trainer(
        lm_task(), TrainConfig(epochs=2, lr=1e-3, warmup_steps=5, seed=7, log_every=1), tmp_path, torch.device("cpu")
    )
    with pytest.raises(ValueError, match=r"other options \(lr\)"):
        other_lr.resume(tmp_path / "last.pt")
    train(tmp_path, epochs=2, resume=str(tmp_path / "last.pt"))
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if '"type": "step"' in line
    ]
    assert steps == sorted(set(steps))  # no step logged twice
    train(tmp_path, epochs=1)  # a fresh run into the same folder starts a fresh log
    epochs = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"type": "epoch"' in line]
    assert len(epochs) == 1
