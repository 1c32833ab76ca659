"""What one decode call does: which rows, and how many characters each draws.

``plan`` is pure: it reads the running turns (the engine's lock held) and returns a ``StepPlan``. ``StepSizer``
is the K policy: as many characters per row as fit in the time budget at the time a character has taken at this
batch size (measured, per power-of-two batch bucket), at most ``max_decode_steps``; after a turn joins, K starts
again at 1 and doubles with every call (others are often joining at the same time, and each waits for the call in
flight), so a turn that joins waits at most about one budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sampling import as_uint64
from .turn import Turn


@dataclass(frozen=True)
class StepPlan:
    """One decode call: its rows in order, what each feeds and draws."""

    turns: list[Turn]
    slots: np.ndarray  # [n] intp
    tokens: np.ndarray  # [n] int64: each row's pending character, fed first
    positions: np.ndarray  # [n] uint64: the characters each row's state has counted (its first draw's position)
    steps: np.ndarray  # [n] int64: characters each row draws (1 for a finishing row: it only feeds its pending one)
    finishing: np.ndarray  # [n] bool: no character of the call is sent
    budget: int  # the K the time budget allows: a call whose longest row reaches it is timed

    @property
    def k(self) -> int:
        return int(self.steps.max())


def plan(turns: list[Turn], k: int, budget: int, buffer_limit: int) -> StepPlan:
    """The call for ``turns`` (lock held): each row draws up to ``k`` characters, no more than is left of its
    ``max_tokens`` (plus the last drawn, which may go unsent) or than the room in its outbox."""
    n = len(turns)
    finishing = np.fromiter((t.finishing for t in turns), bool, n)
    room = np.fromiter((t.remaining + 1 for t in turns), np.int64, n)
    room = np.minimum(room, buffer_limit - np.fromiter((t.buffered for t in turns), np.int64, n))
    return StepPlan(
        turns,
        np.fromiter((t.slot for t in turns), np.intp, n),
        np.fromiter((t.pending for t in turns), np.int64, n),
        as_uint64(t.tokens_seen for t in turns),  # modulo 2^64: positions past it wrap
        np.where(finishing, 1, np.clip(room, 1, k)),
        finishing,
        budget,
    )


def bucket(batch: int) -> int:
    """The power of two at or above ``batch``: calls on about as many rows share a time per character."""
    return 1 << (batch - 1).bit_length()


class StepSizer:
    """K for each call (model thread only)."""

    def __init__(self, budget_ms: float, max_steps: int) -> None:
        self.budget_s = budget_ms / 1000
        self.max_steps = max_steps
        self._char_seconds: dict[int, float] = {}  # per batch bucket: a moving average of a call's time / K
        self._ramp = 1  # K's cap: 1 after a turn joins, doubled by every call since

    def joined(self) -> None:
        """A turn joined: short calls until the others joining with it are in."""
        self._ramp = 1

    def next(self, batch: int) -> tuple[int, int]:
        """(K for a call on ``batch`` rows, the K the time budget alone allows)."""
        seconds = self._char_seconds.get(bucket(batch))
        ramp, self._ramp = self._ramp, min(2 * self._ramp, self.max_steps)
        if seconds is None:
            return 1, 1  # measured first
        budget = max(1, min(self.max_steps, int(self.budget_s / seconds)))
        return min(ramp, budget), budget

    def measured(self, batch: int, steps: int, seconds: float) -> None:
        """Fold a call that took ``steps`` characters (the budget's K: a shorter call spreads its fixed cost over
        few characters and would hold K down) into its batch bucket's time per character."""
        key, per_char = bucket(batch), seconds / steps
        old = self._char_seconds.get(key)
        self._char_seconds[key] = per_char if old is None else 0.8 * old + 0.2 * per_char
