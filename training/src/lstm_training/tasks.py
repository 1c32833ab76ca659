"""What the trainer trains: a task builds its model, yields batches, computes a loss and evaluates.

The language-model task carries (h, c) explicitly from one window to the next
(truncated backpropagation through time): the state is detached after every
window, so the autograd graph never spans more than one window, and reset to
zeros at the start of every epoch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import CharVocab, bucketed_batches, pad_batch, stream_rows, stream_windows
from .models import CharLM, CharLMConfig, ClassifierConfig, SentimentClassifier, zero_state
from .tokenizer import encode


class LanguageModelTask:
    """Stateful character language modelling; the validation metric is loss in nats per character."""

    kind = "charlm"
    metric = "val_loss"
    higher_is_better = False

    def __init__(
        self,
        train_ids: Tensor,
        val_ids: Tensor,
        vocab: CharVocab,
        config: CharLMConfig,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        eval_streams: int = 16,
    ) -> None:
        self.vocab = vocab
        self.config = config
        self.seq_len = seq_len
        self.train_ids = train_ids
        self.val_ids = val_ids
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.eval_streams = eval_streams
        self.state: tuple[Tensor, Tensor] | None = None

    def build_model(self) -> nn.Module:
        return CharLM(self.config)

    def metadata(self) -> dict[str, Any]:
        return {"vocab": self.vocab.chars, "labels": []}

    def _rows(self, epoch_rng: random.Random) -> Tensor:
        """This rank's share of the global streams; each epoch starts at a random offset."""
        offset = epoch_rng.randrange(self.seq_len)
        rows = stream_rows(self.train_ids[offset:], self.batch_size * self.world_size)
        return rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def batches(self, epoch_rng: random.Random) -> Iterator[tuple[Tensor, Tensor]]:
        self.state = None
        yield from stream_windows(self._rows(epoch_rng), self.seq_len)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], device: torch.device) -> Tensor:
        x, y = (t.to(device) for t in batch)
        if self.state is None:
            self.state = zero_state(self.config.num_layers, 1, x.shape[0], self.config.hidden_size, device)
        logits, h, c = model(x, *self.state)
        self.state = (h.detach(), c.detach())
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def steps_per_epoch(self) -> int:
        return math.ceil((self.train_ids.numel() // (self.batch_size * self.world_size) - 1) / self.seq_len)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Mean cross-entropy over the validation text, read as contiguous streams with state carried."""
        model.eval()
        rows = stream_rows(self.val_ids, self.eval_streams)
        state = zero_state(self.config.num_layers, 1, rows.shape[0], self.config.hidden_size, device)
        total, count = 0.0, 0
        for x, y in stream_windows(rows, 256):
            logits, *state = model(x.to(device), *state)
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1), reduction="sum"
            ).item()
            count += y.numel()
        model.train()
        return {"val_loss": total / count}


