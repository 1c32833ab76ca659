"""Batch invariance: a row's results must not depend on the batch it runs in, bit for bit.

The checker drives a model through a run function (numpy inputs in signature
order in, ``[logits, hn, cn]`` out) and compares a subject row run alone with
the same row run at a random position among random neighbours, at batch sizes
1..8 and a spread up to 64. Comparison is bitwise: ``np.array_equal`` and the
raw bytes (which also tells -0.0 from 0.0).

- generation: the subject reads a prompt (random tokens, random (h0, c0)) and
  then generates greedily one token at a time with its state carried; every
  call (the prompt and each step) is made in a fresh batch of random
  neighbours, the subject at a new random position. Alone, the prompt is also
  fed one token at a time, which must give the same bits as reading it at once
  (the server may split a text differently depending on what it batches with).
- classification: the subject text (random length, random state) is run
  alone without padding, then among neighbour texts of other lengths, padded
  to the longest (plus a few extra columns), the padding filled with the pad
  id or with random tokens.

Only numpy is needed; the run function decides the runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Runner = Callable[[list[np.ndarray]], list[np.ndarray]]
OUTPUTS = ("logits", "hn", "cn")
DEFAULT_BATCH_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 23, 32, 47, 64)


@dataclass(frozen=True)
class ModelShape:
    """What the checker needs to make inputs: the task, the vocabulary and the state's shape."""

    task: str
    vocab_size: int
    state_rows: int  # layers * directions
    hidden_size: int
    pad_id: int = 0

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ModelShape:
        return cls(
            manifest["task"],
            manifest["vocab_size"],
            manifest["num_layers"] * manifest["num_directions"],
            manifest["hidden_size"],
            manifest.get("pad_id", 0),
        )


@dataclass(frozen=True)
class InvarianceResult:
    """The outcome of one check, as the manifest's ``batch_invariance`` records it for a backend."""

    invariant: bool
    checked: str
    first_failure: str | None

    def to_json(self) -> dict[str, Any]:
        return {"invariant": self.invariant, "checked": self.checked, "first_failure": self.first_failure}


class _Mismatch(Exception):
    pass


