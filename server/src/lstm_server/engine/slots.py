"""Preallocated, contiguous session state for one model.

Every session of a model owns a slot: a column of ``h`` and ``c``
([layers x directions, capacity, hidden]) and a row of ``logits``
([capacity, vocab], the distribution of its next character). A batch step
gathers the active slots with one fancy-indexing copy and scatters the new
state back the same way: no per-session Python work. The arrays are
allocated zeroed up front (the operating system maps pages only when they
are first written), so the server's memory grows with the sessions it holds,
never with a step.

A step's new state is written only for the rows whose ``h``, ``c`` and
``logits`` are all finite (``finite_rows``): a NaN or infinity never reaches a
slot, so a session whose step fails keeps the state it had before it.

Nothing outside the engine indexes these arrays: ``read`` and ``write`` hand one
slot's state out and in.

Who writes a slot: the event loop, through ``allocate``, ``write``, ``copy`` and
``release``, while the slot is home; the model thread, through ``scatter``, while
the slot is lent to it (``lend``: a turn or a read submitted on it, until the
model thread gives it back, before the turn's end or the read's result is
visible). The event loop's calls on a lent slot raise, so a slot is never
written by both threads (tests/server/test_engine.py checks it).
"""

from __future__ import annotations

import logging
import threading
from typing import NamedTuple

import numpy as np

from ..errors import ServiceError, Status

log = logging.getLogger(__name__)


class SlotState(NamedTuple):
    """One slot's state, copied out: ``h`` and ``c`` [layers x directions, 1, hidden], ``logits`` [vocab]."""

    h: np.ndarray
    c: np.ndarray
    logits: np.ndarray


class StateSlots:
    def __init__(self, layers: int, hidden: int, vocab: int, capacity: int) -> None:
        self.h = np.zeros((layers, capacity, hidden), np.float32)  # [layers x directions, capacity, hidden]
        self.c = np.zeros((layers, capacity, hidden), np.float32)  # [layers x directions, capacity, hidden]
        self.logits = np.zeros((capacity, vocab), np.float32)  # [capacity, vocab]
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))
        self._taken = np.zeros(capacity, bool)  # a second release of a slot must never free it for two sessions
        self._lock = threading.Lock()  # slots are taken on the event loop, may be freed on the model thread
        self._lent = np.zeros(capacity, bool)  # True: the model thread's (set on the event loop, cleared on it)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def slot_shape(self) -> tuple[int, int, int]:
        """The shape of one slot's ``h`` or ``c``: (layers x directions, 1, hidden)."""
        layers, _, hidden = self.h.shape
        return layers, 1, hidden

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[1]

    def free_slots(self) -> list[int]:
        """The free slots, sorted."""
        with self._lock:
            return sorted(self._free)

    def allocate(self) -> int:
        """A zeroed slot (a fresh sequence)."""
        with self._lock:
            slot = self._free.pop() if self._free else None
            if slot is not None:
                self._taken[slot] = True
        if slot is None:
            raise ServiceError(
                Status.RESOURCE_EXHAUSTED,
                f"all {self.capacity} state slots of this model are in use (max_sessions); "
                "close sessions or raise the limit",
                reason="SESSION_LIMIT",
            )
        self.h[:, slot] = 0.0
        self.c[:, slot] = 0.0
        self.logits[slot] = 0.0
        return slot

    def release(self, slot: int) -> None:
        """Free a taken slot; releasing a free one is a bug, logged and ignored (the slot is not freed twice)."""
        self._home(slot)
        with self._lock:
            if not self._taken[slot]:
                log.error("slot %d released twice; ignored", slot)
                return
            self._taken[slot] = False
            self._free.append(slot)

    def lend(self, slot: int) -> None:
        """Hand the slot to the model thread (event loop; ``give_back`` returns it)."""
        self._home(slot)
        self._lent[slot] = True

    def give_back(self, slot: int) -> None:
        """The model thread is done with the slot."""
        self._lent[slot] = False

    def _home(self, slot: int) -> None:
        if self._lent[slot]:
            raise RuntimeError(f"slot {slot} is lent to the model thread: a turn or a read is using it")

    def copy(self, source: int, target: int) -> None:
        self._home(source)
        self._home(target)
        self.h[:, target] = self.h[:, source]
        self.c[:, target] = self.c[:, source]
        self.logits[target] = self.logits[source]

    def read(self, slot: int) -> SlotState:
        """A copy of one slot's (h, c, logits)."""
        self._home(slot)
        return SlotState(self.h[:, slot : slot + 1].copy(), self.c[:, slot : slot + 1].copy(), self.logits[slot].copy())

    def write(self, slot: int, h: np.ndarray, c: np.ndarray, logits: np.ndarray | None = None) -> None:
        """Set one slot's state: ``h`` and ``c`` [layers x directions, 1, hidden], ``logits`` [vocab] (None: keep
        the slot's, zero in a new slot)."""
        self._home(slot)
        self.h[:, slot] = h[:, 0]
        self.c[:, slot] = c[:, 0]
        if logits is not None:
            self.logits[slot] = logits

    def gather(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(h, c) of ``slots``, [layers x directions, batch, hidden] each."""
        return self.h[:, slots], self.c[:, slots]

    def scatter(self, slots: np.ndarray, h: np.ndarray, c: np.ndarray, logits: np.ndarray) -> None:
        """Write a step's new state: ``h``, ``c`` [layers x directions, batch, hidden], ``logits`` [batch, vocab]."""
        self.h[:, slots] = h
        self.c[:, slots] = c
        self.logits[slots] = logits


def all_finite(*arrays: np.ndarray) -> bool:
    """Whether every value of every array is finite (the cheap check a step makes when nothing went wrong): a sum
    per array, no temporaries; a NaN or infinity makes its sum non-finite (a sum that overflows only sends the
    caller to the exact ``finite_rows``)."""
    return all(bool(np.isfinite(a.sum(dtype=np.float64))) for a in arrays)


def finite_rows(h: np.ndarray, c: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per batch row, whether its new ``h``, ``c`` ([layers, batch, hidden]) and ``logits`` ([batch, vocab]) are
    all finite: a few vectorised passes over the step's outputs, no per-row Python."""
    return np.isfinite(logits).all(axis=1) & np.isfinite(h).all(axis=(0, 2)) & np.isfinite(c).all(axis=(0, 2))
