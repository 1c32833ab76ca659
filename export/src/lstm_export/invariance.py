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

A language model's sampler (``sample.onnx``) and decode graph (``decode.onnx``)
are held to the same standard (``check_decoding_invariance``): the subject row
gets sampling parameters of every kind in turn (greedy, temperature, top_k,
top_p, both), and its neighbours get random parameters, none that truncate, or
only ones that truncate, so a row that does not truncate is checked beside rows
that do and the other way round (the sampler sorts a batch only when some row
truncates). Draws are uniform or, where the row's distribution is known, placed
exactly on a boundary of its cumulative distribution (``cdf_points``), where one
bit of difference in the row's arithmetic would change its token.

Only numpy is needed; the run function decides the runtime.
"""

from __future__ import annotations

import math
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


def first_difference(
    actual: Sequence[np.ndarray], expected: Sequence[np.ndarray], names: Sequence[str] = OUTPUTS, other: str = "alone"
) -> str | None:
    """The first output (in ``names`` order) whose dtype, shape or bits differ, in words; None if all are equal."""
    for name, a, e in zip(names, actual, expected, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        if a.shape != e.shape or a.dtype != e.dtype:
            return f"{name} is {a.dtype}{list(a.shape)}, {other} {e.dtype}{list(e.shape)}"
        if not (np.array_equal(a, e) and a.tobytes() == e.tobytes()):
            bits = f"u{a.itemsize}"  # also tells -0.0 from 0.0
            differ = int(np.count_nonzero(a != e)) or int(np.count_nonzero(a.view(bits) != e.view(bits)))
            if a.dtype.kind in "iu" and a.size <= 16:
                return f"{name} differs: {a.ravel().tolist()}, {other} {e.ravel().tolist()}"
            diff = float(np.nanmax(np.abs(a.astype(np.float64) - e))) if a.size else 0.0
            return f"{name} differs in {differ} of {a.size} values (max |diff| {diff:.3g})"
    return None


def _compare(
    actual: Sequence[np.ndarray], expected: Sequence[np.ndarray], where: str, names: Sequence[str] = OUTPUTS
) -> None:
    difference = first_difference(actual, expected, names)
    if difference is not None:
        raise _Mismatch(f"{where}: {difference}")


def _row(outputs: Sequence[np.ndarray], index: int) -> list[np.ndarray]:
    """Row ``index`` of the outputs: batch-first ones (logits, sampled), then ``hn`` and ``cn`` (batch second)."""
    *batch_first, hn, cn = outputs
    rows = [o[index : index + 1].copy() for o in batch_first]
    return [*rows, hn[:, index : index + 1].copy(), cn[:, index : index + 1].copy()]


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


# -- a language model's sampler and decode graph ----------------------------------------------------------------------

SAMPLER_OUTPUTS = ("token",)
DECODE_OUTPUTS = ("sampled", "logits", "hn", "cn")
SAMPLING_KINDS = ("greedy", "temperature", "top_k", "top_p", "top_k and top_p")
TRUNCATING = SAMPLING_KINDS[2:]
NEIGHBOURS = {
    "random": SAMPLING_KINDS,
    "none truncating": ("greedy", "temperature"),
    "all truncating": TRUNCATING,
}
DECODE_CALLS = (8, 3, 1)  # the K of the subject's successive decode calls
EDGE_ROWS = 8  # the rows of a sampler check's batch that draw on an edge of their distribution
# decode.onnx's inputs along their batch axis: tokens, h0, c0, draws, temperature, top_k, top_p, steps
_DECODE_BATCH_AXES = (0, 1, 1, 0, 0, 0, 0, 0)


def random_sampling(kinds: Sequence[str], vocab: int, rng: np.random.Generator) -> list[np.ndarray]:
    """[temperature (float64), top_k (int64), top_p (float64)] for rows of the given kinds (``SAMPLING_KINDS``).
    A greedy row gets random limits too, which it must ignore; top_k is 1, a small number or up to the vocabulary."""
    n = len(kinds)
    temperature = rng.uniform(0.25, 2.0, n)
    top_k, top_p = np.zeros(n, np.int64), np.ones(n)
    for row, kind in enumerate(kinds):
        if kind not in SAMPLING_KINDS:
            raise ValueError(f"unknown sampling kind {kind!r}: expected one of {SAMPLING_KINDS}")
        limit_k, limit_p = "top_k" in kind, "top_p" in kind
        if kind == "greedy":
            temperature[row] = 0.0
            limit_k, limit_p = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
        if limit_k:
            top_k[row] = (1, int(rng.integers(2, 8)), int(rng.integers(1, vocab + 1)))[int(rng.integers(0, 3))]
        if limit_p:
            top_p[row] = rng.uniform(0.05, 0.99)
    return [temperature, top_k, top_p]


def neighbour_kinds(mode: str, count: int, rng: np.random.Generator) -> list[str]:
    """``count`` sampling kinds drawn from the pool of ``mode`` (``NEIGHBOURS``)."""
    pool = NEIGHBOURS[mode]
    return [pool[int(i)] for i in rng.integers(0, len(pool), count)]


def cdf_points(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Where the sampler's token changes for one row of ``logits``: its cumulative kept probabilities in the order
    it walks them (the vocabulary's, or the ranks' when top_k or top_p limits the row), in (0, 1), computed here
    in numpy; empty for a greedy row. A draw on one of them sits on the edge between two tokens, so a difference
    in the last bit of the row's arithmetic would change its token."""
    if temperature <= 0:
        return np.zeros(0)
    scaled = logits.astype(np.float64) / temperature
    weights = np.array([math.pow(math.e, x) for x in (scaled - scaled.max()).tolist()])  # as the graph's Pow
    cumulative = np.cumsum(weights)  # sequential, in vocabulary order, as the graph's CumSum
    if top_k > 0 or top_p < 1:
        ranked = weights[np.argsort(-weights, kind="stable")] / cumulative[-1]
        ranks = np.arange(ranked.size)
        before = np.concatenate([[0.0], np.cumsum(ranked)[:-1]])
        keep = ((ranks < top_k) | (top_k <= 0) | (ranks == 0)) & (before < top_p)
        cumulative = np.cumsum(np.where(keep, ranked, 0.0))
    points = cumulative[:-1] / cumulative[-1]
    return np.unique(points[(points > 0) & (points < 1)])


