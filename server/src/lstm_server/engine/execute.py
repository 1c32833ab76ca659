"""Executing a ``StepPlan``: one call of the decode graph on the plan's rows, contained (a row that raises or
turns non-finite fails alone), and what each row then sends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..runtime.decoding import DecodeInputs, DecodeOutputs, Decoder
from .faults import DECODE, MODEL_FAILED, NON_FINITE, RowFailure, contain
from .plan import StepPlan
from .sampling import as_uint64, uniforms
from .slots import StateSlots, all_finite, finite_rows

Send = tuple[str, str | None, int | None]  # (text sent, why the turn ends there, the pending character: None if none)


@dataclass
class StepOutputs:
    """What a decode call gave: the rows that ran and their outputs, and each failed row's ``RowFailure``."""

    inputs: DecodeInputs
    rows: np.ndarray  # [m] positions in the plan, in the order of ``out``
    out: DecodeOutputs | None  # None: no row ran
    failures: dict[int, RowFailure]


def _join(parts: list[tuple[np.ndarray, DecodeOutputs]]) -> tuple[np.ndarray, DecodeOutputs]:
    """The rows and outputs of several contained decoder calls, as one batch."""
    if len(parts) == 1:
        return parts[0]
    outs = [out for _, out in parts]
    return np.concatenate([r for r, _ in parts]), DecodeOutputs(
        np.concatenate([o.sampled for o in outs]),
        np.concatenate([o.logits for o in outs]),
        np.concatenate([o.h for o in outs], axis=1),
        np.concatenate([o.c for o in outs], axis=1),
    )


def execute(decoder: Decoder, slots: StateSlots, step: StepPlan, observe: Callable[[float], None]) -> StepOutputs:
    """The decoder on the plan's rows (their state gathered from ``slots``), contained; rows that raised or became
    non-finite are failures. ``observe`` takes the call's seconds."""
    n = len(step.turns)
    inputs = decoder.inputs(n, step.k)
    inputs.tokens[:] = step.tokens
    np.take(slots.h, step.slots, axis=1, out=inputs.h0, mode="clip")  # "raise" would copy via a buffer
    np.take(slots.c, step.slots, axis=1, out=inputs.c0, mode="clip")
    params = [t.sampling for t in step.turns]
    inputs.temperature[:] = np.fromiter((p.temperature for p in params), np.float64, n)
    inputs.top_k[:] = np.fromiter((p.top_k for p in params), np.int64, n)
    inputs.top_p[:] = np.fromiter((p.top_p for p in params), np.float64, n)
    inputs.steps[:] = step.steps
    positions = step.positions[:, None] + np.arange(step.k, dtype=np.uint64)
    inputs.draws[:] = uniforms(as_uint64(p.seed for p in params)[:, None], positions)

    def run(rows: np.ndarray) -> DecodeOutputs:
        if len(rows) == n:
            return decoder.decode(inputs)
        return decoder.decode(inputs.rows(rows)).copy()  # the next call reuses the decoder's buffers

    called = time.perf_counter()
    parts, raised = contain(n, run, "model step")
    observe(time.perf_counter() - called)
    kept = [t.tokens_seen - 1 for t in step.turns]  # a failed row's pending character was counted, not read
    failures = {i: RowFailure(MODEL_FAILED, DECODE, kept[i], 0, error) for i, error in raised.items()}
    if not parts:
        return StepOutputs(inputs, np.zeros(0, np.intp), None, failures)
    rows, out = _join(parts)
    if not all_finite(out.h, out.c, out.logits):
        finite = finite_rows(out.h, out.c, out.logits)
        failures.update({i: RowFailure(NON_FINITE, DECODE, kept[i]) for i in rows[~finite].tolist()})
        rows = rows[finite]
        out = DecodeOutputs(out.sampled[finite], out.logits[finite], out.h[:, finite], out.c[:, finite])
    return StepOutputs(inputs, rows, out, failures)


def sends(step: StepPlan, outputs: StepOutputs, vocab: np.ndarray) -> tuple[dict[int, Send], list[int]]:
    """Per row that ran, what it sends (``Send``); and the positions in ``outputs.rows`` of the rows whose stop
    string ended before their last character read (their state must be read again: ``GenerationEngine._rerun``).
    ``vocab``: the characters, as an object array."""
    rows, out, steps = outputs.rows, outputs.out, step.steps
    found: dict[int, Send] = {}
    rerun: list[int] = []
    texts = vocab[np.maximum(out.sampled, 0)].sum(axis=1)  # one string per row (past its steps: unused)
    for j, i in enumerate(rows.tolist()):
        if step.finishing[i]:
            found[i] = ("", None, None)  # its pending character is read: complete
            continue
        text = texts[j][: steps[i]]
        sent, reason = step.turns[i].to_send(text)
        pending = int(out.sampled[j, sent - 1]) if sent == steps[i] else None  # drawn, sent, not yet read
        found[i] = (text[:sent], reason, pending)
        if sent + 1 < steps[i]:
            rerun.append(j)
    return found, rerun
