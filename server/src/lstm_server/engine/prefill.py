"""Reading prompts into slots' states (the prefill), several at once.

Turns that join together, and session prompt reads (``GenerationEngine.read``) taken at the same time, share
their calls: each call takes the rows still reading, the same number of characters each (up to the next prompt's
end), so n prompts of one length take one call. Reading a prompt in parts with the state carried equals reading it
at once, and a row's results do not depend on its batch (both are in every entry's batch-invariance check), so a
row reads exactly as it would alone. A call that raises is retried apart (``contain``); a prompt that fails fails
alone and nothing of it is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import numpy as np

from ..runtime.backends import Backend
from ..runtime.decoding import Decoder
from .faults import MODEL_FAILED, NON_FINITE, PROMPT, RowFailure, contain
from .prefix_cache import CachedState
from .sampling import Sampling, as_uint64, uniforms
from .slots import finite_rows
from .turn import Turn


class PromptState(NamedTuple):
    """A row's state after its prompt: ``logits`` [1, vocab], ``h`` and ``c`` [layers x directions, 1, hidden]."""

    logits: np.ndarray
    h: np.ndarray
    c: np.ndarray


@dataclass
class CacheUse:
    """A read into a fresh state through the prefix cache (``prefix_cache.py``) of ``scope``: the prefill thread
    fills in the cached prefix it started from (``saved`` characters), when it looked, and (with ``publish``) the
    states it read at the stride's multiples and at the end, as (position, state), before the read's result is
    visible."""

    scope: str
    publish: bool = False
    saved: int = 0
    started: float = 0.0
    ended: float = 0.0
    read: list[tuple[int, CachedState]] = field(default_factory=list)


@dataclass(frozen=True)
class Admission:
    """A prompt job: a turn waiting for its prompt to be read and its first character drawn."""

    turn: Turn
    tokens: np.ndarray
    cache: CacheUse | None = None  # the slot holds a fresh state: read through the prefix cache

    @property
    def slot(self) -> int:
        return self.turn.slot


@dataclass(frozen=True)
class PromptRead:
    """A prompt job: a prompt for an idle slot's state to read; ``future`` gets None, or ``RowFailed``."""

    slot: int
    tokens: np.ndarray
    future: Future
    cache: CacheUse | None = None  # the slot holds a fresh state: read through the prefix cache


PromptJob = Admission | PromptRead


def read_prompts(
    backend: Backend,
    h: np.ndarray,
    c: np.ndarray,
    vocab: int,
    prompts: list[np.ndarray],
    observe: Callable[[float], None],
    cuts: list[list[int]] | None = None,
) -> tuple[list[PromptState | RowFailure], list[list[tuple[int, PromptState]]]]:
    """Per prompt, the state after it from ``h``, ``c`` [layers x directions, n, hidden] (read in shared calls,
    each timed through ``observe``), or how it failed alone (``kept`` left None: the caller knows it); and per
    prompt, its states after the positions ``cuts`` names for it (each before its end; the calls end there too),
    as (position, state), for a prompt that read to its end."""
    n = len(prompts)
    logits = np.zeros((n, vocab), np.float32)
    lengths = np.fromiter(map(len, prompts), np.int64, n)
    cuts = cuts or [[] for _ in range(n)]
    failed: dict[int, RowFailure] = {}
    kept: list[list[tuple[int, PromptState]]] = [[] for _ in range(n)]
    wanted: dict[int, list[int]] = {}  # rows by the position after which their state is kept
    for r, positions in enumerate(cuts):
        for position in positions:
            wanted.setdefault(position, []).append(r)
    start = 0
    for end in np.unique(np.concatenate([lengths, list(wanted)])).astype(np.int64).tolist():
        rows = np.flatnonzero(lengths >= end)
        rows = rows[[r not in failed for r in rows.tolist()]]
        if len(rows):
            tokens = np.stack([prompts[r][start:end] for r in rows.tolist()])
            parts, raised = contain(len(rows), partial(_read_part, backend, tokens, h, c, rows, observe), "prompt read")
            for part, (step_logits, new_h, new_c) in parts:
                h[:, rows[part]], c[:, rows[part]], logits[rows[part]] = new_h, new_c, step_logits[:, -1]
            for i, error in raised.items():
                r = int(rows[i])
                failed[r] = RowFailure(MODEL_FAILED, PROMPT, None, int(lengths[r]), error)
            for r in wanted.get(end, []):
                if r not in failed:
                    kept[r].append((end, PromptState(logits[[r]].copy(), h[:, [r]].copy(), c[:, [r]].copy())))
        start = end
    finite = finite_rows(h, c, logits)
    return [
        failed[r]
        if r in failed
        else PromptState(logits[[r]], h[:, [r]], c[:, [r]])
        if finite[r]
        else RowFailure(NON_FINITE, PROMPT, None, int(lengths[r]))
        for r in range(n)
    ], [kept[r] if r not in failed and finite[r] else [] for r in range(n)]


def _read_part(
    backend: Backend,
    tokens: np.ndarray,
    h: np.ndarray,
    c: np.ndarray,
    rows: np.ndarray,
    observe: Callable[[float], None],
    part: np.ndarray,
):
    """One call of ``read_prompts``: rows ``rows[part]`` read ``tokens[part]`` from their state in ``h``, ``c``."""
    started = time.perf_counter()
    out = backend.run({"tokens": tokens[part], "h0": h[:, rows[part]], "c0": c[:, rows[part]]})
    observe(time.perf_counter() - started)
    return out


def draw_first(decoder: Decoder, p: Sampling, logits: np.ndarray, position: int) -> int:
    """A turn's first character, from the logits after its prompt [1, vocab], at ``position``."""
    draws = uniforms(as_uint64([p.seed]), as_uint64([position]))
    top_k = np.array([p.top_k], np.int64)
    return int(decoder.sample(logits, draws, np.array([p.temperature]), top_k, np.array([p.top_p]))[0])