def sampler_draw(
    logits: np.ndarray, params: Sequence[float], boundary: bool, rng: np.random.Generator, sample: Runner | None = None
) -> float:
    """A uniform draw for one row (``logits`` [vocab], ``params`` (temperature, top_k, top_p)), or (``boundary``)
    one on an edge between two tokens: a random point of ``cdf_points`` and, with ``sample`` (the sampler, run on
    the row alone), the exact edge found around it by bisection, the draw being the last float that gives the
    lower token or the first that gives the upper one. A difference in the last bit of the row's arithmetic then
    moves the edge past the draw about half the time, whatever the arithmetic's details."""
    points = cdf_points(logits, *params) if boundary else np.zeros(0)
    if points.size == 0:
        return float(rng.random())
    point = float(points[int(rng.integers(0, points.size))])
    if sample is None:
        return point
    row = [logits[None].astype(np.float32), *(np.array([v]) for v in params)]

    def token(u: float) -> int:
        return int(sample([row[0], np.array([u]), *row[1:]])[0][0])

    low, high = point * (1 - 1e-12), min(point * (1 + 1e-12), np.nextafter(1.0, 0.0))
    low_token = token(low)
    if low_token == token(high):
        return point  # no edge in the bracket (an arithmetic far from cdf_points'): a draw near one
    while np.nextafter(low, 1.0) < high:
        middle = low + (high - low) / 2
        if token(middle) == low_token:
            low = middle
        else:
            high = middle
    return float(high if rng.integers(0, 2) else low)


def _random_logits(vocab: int, rng: np.random.Generator) -> np.ndarray:
    """Random logits [1, vocab] (float32): tied values every other time (TopK must break ties by index), and the
    last few tokens among the most likely every third time (a vectorized kernel computes the last elements of a
    row alone with its scalar code, but not the same elements of a row inside a batch)."""
    logits = (rng.standard_normal((1, vocab)) * rng.uniform(1.0, 4.0)).astype(np.float32)
    if rng.integers(0, 2):
        tied = rng.choice(vocab, size=min(vocab, 4), replace=False)
        logits[0, tied] = logits[0, tied[0]]
    if rng.integers(0, 3) == 0:
        last = min(vocab, 7)
        logits[0, -last:] = logits.max() - rng.uniform(0.0, 1.0, last).astype(np.float32)
    return logits


