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
"""

from __future__ import annotations

import threading

import grpc
import numpy as np

from .errors import ServiceError


class StateSlots:
    def __init__(self, layers: int, hidden: int, vocab: int, capacity: int) -> None:
        self.h = np.zeros((layers, capacity, hidden), np.float32)
        self.c = np.zeros((layers, capacity, hidden), np.float32)
        self.logits = np.zeros((capacity, vocab), np.float32)
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))
        self._lock = threading.Lock()  # sessions are opened on the event loop, may be freed on the model thread

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self) -> int:
        """A zeroed slot (a fresh sequence)."""
        with self._lock:
            slot = self._free.pop() if self._free else None
        if slot is None:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"all {self.capacity} state slots of this model are in use (max_sessions); "
                "close sessions or raise the limit",
            )
        self.h[:, slot] = 0.0
        self.c[:, slot] = 0.0
        self.logits[slot] = 0.0
        return slot

    def release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def copy(self, source: int, target: int) -> None:
        self.h[:, target] = self.h[:, source]
        self.c[:, target] = self.c[:, source]
        self.logits[target] = self.logits[source]

    def gather(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.h[:, slots], self.c[:, slots]

    def scatter(self, slots: np.ndarray, h: np.ndarray, c: np.ndarray, logits: np.ndarray) -> None:
        self.h[:, slots] = h
        self.c[:, slots] = c
        self.logits[slots] = logits


def all_finite(*arrays: np.ndarray) -> bool:
    """Whether every value of every array is finite (the cheap check a step makes when nothing went wrong)."""
    return all(bool(np.isfinite(a).all()) for a in arrays)


def finite_rows(h: np.ndarray, c: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per batch row, whether its new ``h``, ``c`` ([layers, batch, hidden]) and ``logits`` ([batch, vocab]) are
    all finite: a few vectorised passes over the step's outputs, no per-row Python."""
    return np.isfinite(logits).all(axis=1) & np.isfinite(h).all(axis=(0, 2)) & np.isfinite(c).all(axis=(0, 2))
