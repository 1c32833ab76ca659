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

A language model's decode graph is held to its step graph and sampler bit for
bit (``verify_decoding``): K tokens drawn in one ``decode.onnx`` call are those
``model.onnx`` (one token at a time) and ``sample.onnx`` draw row by row, and
one call of K steps is the same as several shorter calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .exporter import OUTPUT_NAMES, input_names
from .invariance import (
    DECODE_OUTPUTS,
    SAMPLING_KINDS,
    ModelShape,
    Runner,
    first_difference,
    neighbour_kinds,
    random_sampling,
    sampler_draw,
)

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


def named_runner(session, inputs: Sequence[str], outputs: Sequence[str]) -> Runner:
    """A runner for any onnxruntime session: numpy inputs in the order of ``inputs``, outputs in that of ``outputs``."""

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        return session.run(list(outputs), dict(zip(inputs, arrays, strict=True)))

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


# -- a language model's decode graph against its step graph and sampler ----------------------------------------------

DECODE_STEPS = (1, 3, 8)  # the K of the calls verify_decoding makes
DECODE_BATCH = 7  # one row of each sampling kind, two random


def _assert_bits(actual: list[np.ndarray], expected: list[np.ndarray], check: str, other: str) -> None:
    difference = first_difference(actual, expected, DECODE_OUTPUTS, other)
    if difference is not None:
        raise VerificationError(f"export verification failed: {check}: {difference}")


def _stepped_row(
    step: Runner, sample: Runner, inputs: list[np.ndarray], vocab: int, boundary: bool, rng: np.random.Generator
) -> list[np.ndarray]:
    """What one decode row (``inputs``, batch 1) must give: ``model.onnx`` fed one token at a time and
    ``sample.onnx`` after each step. Fills the row's draws as it goes: uniform, or (``boundary``) each on a
    boundary of the distribution it samples from, where one bit of difference would change the token."""
    tokens, h, c, draws, temperature, top_k, top_p, steps = inputs
    sampled = np.full(draws.shape, -1, np.int64)
    logits = np.zeros((1, vocab), np.float32)
    params = (float(temperature[0]), int(top_k[0]), float(top_p[0]))
    token = tokens.reshape(1, 1)
    for k in range(int(steps[0])):
        out, h, c = step([token, h, c])
        logits = out[:, -1].copy()
        draws[0, k] = sampler_draw(logits[0], params, boundary, rng, sample)
        (drawn,) = sample([logits, draws[:, k].copy(), temperature, top_k, top_p])
        sampled[0, k] = drawn[0]
        token = drawn.reshape(1, 1)
    return [sampled, logits, h, c]


def _random_rows(shape: ModelShape, kinds: list[str], k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Decode inputs for rows of the given sampling kinds: random tokens, states and draws, all K steps."""
    batch = len(kinds)
    size = (shape.state_rows, batch, shape.hidden_size)
    h0 = (rng.standard_normal(size) * 0.5).astype(np.float32)
    c0 = (rng.standard_normal(size) * 0.5).astype(np.float32)
    params = random_sampling(kinds, shape.vocab_size, rng)
    tokens = rng.integers(0, shape.vocab_size, batch)
    return [tokens, h0, c0, rng.random((batch, k)), *params, np.full(batch, k, np.int64)]


def _row_inputs(inputs: list[np.ndarray], row: int) -> list[np.ndarray]:
    tokens, h0, c0, *rest = inputs
    parts = [tokens[row : row + 1], h0[:, row : row + 1], c0[:, row : row + 1], *(a[row : row + 1] for a in rest)]
    return [part.copy() for part in parts]


def _decode_vs_stepping(step: Runner, sample: Runner, decode: Runner, shape: ModelShape, k: int, rng) -> str:
    kinds = [*SAMPLING_KINDS, *neighbour_kinds("random", DECODE_BATCH - len(SAMPLING_KINDS), rng)]
    inputs = _random_rows(shape, kinds, k, rng)
    steps = rng.integers(0, k + 1, len(kinds))
    none, every = rng.choice(len(kinds), 2, replace=False)
    steps[none], steps[every] = 0, k
    inputs[-1] = steps
    expected = []
    for row in range(len(kinds)):
        alone = _row_inputs(inputs, row)
        expected.append(_stepped_row(step, sample, alone, shape.vocab_size, row % 2 == 1, rng))
        inputs[3][row] = alone[3][0]  # the draws it chose
    actual = decode(inputs)
    for row, kind in enumerate(kinds):
        got = [
            actual[0][row : row + 1],
            actual[1][row : row + 1],
            actual[2][:, row : row + 1],
            actual[3][:, row : row + 1],
        ]
        draws = "draws on boundaries" if row % 2 else "uniform draws"
        what = f"row {row} of {len(kinds)} ({kind}, {steps[row]} steps, {draws})"
        check = f"decode.onnx vs model.onnx + sample.onnx, K {k}, {what}"
        _assert_bits(got, expected[row], check, "stepped")
    return (
        f"decode.onnx == model.onnx one token at a time + sample.onnx after each step, bitwise (sampled, logits, "
        f"hn, cn): K {k}, a batch of {len(kinds)} rows ({', '.join(SAMPLING_KINDS)}, 2 random), steps 0..K "
        "(0 and K included), uniform draws and draws on boundaries of the distributions"
    )


def _chained(decode: Runner, inputs: list[np.ndarray], splits: Sequence[int]) -> list[np.ndarray]:
    """Decode calls of ``splits`` steps one after another, carrying the last sampled token and (h, c)."""
    tokens, h, c, draws, *params, _ = inputs
    sampled, start = [], 0
    for k in splits:
        steps = np.full(tokens.shape, k, np.int64)
        out, logits, h, c = decode([tokens, h, c, draws[:, start : start + k].copy(), *params, steps])
        sampled.append(out)
        tokens, start = out[:, -1].copy(), start + k
    return [np.concatenate(sampled, axis=1), logits, h, c]


def _k_invariance(decode: Runner, shape: ModelShape, rng: np.random.Generator) -> list[str]:
    passed = []
    kinds = [*SAMPLING_KINDS, *neighbour_kinds("random", DECODE_BATCH - len(SAMPLING_KINDS), rng)]
    k = max(DECODE_STEPS)
    inputs = _random_rows(shape, kinds, k, rng)
    whole = decode(inputs)
    for splits in ([1] * k, [3, k - 3]):
        check = f"decode.onnx, K {k} in one call == {' + '.join(map(str, splits))}"
        _assert_bits(_chained(decode, inputs, splits), whole, check, f"K {k} at once")
        passed.append(f"{check}, bitwise, a batch of {len(kinds)} rows of mixed sampling")
    return passed


def verify_decoding(step: Runner, sample: Runner, decode: Runner, shape: ModelShape, seed: int = 2) -> list[str]:
    """A language model's decode graph against its step graph (``step``) and sampler (``sample``), bitwise; return
    the checks' descriptions, or raise VerificationError at the first mismatch. The runners take and return their
    graph's inputs and outputs in signature order."""
    rng = np.random.default_rng(seed)
    passed = [_decode_vs_stepping(step, sample, decode, shape, k, rng) for k in DECODE_STEPS]
    return passed + _k_invariance(decode, shape, rng)