def _batch_kinds(number: int, batch: int, rng: np.random.Generator) -> tuple[list[str], int, str]:
    """The sampling kinds of a batch: the subject's kind (every kind in turn) at a random position among neighbours
    of the mode's pool (every mode in turn); (kinds, position, mode)."""
    kind = SAMPLING_KINDS[number % len(SAMPLING_KINDS)]
    mode = list(NEIGHBOURS)[number % len(NEIGHBOURS)]
    position = int(rng.integers(0, batch))
    kinds = neighbour_kinds(mode, batch - 1, rng)
    kinds.insert(position, kind)
    return kinds, position, mode


def _beside(kinds: Sequence[str], row: int) -> str:
    others = [k for i, k in enumerate(kinds) if i != row]
    if not others:
        return "alone in the batch"
    return f"beside {sum(k in TRUNCATING for k in others)} of {len(others)} rows that truncate"


def _row_alone(inputs: Sequence[np.ndarray], row: int, axes: Sequence[int]) -> list[np.ndarray]:
    """Row ``row`` of a batch's inputs, each copied into a buffer of its own."""
    return [np.take(a, [row], axis).copy() for a, axis in zip(inputs, axes, strict=True)]


def _check_sampler(run: Runner, shape: ModelShape, sizes: Sequence[int], rng: np.random.Generator) -> None:
    """Every row of each batch against the same row alone; the rows draw uniformly once, then twice with
    ``EDGE_ROWS`` of them (the subject among them) on an edge of their distribution."""
    vocab = shape.vocab_size
    for number, batch in enumerate(sizes):
        kinds, position, _ = _batch_kinds(number, batch, rng)
        params = random_sampling(kinds, vocab, rng)
        for boundary in (False, True, True):
            logits = np.concatenate([_random_logits(vocab, rng) for _ in range(batch)])
            edge = {position, *rng.choice(batch, min(batch, EDGE_ROWS) - 1, replace=False).tolist()} if boundary else ()
            draws = np.array(
                [
                    sampler_draw(
                        logits[r], (float(params[0][r]), int(params[1][r]), float(params[2][r])), r in edge, rng, run
                    )
                    for r in range(batch)
                ]
            )
            inputs = [logits, draws, *params]
            (tokens,) = run(inputs)
            for row in range(batch):
                expected = run(_row_alone(inputs, row, (0,) * len(inputs)))
                draw = "a draw on a boundary of its distribution" if row in edge else "a uniform draw"
                where = f"batch {batch}, a {kinds[row]} row at position {row} with {draw}, {_beside(kinds, row)}"
                _compare([tokens[row : row + 1]], expected, where, SAMPLER_OUTPUTS)


def _decode_draws(
    run: Runner, sample: Runner, inputs: list[np.ndarray], boundary: bool, rng: np.random.Generator
) -> np.ndarray:
    """The subject's draws [1, K] for a decode call with ``inputs`` (draws: a placeholder): uniform, or each on an
    edge of the distribution it samples from: the decode graph alone with the first k + 1 draws gives the logits
    the k-th token is drawn from, and the sampler (which ``verify.verify_decoding`` holds to the decode graph's)
    the edge (``sampler_draw``)."""
    tokens, h, c, placeholder, temperature, top_k, top_p, steps = inputs
    draws = rng.random(placeholder.shape)
    if not boundary:
        return draws
    params = (float(temperature[0]), int(top_k[0]), float(top_p[0]))
    for k in range(int(steps[0])):
        logits = run([tokens, h, c, draws[:, : k + 1], temperature, top_k, top_p, np.array([k + 1])])[1]
        draws[0, k] = sampler_draw(logits[0], params, True, rng, sample)
    return draws


