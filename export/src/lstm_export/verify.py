"""Export verification: eager PyTorch, TorchScript and onnxruntime must agree before anything is written.

Checks (each failure names the check, the backend, the tensor and the difference):

1. random tokens and random (h0, c0), batch 1 and 5, time 1 and 37: TorchScript and
   onnxruntime equal eager PyTorch on logits, hn and cn (within ``TOLERANCE``);
2. language model: stepping one token at a time with (h, c) carried equals one call
   on the whole sequence, in TorchScript and in onnxruntime;
3. classifier: in a padded batch with ``lengths``, each text gets its result alone.

An int8 graph (``verify_quantized``) is held to checks 2 and 3 at ``TOLERANCE``
(rounding is per row, so they hold exactly) but to eager PyTorch only for one
step from random states, at ``INT8_TOLERANCE``: over a sequence the rounding
error of a recurrent model compounds, so what decides an int8 entry is its
quality on real data, measured at export against fp32 (``quantization.quality``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .exporter import OUTPUT_NAMES, input_names
from .invariance import Runner

TOLERANCE = 1e-4
# one step from random states; the shipped models measure at most 0.036 (charlm) and 0.032 (sentiment)
INT8_TOLERANCE = 0.1


class VerificationError(RuntimeError):
    """Two backends disagree; nothing was written."""


def torch_runner(module) -> Runner:
    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in module(*(torch.from_numpy(a) for a in inputs))]

    return run


def onnx_runner(session, task: str) -> Runner:
    names = input_names(task)

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        return session.run(OUTPUT_NAMES, dict(zip(names, inputs, strict=True)))

    return run


def assert_same(actual: list[np.ndarray], expected: list[np.ndarray], check: str, tolerance: float = TOLERANCE) -> None:
    for name, a, e in zip(OUTPUT_NAMES, actual, expected, strict=True):
        if a.shape != e.shape:
            raise VerificationError(
                f"export verification failed: {check}: {name} has shape {a.shape}, expected {e.shape}"
            )
        diff = float(np.max(np.abs(a - e))) if a.size else 0.0
        if not diff <= tolerance:  # also catches NaN
            raise VerificationError(
                f"export verification failed: {check}: {name} differs by {diff:.3g} (tolerance {tolerance})"
            )


def random_inputs(model: nn.Module, task: str, batch: int, time: int, rng: np.random.Generator) -> list[np.ndarray]:
    vocab = model.config.vocab_size
    states = model.initial_state(batch)[0].shape
    h0 = rng.standard_normal(states).astype(np.float32) * 0.5
    c0 = rng.standard_normal(states).astype(np.float32) * 0.5
    if task == "generation":
        return [rng.integers(0, vocab, (batch, time)), h0, c0]
    lengths = rng.integers(1, time + 1, batch)
    lengths[0] = time
    tokens = rng.integers(1, vocab, (batch, time))
    tokens[np.arange(time)[None, :] >= lengths[:, None]] = model.config.pad_id
    return [tokens, lengths, h0, c0]


def verify_export(model: nn.Module, task: str, backends: dict[str, Runner], seed: int = 0) -> list[str]:
    """Run every check on every named backend; return their descriptions, or raise VerificationError at the first
    mismatch."""
    model = model.eval()
    rng = np.random.default_rng(seed)
    eager = torch_runner(model)
    passed = []
    for batch in (1, 5):
        for time in (1, 37):
            inputs = random_inputs(model, task, batch, time, rng)
            expected = eager(inputs)
            for backend, run in backends.items():
                check = f"{backend} vs eager PyTorch, batch {batch}, time {time}"
                assert_same(run(inputs), expected, check)
                passed.append(check)
    passed += _structural_checks(model, task, backends, rng)
    return passed


def verify_quantized(model: nn.Module, task: str, backend: str, run: Runner, seed: int = 1) -> list[str]:
    """The checks for an int8 graph: one step vs eager PyTorch at ``INT8_TOLERANCE``, the rest at ``TOLERANCE``."""
    model = model.eval()
    rng = np.random.default_rng(seed)
    passed = []
    for batch in (1, 5):
        inputs = random_inputs(model, task, batch, 1, rng)
        check = f"{backend} vs eager PyTorch, batch {batch}, time 1 (tolerance {INT8_TOLERANCE})"
        assert_same(run(inputs), torch_runner(model)(inputs), check, INT8_TOLERANCE)
        passed.append(check)
    return passed + _structural_checks(model, task, {backend: run}, rng)


def _structural_checks(model: nn.Module, task: str, backends: dict[str, Runner], rng: np.random.Generator) -> list[str]:
    passed = []
    for backend, run in backends.items():
        if task == "generation":
            check = f"{backend}: one token at a time with (h, c) carried == whole sequence"
            _check_stepping(run, model, task, rng, check)
        else:
            check = f"{backend}: each text in a padded batch == the text alone"
            _check_padding(run, model, task, rng, check)
        passed.append(check)
    return passed


def _check_stepping(run: Runner, model: nn.Module, task: str, rng: np.random.Generator, check: str) -> None:
    tokens, h, c = random_inputs(model, task, 3, 37, rng)
    whole = run([tokens, h, c])
    steps = []
    for t in range(tokens.shape[1]):
        logits, h, c = run([tokens[:, t : t + 1], h, c])
        steps.append(logits)
    assert_same([np.concatenate(steps, axis=1), h, c], whole, check)


def _check_padding(run: Runner, model: nn.Module, task: str, rng: np.random.Generator, check: str) -> None:
    tokens, lengths, h0, c0 = random_inputs(model, task, 6, 37, rng)
    padded = np.pad(tokens, ((0, 0), (0, 3)), constant_values=model.config.pad_id)  # padding past the longest too
    batched = run([padded, lengths, h0, c0])
    for row in range(tokens.shape[0]):
        n = lengths[row]
        alone = run([tokens[row : row + 1, :n], lengths[row : row + 1], h0[:, row : row + 1], c0[:, row : row + 1]])
        expected = [batched[0][row : row + 1], batched[1][:, row : row + 1], batched[2][:, row : row + 1]]
        assert_same(alone, expected, f"{check} (row {row}, length {n})")