class ClassificationTask:
    """Sentence classification on packed, length-bucketed batches; the validation metric is accuracy."""

    kind = "sentiment"
    metric = "val_accuracy"
    higher_is_better = True

    def __init__(
        self,
        train: list[tuple[str, int]],
        dev: list[tuple[str, int]],
        tokenizer,
        labels: list[str],
        config: ClassifierConfig,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.tokenizer = tokenizer
        self.labels = labels
        self.config = config
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.train_ids = [encode(tokenizer, text) for text, _ in train]
        self.train_labels = [label for _, label in train]
        self.dev_ids = [encode(tokenizer, text) for text, _ in dev]
        self.dev_labels = [label for _, label in dev]

    def build_model(self) -> nn.Module:
        return SentimentClassifier(self.config)

    def metadata(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer.to_str(), "labels": self.labels}

    def _batch(self, indices: list[int], ids: list[list[int]], labels: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        tokens, lengths = pad_batch([ids[i] for i in indices], self.config.pad_id)
        return tokens, lengths, torch.tensor([labels[i] for i in indices])

    def batches(self, epoch_rng: random.Random) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        batches = bucketed_batches([len(s) for s in self.train_ids], self.batch_size, epoch_rng)
        usable = len(batches) - len(batches) % self.world_size
        for indices in batches[self.rank : usable : self.world_size]:
            yield self._batch(indices, self.train_ids, self.train_labels)

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_ids) / self.batch_size) // self.world_size

    def _zero_state(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        directions = 2 if self.config.bidirectional else 1
        return zero_state(self.config.num_layers, directions, batch, self.config.hidden_size, device)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor], device: torch.device) -> Tensor:
        tokens, lengths, labels = batch
        state = self._zero_state(tokens.shape[0], device)
        logits, _, _ = model(tokens.to(device), lengths, *state)
        return F.cross_entropy(logits, labels.to(device))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        model.eval()
        order = sorted(range(len(self.dev_ids)), key=lambda i: len(self.dev_ids[i]))
        correct, total_loss = 0, 0.0
        for start in range(0, len(order), 256):
            tokens, lengths, labels = self._batch(order[start : start + 256], self.dev_ids, self.dev_labels)
            state = self._zero_state(tokens.shape[0], device)
            logits, _, _ = model(tokens.to(device), lengths, *state)
            labels = labels.to(device)
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(dim=1) == labels).sum().item()
        model.train()
        return {"val_accuracy": correct / len(order), "val_loss": total_loss / len(order)}


class DistillationTask(ClassificationTask):
    """Classification taught by a teacher (Tang et al., 2019): every training text has the teacher's logits,
    and the labelled ones their true label. The loss is the mean squared error between the student's and the
    teacher's logits plus ``label_weight`` times the cross-entropy on the labelled texts of the batch.
    Validation is as for :class:`ClassificationTask` (dev accuracy against the true labels)."""

    def __init__(
        self,
        transfer: dict[str, Any],
        dev: list[tuple[str, int]],
        tokenizer,
        labels: list[str],
        config: ClassifierConfig,
        batch_size: int,
        label_weight: float = 0.5,
        teacher_embeddings: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        train = list(zip(transfer["texts"], transfer["labels"], strict=True))
        super().__init__(train, dev, tokenizer, labels, config, batch_size, rank, world_size)
        self.train_logits = transfer["logits"].float()
        self.label_weight = label_weight
        self.embeddings = transfer["embeddings"] if teacher_embeddings else None
        self.distillation = {
            "label_weight": label_weight,
            "teacher_embeddings": teacher_embeddings,
            "transfer": transfer.get("summary", {}),
            "augment": transfer.get("augment", {}),
        }
        if self.embeddings is not None and tuple(self.embeddings.shape) != (config.vocab_size, config.embedding_dim):
            raise ValueError(
                f"the teacher's embeddings are {tuple(self.embeddings.shape)}, the student's "
                f"({config.vocab_size}, {config.embedding_dim}): pass --embedding-dim {self.embeddings.shape[1]} "
                "or --no-teacher-embeddings"
            )

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "distillation": self.distillation}

    def build_model(self) -> nn.Module:
        model = SentimentClassifier(self.config)
        if self.embeddings is not None:
            with torch.no_grad():
                model.embedding.weight.copy_(self.embeddings)
                model.embedding.weight[self.config.pad_id].zero_()
        return model

    def _batch(self, indices: list[int], ids: list[list[int]], labels: list[int]):
        tokens, lengths, label_tensor = super()._batch(indices, ids, labels)
        if ids is self.dev_ids:
            return tokens, lengths, label_tensor
        return tokens, lengths, label_tensor, self.train_logits[indices]

    def loss(self, model: nn.Module, batch, device: torch.device) -> Tensor:
        tokens, lengths, labels, teacher = batch
        state = self._zero_state(tokens.shape[0], device)
        logits, _, _ = model(tokens.to(device), lengths, *state)
        loss = F.mse_loss(logits, teacher.to(device))
        labelled = labels >= 0
        if self.label_weight and labelled.any():
            loss = loss + self.label_weight * F.cross_entropy(logits[labelled.to(device)], labels[labelled].to(device))
        return loss
