"""A turn as the engine runs it: its counts, its stop matching, and the channel its text takes to its reader.

One field, one writer. The model thread changes a turn only through ``admit``, ``ran``, ``begin``, ``deliver``
and ``fail``, with the engine's lock held (``lock``); the event loop only through ``cancel`` and ``take``, under the
same lock. Nothing outside this module writes a turn's fields (``tests/server/test_layers.py`` checks it).

The channel: the model thread appends each row's characters to the outbox and, once the last character is fed
(or the row failed), sets ``end``; then it asks the event loop to ``wake`` the reader (the engine batches those
calls into one flush per model call). The one reader at a time calls ``take``: the whole outbox in one chunk
(coalescing), at most one chunk per interval (``Pacer``; the end goes at once), and last the rest with the end. A
reader whose interval ends between two flushes goes at the nearer one, so the event loop's work comes in one burst
per model call rather than one wake-up per stream. An outbox that reaches the buffer limit takes its turn out of
the batch until the reader catches up (backpressure).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..logs import call_fields
from .faults import RowFailure
from .sampling import Sampling

if TYPE_CHECKING:
    from .prefill import CacheUse

LENGTH, STOP = "length", "stop"


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """How a turn ended: ``finish_reason`` LENGTH or STOP (None: cancelled first, or failed), ``failure`` (its row
    failed alone), ``tokens_seen``: the characters its slot's state has read."""

    finish_reason: str | None
    failure: RowFailure | None
    tokens_seen: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """Text of a turn as its reader takes it, and the characters the state has read or counted by then; the last
    chunk carries ``end``."""

    text: str
    tokens_seen: int
    end: TurnEnd | None = None


class Pacer:
    """How often a stream may send (event loop only): ``interval()`` (the engine's, by load), and half the time
    between the engine's flushes, so that a reader due between two flushes goes at the nearer one (its messages are
    ``interval()`` apart on average, at most half a flush period more)."""

    def __init__(self, interval: Callable[[], float]) -> None:
        self.interval = interval
        self._half_period = 0.0  # a moving average of half the time between two flushes
        self._last: float | None = None

    def flushed(self, now: float) -> None:
        if self._last is not None:
            self._half_period = 0.8 * self._half_period + 0.1 * (now - self._last)
        self._last = now

    def due(self, at: float, now: float) -> bool:
        """Whether a reader due ``at`` goes now (the next flush is expected later than ``at`` is from now)."""
        return now + min(self._half_period, self.interval() / 2) >= at


@dataclass(frozen=True, slots=True)
class TurnProgress:
    """A running turn, as its reader may see it: characters counted, and generated but not yet taken."""

    tokens_seen: int
    buffered: int