def _check_decoding(
    run: Runner, sample: Runner, shape: ModelShape, sizes: Sequence[int], rng: np.random.Generator
) -> None:
    """The subject makes ``DECODE_CALLS``, its token and state carried, each in a fresh batch at a new position,
    with draws on boundaries except in the second call; every neighbour is also compared with itself alone."""
    vocab = shape.vocab_size
    for number, batch in enumerate(sizes):
        kinds, _, mode = _batch_kinds(number, batch, rng)
        kind = kinds[0] if batch == 1 else SAMPLING_KINDS[number % len(SAMPLING_KINDS)]
        tokens, (h, c) = rng.integers(0, vocab, 1), _state(shape, 1, rng)
        params = random_sampling([kind], vocab, rng)
        for call, k in enumerate(DECODE_CALLS):
            steps = np.array([k if call == 0 else int(rng.integers(0, k + 1))])
            boundary = call != 1
            draws = _decode_draws(run, sample, [tokens, h, c, np.zeros((1, k)), *params, steps], boundary, rng)
            subject = [tokens, h, c, draws, *params, steps]
            expected = _row(run(subject), 0)
            position, others = int(rng.integers(0, batch)), batch - 1
            row_kinds = neighbour_kinds(mode, others, rng)
            row_kinds.insert(position, kind)
            neighbours = [
                rng.integers(0, vocab, others),
                *_state(shape, others, rng),
                rng.random((others, k)),
                *random_sampling(row_kinds[:position] + row_kinds[position + 1 :], vocab, rng),
                rng.integers(0, k + 1, others),
            ]
            inputs = [
                _place(a, o, position, axis) for a, o, axis in zip(subject, neighbours, _DECODE_BATCH_AXES, strict=True)
            ]
            batched = run(inputs)
            draw = "draws on boundaries of its distributions" if boundary else "uniform draws"
            where = (
                f"batch {batch}, the {kind} row at position {position}, call {call + 1} (K {k}, {steps[0]} steps, "
                f"{draw}), {_beside(row_kinds, position)}"
            )
            _compare(_row(batched, position), expected, where, DECODE_OUTPUTS)
            for row in range(batch):
                if row != position:
                    alone = run(_row_alone(inputs, row, _DECODE_BATCH_AXES))
                    where = (
                        f"batch {batch}, a {row_kinds[row]} neighbour at position {row} (K {k}, uniform draws), "
                        f"{_beside(row_kinds, row)}"
                    )
                    _compare(_row(batched, row), _row(alone, 0), where, DECODE_OUTPUTS)
            if steps[0] > 0:
                tokens = expected[0][0, steps[0] - 1 : steps[0]]
            h, c = expected[2], expected[3]


def describe_decoding(sizes: Sequence[int]) -> str:
    """What :func:`check_decoding_invariance` checks, in words (the manifest's ``checked``)."""
    listed = ", ".join(str(s) for s in sizes)
    calls = " then ".join(f"K {k}" for k in DECODE_CALLS)
    return (
        f"batch sizes {listed}: every row of a batch vs the same row alone, bitwise; in each batch a subject row "
        f"sampling {', '.join(SAMPLING_KINDS)} in turn, at a random position, among neighbours whose sampling is "
        "random, never truncating or always truncating in turn (random parameters, logits, states and steps). "
        f"decode.onnx: the subject makes three calls ({calls}; all K steps, then 0..K), its token and state carried, "
        "each in a fresh batch, its draws on boundaries of its distributions except in the second call; sampled, "
        "logits, hn, cn compared. sample.onnx: random logits (ties every other time, the last tokens likely every "
        f"third time), three calls, every row drawing uniformly in the first and {EDGE_ROWS} of them (the subject "
        "included) on an edge of their distribution in the others; the token compared"
    )


def check_sampler_invariance(
    sample: Runner, shape: ModelShape, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, seed: int = 0
) -> InvarianceResult:
    """Check a sampler alone (inputs and outputs in ``sample.onnx``'s order), as ``check_decoding_invariance`` does."""
    try:
        _check_sampler(sample, shape, batch_sizes, np.random.default_rng(seed))
    except _Mismatch as mismatch:
        return InvarianceResult(False, describe_decoding(batch_sizes), f"sample.onnx: {mismatch}")
    return InvarianceResult(True, describe_decoding(batch_sizes), None)


def check_decoding_invariance(
    decode: Runner,
    sample: Runner,
    shape: ModelShape,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    seed: int = 0,
) -> InvarianceResult:
    """Check a language model's decode graph (inputs and outputs in ``decode.onnx``'s order) and sampler
    (``sample.onnx``'s) for batch invariance; the failures are named by file."""
    rng = np.random.default_rng(seed)
    failures = []
    for name, check in (
        ("decode.onnx", lambda: _check_decoding(decode, sample, shape, batch_sizes, rng)),
        ("sample.onnx", lambda: _check_sampler(sample, shape, batch_sizes, rng)),
    ):
        try:
            check()
        except _Mismatch as mismatch:
            failures.append(f"{name}: {mismatch}")
    return InvarianceResult(not failures, describe_decoding(batch_sizes), "; ".join(failures) or None)