def _compare(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray], where: str) -> None:
    for name, a, e in zip(OUTPUTS, actual, expected, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        if a.shape != e.shape or a.dtype != e.dtype:
            raise _Mismatch(f"{where}: {name} is {a.dtype}{list(a.shape)}, alone {e.dtype}{list(e.shape)}")
        if not (np.array_equal(a, e) and a.tobytes() == e.tobytes()):
            differ = int(np.count_nonzero(a != e)) or int(np.count_nonzero(a.view(np.uint32) != e.view(np.uint32)))
            diff = float(np.nanmax(np.abs(a.astype(np.float64) - e))) if a.size else 0.0
            raise _Mismatch(f"{where}: {name} differs in {differ} of {a.size} values (max |diff| {diff:.3g})")


def _row(outputs: Sequence[np.ndarray], index: int) -> list[np.ndarray]:
    logits, hn, cn = outputs
    return [logits[index : index + 1].copy(), hn[:, index : index + 1].copy(), cn[:, index : index + 1].copy()]


def _state(shape: ModelShape, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = (shape.state_rows, batch, shape.hidden_size)
    return (
        (rng.standard_normal(size) * 0.5).astype(np.float32),
        (rng.standard_normal(size) * 0.5).astype(np.float32),
    )


def _place(alone: np.ndarray, neighbours: np.ndarray, position: int, axis: int) -> np.ndarray:
    """``neighbours`` with ``alone`` (batch 1 along ``axis``) inserted at ``position``."""
    before = np.take(neighbours, range(position), axis)
    after = np.take(neighbours, range(position, neighbours.shape[axis]), axis)
    return np.concatenate([before, alone, after], axis=axis)


def _check_generation(
    run: Runner, shape: ModelShape, sizes: Sequence[int], steps: int, max_prompt: int, rng: np.random.Generator
) -> None:
    for batch in sizes:
        tokens = rng.integers(0, shape.vocab_size, (1, int(rng.integers(2, max_prompt + 1))))
        h, c = _state(shape, 1, rng)
        for call in range(steps + 1):
            expected = _row(run([tokens, h, c]), 0)
            position = int(rng.integers(0, batch))
            others = rng.integers(0, shape.vocab_size, (batch - 1, tokens.shape[1]))
            oh, oc = _state(shape, batch - 1, rng)
            batched = run([_place(tokens, others, position, 0), _place(h, oh, position, 1), _place(c, oc, position, 1)])
            what = "the prompt" if call == 0 else f"greedy step {call}"
            _compare(_row(batched, position), expected, f"batch {batch}, row at position {position}, {what}")
            tokens = np.array([[int(np.argmax(expected[0][0, -1]))]], np.int64)
            h, c = expected[1], expected[2]


def _check_chunking(run: Runner, shape: ModelShape, max_prompt: int, rng: np.random.Generator) -> None:
    prompt = rng.integers(0, shape.vocab_size, (1, max_prompt))
    h, c = _state(shape, 1, rng)
    whole = _row(run([prompt, h, c]), 0)
    pieces = []
    for t in range(prompt.shape[1]):
        logits, h, c = _row(run([prompt[:, t : t + 1], h, c]), 0)
        pieces.append(logits)
    _compare([np.concatenate(pieces, axis=1), h, c], whole, f"alone, a {max_prompt}-token prompt one token at a time")


def _check_classification(
    run: Runner, shape: ModelShape, sizes: Sequence[int], max_length: int, rng: np.random.Generator
) -> None:
    for number, batch in enumerate(sizes):
        length = int(rng.integers(1, max_length + 1))
        text = rng.integers(1, shape.vocab_size, (1, length))
        h, c = _state(shape, 1, rng)
        expected = _row(run([text, np.array([length]), h, c]), 0)
        lengths = rng.integers(1, max_length + 1, batch)
        position = int(rng.integers(0, batch))
        lengths[position] = length
        width = int(lengths.max()) + int(rng.integers(0, 4))  # sometimes padding past the longest text too
        random_padding = number % 2 == 1
        if random_padding:
            tokens = rng.integers(1, shape.vocab_size, (batch, width))
        else:
            tokens = np.full((batch, width), shape.pad_id, np.int64)
        for row, n in enumerate(lengths):
            tokens[row, :n] = text[0] if row == position else rng.integers(1, shape.vocab_size, n)
        oh, oc = _state(shape, batch, rng)
        oh[:, position : position + 1], oc[:, position : position + 1] = h, c
        batched = run([tokens, lengths.astype(np.int64), oh, oc])
        padding = "random tokens" if random_padding else "the pad id"
        where = f"batch {batch}, text of {length} tokens at position {position}, padded to {width} with {padding}"
        _compare(_row(batched, position), expected, where)


def describe(task: str, sizes: Sequence[int], steps: int = 4, max_length: int = 24) -> str:
    """What :func:`check_batch_invariance` checks, in words (the manifest's ``checked``)."""
    listed = ", ".join(str(s) for s in sizes)
    common = "random neighbours with random (h0, c0), the row at a random position; logits, hn, cn compared bitwise"
    if task == "generation":
        return (
            f"batch sizes {listed}: a prompt of 2-{max_length} tokens then {steps} greedy one-token steps, every call "
            f"in a fresh batch of {common}; and alone, a {max_length}-token prompt fed one token at a time == read "
            "at once"
        )
    return (
        f"batch sizes {listed}: a text of 1-{max_length} tokens alone vs among texts of 1-{max_length} tokens padded "
        f"(pad id or random tokens, up to 3 columns past the longest), {common}"
    )


def check_batch_invariance(
    run: Runner,
    shape: ModelShape,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    steps: int = 4,
    max_length: int = 24,
    seed: int = 0,
) -> InvarianceResult:
    """Check ``run`` for batch invariance; the result says what was checked and the first mismatch, if any."""
    rng = np.random.default_rng(seed)
    if shape.task == "generation":
        checks = [
            lambda: _check_generation(run, shape, batch_sizes, steps, max_length, rng),
            lambda: _check_chunking(run, shape, max_length, rng),
        ]
    else:
        checks = [lambda: _check_classification(run, shape, batch_sizes, max_length, rng)]
    failures = []
    for check in checks:  # every kind of check runs; the first mismatch of each is reported
        try:
            check()
        except _Mismatch as mismatch:
            failures.append(str(mismatch))
    checked = describe(shape.task, batch_sizes, steps, max_length)
    return InvarianceResult(not failures, checked, "; ".join(failures) or None)
