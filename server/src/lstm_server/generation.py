"""Continuous batching for one generation model.

A turn is: read the prompt (one full-sequence call, the "prefill"), then
repeat {sample the next character with the turn's own parameters and random
stream; hand it to the turn's stream; feed it to the model}. The scheduler
steps every turn that has a character to feed in one batched model call: it
gathers their slots' (h, c), runs one step, scatters the new state, samples
all rows at once, and delivers. Turns join (after their prefill) and leave
between steps; nobody waits for another turn to finish.

The scheduler runs on its own thread (the model thread), which alone calls
the model and touches the slots of turns in flight; the asyncio side only
submits work and reads finished text. The model therefore never waits for the
event loop: when the streams are slower than the model, characters pile up in
each turn's outbox and go out together in one message (coalescing), and a
turn whose outbox reaches ``stream_buffer_chars`` sits out of the batch until
its reader catches up (backpressure), so memory stays bounded and nobody else
slows down. A stream also sends at most one message per ``stream_interval_ms``
(the first and the last go at once): fewer, fuller messages leave the CPU to
the model instead of to gRPC.

What the state has seen: every character of the prompt and every generated
character, counted the moment it is handed to the stream (``tokens_seen``).
A turn is complete, and the session free, only once its last character has
been fed; the stream's final message is sent after that. A cancelled turn
(client cancel, deadline, disconnect) feeds the character it had already
produced and stops: the session has seen the prompt and exactly the
characters generated before the cancellation was noticed (at most
``stream_buffer_chars`` beyond what the client was sent).

Faults stay in their row. A batched step that raises (model call, gather,
sampling) is run again in halves, down to single rows, until the rows that
fail alone are found (``contain``); the others go on exactly as if nothing had
happened, since a row's result does not depend on its batch. A row whose new
h, c or logits are not all finite (one vectorised check over the batch) fails
too. A failed row's step is not applied: its slot keeps the state from before
the step and its count goes back by the character that was not read (that
character may have been sent already), so the session is consistent, can be
exported, and continues from there; its turn ends with a ``SessionStepError``:
INTERNAL "model step failed for session <id>: ..." when the runtime raised on
it alone, FAILED_PRECONDITION when its state became NaN or infinite (the same
continuation fails the same way again). The prompt of a turn, a
CreateSession prompt and a Step call are checked the same way and change
nothing when they fail.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import grpc
import numpy as np

from .backends import Backend
from .codec import CharCodec
from .errors import ServiceError
from .metrics import Metrics
from .sampling import Sampling, as_uint64, sample, softmax
from .sessions import Session
from .state import StateSlots, all_finite, finite_rows

LENGTH, STOP = "length", "stop"
log = logging.getLogger(__name__)
T = TypeVar("T")


class SessionStepError(ServiceError):
    """One session's step failed alone; its state and ``tokens_seen`` are as they were before that step."""


class NonFinite(Exception):
    """A model call produced NaN or infinity in its new state or logits."""


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


def _join(parts: list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]]):
    """The rows and (logits, h, c) of several contained step calls, as one batch."""
    if len(parts) == 1:
        return parts[0]
    rows = np.concatenate([r for r, _ in parts])
    logits = np.concatenate([out[0] for _, out in parts])
    h = np.concatenate([out[1] for _, out in parts], axis=1)
    c = np.concatenate([out[2] for _, out in parts], axis=1)
    return rows, (logits, h, c)


@dataclass
class Chunk:
    text: str
    tokens_seen: int
    finish_reason: str | None = None


