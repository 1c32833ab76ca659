"""Quality and speed of an exported ONNX model, measured with onnxruntime.

Quality is measured the way training measures it (``lstm_training.tasks``):
the language model's mean cross-entropy in nats per character over the last
10% of its corpus, read as 16 contiguous streams with the state carried; the
classifier's accuracy on a labelled TSV file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lstm_training.data import CharVocab, read_sst2, sha256_file, split_text, stream_rows, stream_windows
from lstm_training.tokenizer import encode, load_tokenizer


def _zero_state(state_shape: tuple[int, int], batch: int) -> tuple[np.ndarray, np.ndarray]:
    layers, hidden = state_shape
    return np.zeros((layers, batch, hidden), np.float32), np.zeros((layers, batch, hidden), np.float32)


def language_model_loss(session, vocab: list[str], text: str, state_shape: tuple[int, int], streams: int = 16) -> float:
    """Mean cross-entropy (nats per character) of ``text`` under the model."""
    ids = torch.tensor(CharVocab(vocab).encode(text))
    rows = stream_rows(ids, streams)
    h, c = _zero_state(state_shape, streams)
    total, count = 0.0, 0
    for x, y in stream_windows(rows, 256):
        logits, h, c = session.run(None, {"tokens": x.numpy(), "h0": h, "c0": c})
        peak = logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
        target = np.take_along_axis(logits, y.numpy()[..., None], axis=-1)[..., 0]
        total += float((log_norm - target).sum())
        count += y.numel()
    return total / count


def classifier_accuracy(
    session, tokenizer_json: str, rows: list[tuple[str, int]], state_shape: tuple[int, int], pad_id: int = 0
) -> float:
    """Share of ``rows`` (text, label id) whose argmax label is right; batches of 128 sorted by length."""
    tokenizer = load_tokenizer(tokenizer_json)
    encoded = sorted(((encode(tokenizer, text), label) for text, label in rows), key=lambda r: len(r[0]))
    correct = 0
    for start in range(0, len(encoded), 128):
        chunk = encoded[start : start + 128]
        lengths = np.array([len(ids) for ids, _ in chunk], np.int64)
        tokens = np.full((len(chunk), lengths.max()), pad_id, np.int64)
        for row, (ids, _) in enumerate(chunk):
            tokens[row, : len(ids)] = ids
        h, c = _zero_state(state_shape, len(chunk))
        logits, _, _ = session.run(None, {"tokens": tokens, "lengths": lengths, "h0": h, "c0": c})
        correct += int((logits.argmax(axis=1) == np.array([label for _, label in chunk])).sum())
    return correct / len(encoded)


def measure_quality(session, manifest: dict[str, Any], data: Path, tokenizer_json: str | None = None) -> dict[str, Any]:
    """The manifest's ``quality`` block for ``data``: a corpus (generation) or a labelled TSV (classification)."""
    state_shape = (manifest["num_layers"] * manifest["num_directions"], manifest["hidden_size"])
    if manifest["task"] == "generation":
        _, validation = split_text(data.read_text(encoding="utf-8"))
        value = language_model_loss(session, manifest["vocab"], validation, state_shape)
        return {
            "metric": "val_loss",
            "value": round(value, 5),
            "unit": "nats per character",
            "data": "last 10% of the corpus",
            "data_sha256": sha256_file(data),
            "backend": "onnxruntime",
        }
    value = classifier_accuracy(session, tokenizer_json, read_sst2(data), state_shape)
    return {
        "metric": "dev_accuracy",
        "value": round(value, 5),
        "data": data.name,
        "data_sha256": sha256_file(data),
        "backend": "onnxruntime",
    }


def step_seconds(sessions: dict[str, Any], manifest: dict[str, Any], batch: int, steps: int = 200) -> dict[str, float]:
    """Median seconds per one-token step at ``batch`` for each session, timed interleaved (same noise for all)."""
    rng = np.random.default_rng(0)
    state_shape = (manifest["num_layers"] * manifest["num_directions"], manifest["hidden_size"])
    h, c = _zero_state(state_shape, batch)
    feeds = {"tokens": rng.integers(1, 10, (batch, 1)), "h0": h, "c0": c}
    if manifest["task"] == "classification":
        feeds["lengths"] = np.ones(batch, np.int64)
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(steps):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feeds)
            samples[name].append(time.perf_counter() - started)
    return {name: float(np.median(values)) for name, values in samples.items()}