class Turn:
    """One Generate call (or one Chat message) on one slot, from submission to its last character fed."""

    def __init__(
        self,
        slot: int,
        position: int,
        sampling: Sampling,
        lock: threading.Condition,
        pacer: Pacer,
        buffer_limit: int,
        cache: CacheUse | None = None,
    ) -> None:
        self.slot = slot
        self.sampling = sampling
        self.log_fields = dict(call_fields())  # the submitting call's, for the model thread's log lines
        self.lock = lock  # the engine's: guards what both threads touch
        self._pacer = pacer  # the engine's
        self.buffer_limit = buffer_limit  # an outbox this full takes the turn out of the batch
        self._loop = asyncio.get_running_loop()
        self.submitted_at = time.perf_counter()
        # model thread (times for metrics and trace spans; the event loop reads them once ``end`` is set)
        self.admitted_at: float | None = None  # its queueing ends, its prefill starts
        self.first_at: float | None = None  # its prompt read and first character drawn
        self.ended_at: float | None = None  # its last character fed, or it failed
        self.model_calls = 0  # the decode calls its row ran in
        self.cache = cache  # its prompt read through the prefix cache: the prefill thread fills it in
        self.tokens_seen = position  # counted the moment a character is handed to the outbox
        self.remaining = sampling.max_tokens
        self.pending: int | None = None  # generated, delivered, not yet fed
        self.finish_reason: str | None = None  # set once no more characters will be sampled
        self.end: TurnEnd | None = None
        self.stop_window = max((len(s) for s in sampling.stop), default=0)
        self._tail = ""  # the last ``stop_window`` characters sent
        # both threads, under ``lock``
        self.cancelled = False  # written by the event loop
        self.outbox: list[str] = []  # appended by the model thread, emptied by the reader
        self.buffered = 0  # the characters in ``outbox``
        # event loop
        self._news: asyncio.Future[None] | None = None  # the reader waits on it
        self._timer: asyncio.TimerHandle | None = None  # rings ``_news`` when the next chunk is due
        self._due = 0.0  # when the next chunk may go (the first: at once)
        self._paced = False  # a chunk with text went out: the next waits for the interval

    # -- read by the model thread, lock held where noted -------------------------------------------------

    @property
    def finishing(self) -> bool:
        """No more characters will be drawn: the last one sent ends it, or it was cancelled (lock held)."""
        return self.finish_reason is not None or self.cancelled

    @property
    def runnable(self) -> bool:
        """Has a character to feed, and its reader keeps up (or it is finishing anyway) (lock held)."""
        return self.pending is not None and (self.finishing or self.buffered < self.buffer_limit)

    def to_send(self, text: str) -> tuple[int, str | None]:
        """How many of the characters ``text`` (drawn in this order) the turn sends, and why it ends there if it
        does: max_tokens (LENGTH) or the end of a stop string (STOP, first)."""
        n, reason = len(text), None
        if self.remaining <= n:
            n, reason = self.remaining, LENGTH
        if self.stop_window:  # no stop string ends inside the tail already sent: the turn would have ended
            seen = self._tail + text[:n]
            ends = [seen.find(stop) + len(stop) - len(self._tail) for stop in self.sampling.stop if stop in seen]
            if ends:
                n, reason = min(ends), STOP
        return n, reason

    # -- written by the model thread, lock held --------------------------------------------------------------

    def admit(self, now: float) -> None:
        self.admitted_at = now

    def ran(self) -> None:
        """Its row ran in a decode call (counted for its trace span)."""
        self.model_calls += 1

    def begin(self, position: int, token: int | None, char: str) -> None:
        """The prompt is read (the state has read ``position`` characters) and ``token`` (``char``) drawn; None: it
        draws nothing (max_tokens 0 ends by length, a turn cancelled before it began has no reason)."""
        self.tokens_seen = position
        if token is None:
            if not self.cancelled:
                self.finish_reason = self.finish_reason or LENGTH
            self._end(None)
            return
        self.first_at = time.perf_counter()
        self.deliver(char, self.to_send(char)[1], token)

    def deliver(self, text: str, reason: str | None, pending: int | None) -> None:
        """Hand ``text`` to the reader and count it; ``reason``: the turn draws no more; ``pending``: the last
        character drawn, to feed next (None: every character sent is read, and the turn is complete)."""
        if text:
            self.tokens_seen += len(text)
            self.remaining -= len(text)
            self.outbox.append(text)
            self.buffered += len(text)
            if self.stop_window:
                self._tail = (self._tail + text)[-self.stop_window :]
        if reason is not None:
            self.finish_reason = reason
        self.pending = pending
        if pending is None:
            self._end(None)

    def fail(self, failure: RowFailure) -> None:
        """Its row failed alone (its slot keeps the state after ``failure.kept`` characters), or the engine did."""
        if failure.kept is not None:
            self.tokens_seen = failure.kept
        self.pending = None
        self._end(failure)

    def _end(self, failure: RowFailure | None) -> None:
        self.end = TurnEnd(self.finish_reason, failure, self.tokens_seen)
        self.ended_at = time.perf_counter()

    # -- event loop --------------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop generating (safe to call on a complete turn)."""
        with self.lock:
            if self.end is None:
                self.cancelled = True
                self.lock.notify()

    def progress(self) -> TurnProgress:
        with self.lock:
            return TurnProgress(self.tokens_seen, self.buffered)

    def wake(self, ended: bool, now: float) -> None:
        """News for the reader (called by the engine's flush on the event loop): more text, or the end. A waiting
        reader goes now if it is due, else at its time."""
        if self._news is None or self._news.done():
            return
        if ended or self._pacer.due(self._due, now):
            self._news.set_result(None)
        elif self._timer is None:
            self._timer = self._loop.call_at(self._due, self._ring)

    def _ring(self) -> None:
        self._timer = None
        if self._news is not None and not self._news.done():
            self._news.set_result(None)

    def _taken(self, due: bool) -> tuple[Chunk | None, bool]:
        """(The outbox as one chunk, emptied, if there is news and it may go now, ``due`` or at the end; whether
        there is news at all), under one hold of the lock."""
        with self.lock:
            has_news = bool(self.outbox) or self.end is not None
            if self.end is None and not (has_news and due):
                return None, has_news
            text = "".join(self.outbox)
            self.outbox.clear()
            if self.buffered >= self.buffer_limit:
                self.lock.notify()  # it sat out of the batch: it may run again
            self.buffered = 0
            return Chunk(text, self.tokens_seen, self.end), True

    async def _wait(self) -> None:
        self._news = self._loop.create_future()
        try:
            await self._news
        finally:
            self._news = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    async def take(self) -> Chunk:
        """The next chunk: the text produced since the last one, coalesced, or the end (with the rest). The next
        chunk after one with text is due an interval after the reader comes back (the time it took to send that one
        counts too: a busy event loop sends fewer, fuller messages)."""
        if self._paced:
            self._due = self._loop.time() + self._pacer.interval()
            self._paced = False
        while True:
            chunk, has_news = self._taken(self._pacer.due(self._due, self._loop.time()))
            if chunk is not None:
                self._paced = chunk.end is None
                return chunk
            if has_news and self._timer is None:  # text waits for its time (a flush may let it go sooner)
                self._timer = self._loop.call_at(self._due, self._ring)
            await self._wait()