class Turn:
    """One Generate call (or one Chat message) on one session.

    Fields change on the model thread under the engine's lock; ``chunks()``
    reads them on the event loop under the same lock.
    """

    def __init__(self, session: Session, sampling: Sampling, engine: GenerationEngine) -> None:
        self.session = session
        self.sampling = sampling
        self.engine = engine
        self.remaining = sampling.max_tokens
        self.pending: int | None = None  # generated, delivered, not yet fed
        self.finish_reason: str | None = None  # set once no more characters will be sampled
        self.cancelled = False
        self.complete = False  # the last character is fed (model thread)
        self.settling = False  # the event loop is saving the session; then ``ended`` is set and it is free
        self.error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self.outbox: list[str] = []
        self.outbox_chars = 0
        self._tail = ""
        self._stop_window = max((len(s) for s in sampling.stop), default=0)
        self.changed = asyncio.Event()
        self.ended = asyncio.Event()  # set on the event loop once the turn is over and the session free

    @property
    def finishing(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def runnable(self, buffer_limit: int) -> bool:
        """Has a character to feed, and its reader keeps up (or it is finishing anyway)."""
        return self.pending is not None and (self.finishing or self.outbox_chars < buffer_limit)

    def deliver(self, token: int, char: str) -> None:
        self.pending = token
        self.session.tokens_seen += 1
        self.remaining -= 1
        self.outbox.append(char)
        self.outbox_chars += 1
        if self._stop_window:
            self._tail = (self._tail + char)[-self._stop_window :]
            if any(self._tail.endswith(s) for s in self.sampling.stop):
                self.finish_reason = STOP
        if self.finish_reason is None and self.remaining <= 0:
            self.finish_reason = LENGTH

    def finish(self, error: BaseException | None = None) -> None:
        """The last character is fed (or the turn failed); the session is freed on the event loop (``settle``)."""
        self.complete = True
        self.error = error
        self.pending = None
        session = self.session
        session.turn = None
        if session.closed:
            self.engine.slots.release(session.slot)

    def cancel(self) -> None:
        """Stop generating (safe to call on a complete turn)."""
        with self.engine.lock:
            if not self.complete:
                self.cancelled = True
                self.engine.lock.notify()

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The turn's text as it is produced, coalesced; the last chunk carries the finish reason."""
        engine = self.engine
        loop = asyncio.get_running_loop()
        next_send = 0.0
        while True:
            await self.changed.wait()
            self.changed.clear()
            wait = next_send - loop.time()
            if wait > 0 and not self.ended.is_set():  # at most one message per interval; the end goes at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ended.wait(), wait)
            complete = self.ended.is_set()  # after the engine's after_turn hook (the session is saved)
            with engine.lock:
                error = self.error
                text = "".join(self.outbox)
                self.outbox.clear()
                if self.outbox_chars >= engine.stream_buffer_chars:
                    engine.lock.notify()  # it sat out of the batch: it may run again
                self.outbox_chars = 0
                tokens_seen = self.session.tokens_seen
            if complete and isinstance(error, ServiceError):
                raise error
            if complete and error is not None:
                raise ServiceError(grpc.StatusCode.INTERNAL, f"generation failed: {error}") from error
            if complete and self.session.closed and self.finish_reason is None:
                raise ServiceError(grpc.StatusCode.ABORTED, f"session {self.session.id} was closed during the turn")
            if complete:
                yield Chunk(text, tokens_seen, self.finish_reason or LENGTH)
                return
            if text:
                yield Chunk(text, tokens_seen)
                next_send = loop.time() + engine.stream_interval_s


class GenerationEngine:
    """The scheduler, slots and backend of one character language model."""

    def __init__(
        self,
        name: str,
        backend: Backend,
        codec: CharCodec,
        slots: StateSlots,
        max_batch: int,
        stream_buffer_chars: int,
        stream_interval_ms: float,
        metrics: Metrics,
    ) -> None:
        self.name = name
        self.backend = backend
        self.codec = codec
        self.slots = slots
        self.max_batch = max_batch
        self.stream_buffer_chars = stream_buffer_chars
        self.stream_interval_s = stream_interval_ms / 1000
        self.metrics = metrics
        self._batch_size = metrics.batch_size.labels(name)  # labelled once, not on every step
        self._tokens = metrics.tokens_generated.labels(name)
        self._inter_token = metrics.inter_token_latency.labels(name)
        self.lock = threading.Condition()
        self._jobs: list[Callable[[], None]] = []
        self._turns: collections.deque[Turn] = collections.deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._to_notify: set[Turn] = set()
        self._notify_scheduled = False
        # Awaited on the event loop when a turn's last character is fed, before the session is free again and
        # the turn's last message goes out (the session store saves the state here); it may fail the turn.
        self.after_turn: Callable[[Session, BaseException | None], Awaitable[None]] | None = None
        self._settling: set[asyncio.Task] = set()

    # -- lifecycle (event loop) ------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"model-{self.name}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        await asyncio.gather(*self._settling, return_exceptions=True)  # turns being saved finish saving
        with self.lock:
            self._stopping = True
            self.lock.notify()
        if self._thread:
            await asyncio.to_thread(self._thread.join)

    # -- requests (event loop) ----------------------------------------------------

    def _post(self, job: Callable[[], None]) -> None:
        with self.lock:
            self._jobs.append(job)
            self.lock.notify()

    async def _call(self, fn, *args):
        """Run ``fn(*args)`` on the model thread between two steps and return its result."""
        future: Future = Future()

        def job() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as error:
                    future.set_exception(error)

        self._post(job)
        return await asyncio.wrap_future(future)

    async def read(self, session: Session, ids: np.ndarray) -> None:
        """Feed ``ids`` to the session's state in one call (the caller holds the session busy)."""
        if len(ids):
            await self._call(self._read, session, ids)
            session.tokens_seen += len(ids)
            session.has_logits = True

    async def step(self, ids: np.ndarray, h: np.ndarray, c: np.ndarray):
        """Explicit-state call: (next-character probabilities, hn, cn); nothing is kept."""
        logits, h, c = await self._call(self._explicit, ids, h, c)
        return softmax(logits), h, c

    def submit(self, session: Session, ids: np.ndarray, sampling: Sampling) -> Turn:
        """Start a turn on a session the caller has marked busy; read its text with ``turn.chunks()``."""
        turn = Turn(session, sampling, self)
        session.turn = turn
        self._post(partial(self._admit, turn, ids))
        return turn

    def close(self, session: Session) -> None:
        """Mark a session closed and free its slot once nothing uses it: at once if idle, when its turn ends
        (the turn is cancelled), or after its pending prefill."""
        with self.lock:
            session.closed = True
            if session.turn is not None:
                session.turn.cancelled = True
                self.lock.notify()
                return
            if session.busy:
                self._jobs.append(partial(self.slots.release, session.slot))
                self.lock.notify()
                return
        self.slots.release(session.slot)

    def _flush_notifications(self) -> None:
        with self.lock:  # `complete` is read under the lock: Turn.finish sets it among other fields
            turns, self._to_notify = self._to_notify, set()
            self._notify_scheduled = False
            completed = {turn for turn in turns if turn.complete and not turn.settling}
            for turn in completed:
                turn.settling = True
        for turn in turns:
            if turn in completed:
                if self.after_turn is None:
                    self._release(turn)
                else:
                    task = self._loop.create_task(self._settle(turn))
                    self._settling.add(task)
                    task.add_done_callback(self._settling.discard)
            turn.changed.set()

    async def _settle(self, turn: Turn) -> None:
        try:
            if not turn.session.closed:
                await self.after_turn(turn.session, turn.error)
        except ServiceError as error:
            turn.error = turn.error or error
        except Exception as error:  # a bug in the hook: the turn must not look saved
            log.exception("after_turn failed for session %s", turn.session.id)
            turn.error = turn.error or error
        finally:
            self._release(turn)
            turn.changed.set()

    @staticmethod
    def _release(turn: Turn) -> None:
        turn.session.busy = False
        turn.session.touch()
        turn.ended.set()

    # -- model thread ---------------------------------------------------------------

    def _notify(self, turns) -> None:
        """Wake the readers of ``turns`` (called with the lock held); one event-loop callback per burst."""
        self._to_notify.update(turns)
        if not self._notify_scheduled:
            self._notify_scheduled = True
            self._loop.call_soon_threadsafe(self._flush_notifications)

    def _checked_run(self, ids: np.ndarray, h: np.ndarray, c: np.ndarray):
        """(last logits [1, vocab], h, c) after one sequence ``ids``; raises ``NonFinite`` on NaN or infinity."""
        logits, h, c = self.backend.run({"tokens": ids[None, :], "h0": h, "c0": c})
        logits = logits[:, -1]
        if not all_finite(h, c, logits):
            raise NonFinite
        return logits, h, c

    def _prefill(self, session: Session, ids: np.ndarray, failed: str):
        """The session's (logits, h, c) after ``ids``, nothing written; ``failed`` ends the error messages."""
        try:
            return self._checked_run(ids, *self.slots.gather(np.array([session.slot])))
        except NonFinite:
            self.metrics.row_failures.labels(self.name, "non_finite").inc()
            raise SessionStepError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {session.id}'s state became non-finite (NaN or infinity) while reading the prompt "
                f"({len(ids)} characters); {failed}",
            ) from None
        except Exception as error:
            self.metrics.row_failures.labels(self.name, "exception").inc()
            raise SessionStepError(
                grpc.StatusCode.INTERNAL,
                f"model step failed for session {session.id} while reading the prompt: {error}; {failed}",
            ) from error

    def _read(self, session: Session, ids: np.ndarray) -> None:
        logits, h, c = self._prefill(session, ids, "the prompt was not read (try another prompt)")
        self.slots.scatter(np.array([session.slot]), h, c, logits)

    def _explicit(self, ids: np.ndarray, h: np.ndarray, c: np.ndarray):
        try:
            logits, h, c = self._checked_run(ids, h, c)
        except NonFinite:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the model's output for this input and state is not finite (NaN or infinity); nothing was kept: "
                "send h and c as this model returned them, with finite values (or neither, for a fresh sequence)",
            ) from None
        except Exception as error:
            raise ServiceError(grpc.StatusCode.INTERNAL, f"model step failed: {error}") from error
        return logits[0], h, c

    def _sample(self, turns: Sequence[Turn], logits: np.ndarray, positions: Sequence[int] | None = None) -> np.ndarray:
        """One token per row; a row's position is its session's count unless given (taken modulo 2**64)."""
        params = [t.sampling for t in turns]
        return sample(
            logits,
            np.array([p.temperature for p in params], np.float64),
            np.array([p.top_k for p in params], np.int64),
            np.array([p.top_p for p in params], np.float64),
            as_uint64(p.seed for p in params),
            as_uint64(positions if positions is not None else (t.session.tokens_seen for t in turns)),
        )

    def _admit(self, turn: Turn, ids: np.ndarray) -> None:
        self.metrics.queue_wait.labels(self.name).observe(time.perf_counter() - turn.submitted_at)
        session = turn.session
        kept = f"the prompt was not read: the session keeps its state after {session.tokens_seen} characters"
        try:  # nothing is written until the prompt is read and the first character drawn
            position = session.tokens_seen + len(ids)
            if len(ids):
                logits, h, c = self._prefill(
                    session, ids, f"{kept}; it can be exported or continued with another prompt, or closed"
                )
            else:
                logits = self.slots.logits[[session.slot]]
            token = None
            if not turn.cancelled and turn.sampling.max_tokens > 0:
                try:
                    token = int(self._sample([turn], logits, [position])[0])
                except Exception as error:
                    raise SessionStepError(
                        grpc.StatusCode.INTERNAL, f"sampling failed for session {session.id}: {error}; {kept}"
                    ) from error
            if len(ids):
                self.slots.scatter(np.array([session.slot]), h, c, logits)
                session.tokens_seen = position
                session.has_logits = True
        except Exception as error:
            cause = error.__cause__ if isinstance(error, SessionStepError) else error
            log.error("turn failed for session %s: %s", session.id, error, exc_info=cause)
            with self.lock:
                turn.finish(error)
                self._notify([turn])
            return
        with self.lock:
            if token is None:
                turn.finish_reason = turn.finish_reason or LENGTH
                turn.finish()
            else:
                turn.deliver(token, self.codec.vocab[token])
                self._turns.append(turn)
                self.metrics.time_to_first_token.labels(self.name).observe(time.perf_counter() - turn.submitted_at)
                self._tokens.inc()
            self._notify([turn])

    def _next_batch(self) -> list[Turn]:
        """Up to max_batch runnable turns (called with the lock held); the rest go first next time."""
        batch = [t for t in self._turns if t.runnable(self.stream_buffer_chars)][: self.max_batch]
        if len(batch) == self.max_batch:
            self._turns.rotate(-self.max_batch)
        return batch

    def _row_failure(self, turn: Turn, error: Exception | None, what: str = "model step") -> SessionStepError:
        """The error that ends ``turn`` when its step fails alone (``error`` None: the state became non-finite)."""
        session = turn.session
        self.metrics.row_failures.labels(self.name, "non_finite" if error is None else "exception").inc()
        seen = session.tokens_seen - 1  # its pending character is counted, but not read
        kept = (
            f"the step was not applied: the session keeps its state after {seen} characters (the last character "
            "sent was not read into it)"
        )
        if error is None:
            message = (
                f"session {session.id}'s state became non-finite (NaN or infinity) on reading character {seen + 1}; "
                f"{kept}. It can still be exported, or continued with another prompt or sampling (the same "
                "continuation fails the same way); or close it and start a new one"
            )
            return SessionStepError(grpc.StatusCode.FAILED_PRECONDITION, message)
        failure = SessionStepError(
            grpc.StatusCode.INTERNAL,
            f"{what} failed for session {session.id}: {error}; {kept}. Retry the turn, or export or close the session",
        )
        failure.__cause__ = error
        return failure

    def _step(self, batch: list[Turn]) -> None:
        slots = np.array([t.session.slot for t in batch])
        tokens = np.array([t.pending for t in batch], dtype=np.int64)[:, None]

        def forward(rows: np.ndarray):
            h, c = self.slots.gather(slots[rows])
            logits, h, c = self.backend.run({"tokens": tokens[rows], "h0": h, "c0": c})
            return logits[:, -1], h, c

        parts, raised = contain(len(batch), forward, "model step")
        failures = {i: self._row_failure(batch[i], error) for i, error in raised.items()}
        with self.lock:  # a cancellation arriving after this snapshot is handled at the next step
            finishing = [t.finishing for t in batch]
        drawn: dict[int, int] = {}
        if parts:
            rows, (logits, h, c) = _join(parts)
            finite = None if all_finite(h, c, logits) else finite_rows(h, c, logits)
            if finite is not None and not finite.all():
                for i in rows[~finite].tolist():
                    failures[i] = self._row_failure(batch[i], None)
                rows, logits, h, c = rows[finite], logits[finite], h[:, finite], c[:, finite]
            continuing = np.flatnonzero([not finishing[i] for i in rows.tolist()])  # positions in rows

            def draw(picked: np.ndarray) -> np.ndarray:
                chosen = continuing[picked]
                return self._sample([batch[i] for i in rows[chosen].tolist()], logits[chosen])

            sampled, unsampled = contain(len(continuing), draw, "sampling") if len(continuing) else ([], {})
            for j, error in unsampled.items():
                i = int(rows[continuing[j]])
                failures[i] = self._row_failure(batch[i], error, "sampling")
            for picked, tokens_drawn in sampled:
                drawn.update(zip(rows[continuing[picked]].tolist(), tokens_drawn.tolist(), strict=True))
            if unsampled:
                keep = np.array([i not in failures for i in rows.tolist()], bool)
                rows, logits, h, c = rows[keep], logits[keep], h[:, keep], c[:, keep]
            self.slots.scatter(slots[rows], h, c, logits)  # failed rows keep their state
        for error in failures.values():
            log.error("%s", error.message, exc_info=error.__cause__)
        vocab = self.codec.vocab
        with self.lock:
            for i, turn in enumerate(batch):
                error = failures.get(i)
                if error is not None:  # its pending character was not read
                    turn.session.tokens_seen -= 1
                    turn.finish(error)
                    self._turns.remove(turn)
                elif finishing[i]:  # its last character is fed now
                    turn.finish()
                    self._turns.remove(turn)
                else:
                    token = drawn[i]
                    turn.deliver(token, vocab[token])
            self._notify(batch)
        self._batch_size.observe(len(batch))
        self._tokens.inc(len(drawn))

    def _run(self) -> None:
        last_step = None
        while True:
            with self.lock:
                while not self._stopping and not (batch := self._next_batch()) and not self._jobs:
                    self.lock.wait()
                    last_step = None
                if self._stopping:
                    return
                jobs, self._jobs = self._jobs, []
            for job in jobs:
                job()
            if batch:
                try:
                    self._step(batch)
                except Exception as error:  # the model failed: end these turns, keep serving the others
                    log.exception("model step failed for %d sessions", len(batch))
                    with self.lock:
                        for turn in batch:
                            if not turn.complete:
                                turn.finish(error)
                                self._turns.remove(turn)
                        self._notify(batch)
                now = time.perf_counter()
                if last_step is not None:
                    self._inter_token.observe(now - last_step)
                last_step = now
