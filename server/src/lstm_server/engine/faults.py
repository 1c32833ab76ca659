"""Fault containment for batched model calls: a row that fails alone fails alone, and says how (``RowFailure``).

A call over many rows (sessions stepped together, texts classified together) that raises is run again in
halves, down to single rows, until the rows that fail alone are found; the others keep their results, which do
not depend on their batch (the graphs are batch-invariant).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

log = logging.getLogger(__name__)
T = TypeVar("T")


def contain(
    n: int, call: Callable[[np.ndarray], T], what: str = "model call"
) -> tuple[list[tuple[np.ndarray, T]], dict[int, Exception]]:
    """Run ``call(rows)`` on rows ``0..n-1`` together; if it raises, retry each half, down to single rows.

    Returns the (rows, result) of every call that succeeded and the error of each row that fails alone: one call
    when nothing fails, about ``2 log2(n)`` more per failing row.
    """
    parts: list[tuple[np.ndarray, T]] = []
    failed: dict[int, Exception] = {}
    todo = [np.arange(n)]
    while todo:
        rows = todo.pop()
        try:
            parts.append((rows, call(rows)))
        except Exception as error:
            if len(rows) == 1:
                failed[int(rows[0])] = error
                continue
            if len(rows) == n:
                log.warning("%s on %d rows failed (%s); retrying the rows apart", what, n, error)
            half = len(rows) // 2
            todo += [rows[half:], rows[:half]]
    return parts, failed


NON_FINITE, MODEL_FAILED = "NON_FINITE_STATE", "MODEL_FAILED"  # what a row's failure was (also its error reason)
PROMPT, SAMPLE, DECODE, STEP, ENGINE = "prompt", "sample", "decode", "step", "engine"  # where it happened


@dataclass(frozen=True)
class RowFailure:
    """What happened to one row that failed alone: ``kind`` (NON_FINITE or MODEL_FAILED), ``phase`` (reading a
    prompt or a Step's text, drawing the first character, decoding), ``kept``: the characters its slot's state has
    read and keeps (None: the engine itself failed and the state is not trusted), ``chars``: the characters the
    failed call was to read, ``cause``: the runtime's exception (None for NON_FINITE). The layers above word it."""

    kind: str
    phase: str
    kept: int | None
    chars: int = 0
    cause: BaseException | None = None


class RowFailed(Exception):
    """A read or a Step failed alone (``failure`` says how); nothing was written."""

    def __init__(self, failure: RowFailure) -> None:
        super().__init__(f"{failure.kind} in {failure.phase}: {failure.cause}")
        self.failure = failure
