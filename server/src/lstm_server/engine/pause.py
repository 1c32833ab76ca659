"""Holding a model thread between two steps (tests and tools): work submitted meanwhile is taken in one go."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def hold(
    name: str,
    post: Callable[[Callable[[], None]], None],
    queued: Callable[[], int],
    lock: threading.Condition,
    timeout_s: float,
) -> Iterator[Callable[[int], bool]]:
    """Hold the model thread (``post`` a job that blocks it) while the block runs; blocking, so not from the event
    loop. Yields ``wait_for_queued(n)``: whether ``n`` submissions (``queued()``, read under ``lock``) wait for the
    model thread within ten seconds."""
    held, release = threading.Event(), threading.Event()

    def gate() -> None:
        held.set()
        release.wait()

    def wait_for_queued(n: int, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with lock:
                if queued() >= n:
                    return True
            time.sleep(0.005)  # polled: waiting on the condition could take a wakeup meant for the model
        return False

    post(gate)
    try:
        if not held.wait(timeout_s):
            raise TimeoutError(f"the model thread of {name} did not pause within {timeout_s:g} s")
        yield wait_for_queued
    finally:
        release.set()
