"""Continuous batching for one generation model.

The surface: ``submit(slot, tokens, sampling, position) -> Turn``. A turn is:
read the prompt (one full-sequence call, the "prefill"), then repeat {sample
the next character with the turn's own parameters and random stream; hand it
to the turn's stream; feed it to the model}. The scheduler steps every turn
that has a character to feed in one batched model call: it gathers their
slots' (h, c), runs one step, scatters the new state, samples all rows at
once, and delivers. Turns join (after their prefill) and leave between steps;
nobody waits for another turn to finish. The engine knows slots, not
sessions: whoever submits a turn owns its slot and counts (``position``: the
characters the slot's state has read) and learns how the turn ended from
``turn.completion``.

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
character, counted the moment it is handed to the stream (the turn's
``tokens_seen``). A turn is complete once its last character has been fed;
``completion`` then resolves (on the event loop) with how it ended and the
count. A cancelled turn (client cancel, deadline, disconnect, close) feeds the
character it had already produced and stops: the state has seen the prompt
and exactly the characters generated before the cancellation was noticed (at
most ``stream_buffer_chars`` beyond what the reader took).

Faults stay in their row. A batched step that raises (model call, gather,
sampling) is run again in halves, down to single rows, until the rows that
fail alone are found (``faults.contain``); the others go on exactly as if
nothing had happened, since a row's result does not depend on its batch. A row
whose new h, c or logits are not all finite (one vectorised check over the
batch) fails too. A failed row's step is not applied: its slot keeps the state
from before the step and its count goes back by the character that was not
read (that character may have been sent already), so the state is consistent,
can be exported, and continues from there; its turn ends with a
``SessionStepError``: INTERNAL "model step failed for session <id>: ..." when
the runtime raised on it alone, FAILED_PRECONDITION when its state became NaN
or infinite (the same continuation fails the same way again). The prompt of a
turn, a ``read`` and a ``step`` are checked the same way and change nothing
when they fail.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np

from ..errors import ServiceError, Status
from ..metrics import Metrics
from ..runtime.backends import Backend
from .codec import CharCodec
from .faults import contain
from .sampling import Sampler, Sampling, as_uint64, sample, softmax
from .slots import SlotState, StateSlots, all_finite, finite_rows

LENGTH, STOP = "length", "stop"
log = logging.getLogger(__name__)
B = TypeVar("B", bound=Backend)


class SessionStepError(ServiceError):
    """One turn's step failed alone; its slot's state and count are as they were before that step."""


class NonFinite(Exception):
    """A model call produced NaN or infinity in its new state or logits."""


def _join(parts: list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]]):
    """The rows and (logits [batch, vocab], h, c [layers x directions, batch, hidden]) of several contained step
    calls, as one batch."""
    if len(parts) == 1:
        return parts[0]
    rows = np.concatenate([r for r, _ in parts])
    logits = np.concatenate([out[0] for _, out in parts])
    h = np.concatenate([out[1] for _, out in parts], axis=1)
    c = np.concatenate([out[2] for _, out in parts], axis=1)
    return rows, (logits, h, c)


@dataclass(slots=True)
class Chunk:
    """Text of a turn as its reader takes it, and the characters the state has read or counted by then.

    The engine marks a turn's last chunk ``last``; the sessions layer sets ``finish_reason`` on it."""

    text: str
    tokens_seen: int
    finish_reason: str | None = None
    last: bool = False


@dataclass(frozen=True)
class TurnEnd:
    """How a turn ended: ``finish_reason`` LENGTH or STOP (None: cancelled first), or ``error`` (a
    ``SessionStepError`` when its row failed alone and its state was kept); ``tokens_seen``: the characters its
    slot's state has read."""

    finish_reason: str | None
    error: ServiceError | None
    tokens_seen: int


@dataclass(frozen=True)
class TurnProgress:
    """A running turn, as its reader may see it: characters counted, and generated but not yet taken."""

    tokens_seen: int
    buffered: int


class Turn:
    """One Generate call (or one Chat message) on one slot.

    The underscored fields change on the model thread under the engine's lock;
    the event loop reads them only through ``chunks()``, ``progress()`` and
    ``completion`` (resolved on the event loop once the last character is fed).
    """

    def __init__(self, engine: GenerationEngine, slot: int, position: int, sampling: Sampling, session_id: str) -> None:
        self.engine = engine
        self.slot = slot
        self.session_id = session_id  # for messages and logs only
        self.sampling = sampling
        self.submitted_at = time.perf_counter()
        self.completion: asyncio.Future[TurnEnd] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Event()  # set on the event loop when there is news for the reader
        self._tokens_seen = position
        self._remaining = sampling.max_tokens
        self._pending: int | None = None  # generated, delivered, not yet fed
        self._finish_reason: str | None = None  # set once no more characters will be sampled
        self._cancelled = False
        self._end: TurnEnd | None = None  # set once the last character is fed (or the turn failed)
        self._outbox: list[str] = []
        self._outbox_chars = 0
        self._tail = ""
        self._stop_window = max((len(s) for s in sampling.stop), default=0)

    @property
    def _finishing(self) -> bool:
        return self._finish_reason is not None or self._cancelled

    def _runnable(self, buffer_limit: int) -> bool:
        """Has a character to feed, and its reader keeps up (or it is finishing anyway)."""
        return self._pending is not None and (self._finishing or self._outbox_chars < buffer_limit)

    def _deliver(self, token: int, char: str) -> None:
        self._pending = token
        self._tokens_seen += 1
        self._remaining -= 1
        self._outbox.append(char)
        self._outbox_chars += 1
        if self._stop_window:
            self._tail = (self._tail + char)[-self._stop_window :]
            if any(self._tail.endswith(s) for s in self.sampling.stop):
                self._finish_reason = STOP
        if self._finish_reason is None and self._remaining <= 0:
            self._finish_reason = LENGTH

    def _finish(self, error: BaseException | None = None) -> None:
        """The last character is fed, or the turn failed (lock held); ``completion`` resolves on the event loop."""
        if error is not None and not isinstance(error, ServiceError):
            failure = ServiceError(Status.INTERNAL, f"generation failed: {error}")
            failure.__cause__ = error
            error = failure
        self._pending = None
        self._end = TurnEnd(self._finish_reason, error, self._tokens_seen)

    def progress(self) -> TurnProgress:
        with self.engine.lock:
            return TurnProgress(self._tokens_seen, self._outbox_chars)

    def cancel(self) -> None:
        """Stop generating (safe to call on a complete turn)."""
        with self.engine.lock:
            if self._end is None:
                self._cancelled = True
                self.engine.lock.notify()

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The turn's text as it is produced, coalesced; the last chunk (the rest, possibly empty) comes once the
        turn is complete, marked ``last``, with the finish reason unless the turn failed (``completion`` says)."""
        engine = self.engine
        loop = asyncio.get_running_loop()
        next_send = 0.0
        while True:
            await self._changed.wait()
            self._changed.clear()
            wait = next_send - loop.time()
            if wait > 0 and not self.completion.done():  # at most one message per interval; the end goes at once
                await asyncio.wait([self.completion], timeout=wait)
            complete = self.completion.done()
            with engine.lock:
                text = "".join(self._outbox)
                self._outbox.clear()
                if self._outbox_chars >= engine.stream_buffer_chars:
                    engine.lock.notify()  # it sat out of the batch: it may run again
                self._outbox_chars = 0
                tokens_seen = self._tokens_seen
            if complete:
                end = self.completion.result()
                reason = None if end.error else end.finish_reason or LENGTH
                yield Chunk(text, tokens_seen, reason, last=True)
                return
            if text:
                yield Chunk(text, tokens_seen)
                next_send = loop.time() + engine.stream_interval_s


class Paused:
    """The model thread held between two steps (``GenerationEngine.paused``)."""

    def __init__(self, engine: GenerationEngine) -> None:
        self._engine = engine

    def wait_for_queued(self, n: int, timeout_s: float = 10.0) -> bool:
        """Wait until ``n`` submissions (turns, reads, steps) wait for the model thread; False on timeout."""
        engine = self._engine
        deadline = time.monotonic() + timeout_s
        while True:
            with engine.lock:
                if len(engine._jobs) >= n:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)  # polled: waiting on the engine's condition could take a wakeup meant for the model


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
        sampler: Sampler = sample,
    ) -> None:
        self.name = name
        self.backend = backend
        self.codec = codec
        self.slots = slots
        self.max_batch = max_batch
        self.stream_buffer_chars = stream_buffer_chars
        self.stream_interval_s = stream_interval_ms / 1000
        self.metrics = metrics
        self._draw = sampler
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

    # -- lifecycle (event loop) ------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"model-{self.name}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self.lock:
            self._stopping = True
            self.lock.notify()
        if self._thread:
            await asyncio.to_thread(self._thread.join)

    @contextlib.contextmanager
    def paused(self, timeout_s: float = 10.0) -> Iterator[Paused]:
        """Hold the model thread between two steps while the block runs: work submitted meanwhile waits, and is
        taken in one go when the block ends. Blocking: use it from a thread other than the event loop's (tests,
        tools)."""
        held, release = threading.Event(), threading.Event()

        def gate() -> None:
            held.set()
            release.wait()

        self._post(gate)
        try:
            if not held.wait(timeout_s):
                raise TimeoutError(f"the model thread of {self.name} did not pause within {timeout_s:g} s")
            yield Paused(self)
        finally:
            release.set()

    def wrap_backend(self, wrap: Callable[[Backend], B]) -> B:
        """Run the model through ``wrap(current backend)`` from the next call on (fault injection in tests, or
        instrumentation); returns the wrapper."""
        with self.lock:
            self.backend = wrapped = wrap(self.backend)
        return wrapped

    # -- slots (event loop; the caller owns the slot and no turn uses it) ----------

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """The shape of one slot's ``h`` or ``c``: (layers x directions, 1, hidden)."""
        return self.slots.slot_shape

    @property
    def vocab_size(self) -> int:
        return self.slots.vocab_size

    def allocate(self) -> int:
        """A zeroed slot (RESOURCE_EXHAUSTED when every slot is taken)."""
        return self.slots.allocate()

    def release(self, slot: int) -> None:
        """Free a slot that nothing uses."""
        self.slots.release(slot)

    def release_after_pending(self, slot: int) -> None:
        """Free a slot on the model thread, once the work submitted before (a read in flight) is done."""
        self._post(partial(self.slots.release, slot))

    def copy_slot(self, source: int, target: int) -> None:
        """Copy one slot's state into another (a fork)."""
        self.slots.copy(source, target)

    def state(self, slot: int) -> SlotState:
        """A copy of the slot's (h, c, logits)."""
        return self.slots.read(slot)

    def set_state(self, slot: int, h: np.ndarray, c: np.ndarray, logits: np.ndarray | None) -> None:
        """Set the slot's state (``StateSlots.write``)."""
        self.slots.write(slot, h, c, logits)

    # -- requests (event loop) ----------------------------------------------------

    def _post(self, job: Callable[[], None]) -> None:
        with self.lock:
            self._jobs.append(job)
            self.lock.notify()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
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

    async def read(self, slot: int, tokens: np.ndarray, session_id: str = "") -> None:
        """Feed ``tokens`` to the slot's state in one call (the caller holds the slot and counts them)."""
        if len(tokens):
            await self._call(self._read, slot, tokens, session_id)

    async def step(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Explicit-state call: (next-character probabilities, hn, cn); nothing is kept."""
        logits, h, c = await self._call(self._explicit, tokens, h, c)
        return softmax(logits), h, c

    def submit(self, slot: int, tokens: np.ndarray, sampling: Sampling, position: int, session_id: str = "") -> Turn:
        """Start a turn on ``slot``, whose state has read ``position`` characters (the position of its first
        sampled character, after the prompt ``tokens``). Read its text with ``turn.chunks()``; ``turn.completion``
        says how it ended. The slot must not be used otherwise until then."""
        turn = Turn(self, slot, position, sampling, session_id)
        self._post(partial(self._admit, turn, tokens))
        return turn

    def _flush_notifications(self) -> None:
        with self.lock:  # ``_end`` is read under the lock: Turn._finish sets it among other fields
            turns, self._to_notify = self._to_notify, set()
            self._notify_scheduled = False
            ended = [(turn, turn._end) for turn in turns if turn._end is not None]
        for turn, end in ended:
            if not turn.completion.done():
                turn.completion.set_result(end)
        for turn in turns:
            turn._changed.set()

    # -- model thread ---------------------------------------------------------------

    def _notify(self, turns: Sequence[Turn]) -> None:
        """Wake the readers of ``turns`` (called with the lock held); one event-loop callback per burst."""
        self._to_notify.update(turns)
        if not self._notify_scheduled:
            self._notify_scheduled = True
            self._loop.call_soon_threadsafe(self._flush_notifications)

    def _checked_run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray):
        """(last logits [1, vocab], h, c) after one sequence ``tokens``; raises ``NonFinite`` on NaN or infinity."""
        logits, h, c = self.backend.run({"tokens": tokens[None, :], "h0": h, "c0": c})
        logits = logits[:, -1]
        if not all_finite(h, c, logits):
            raise NonFinite
        return logits, h, c

    def _prefill(self, slot: int, session_id: str, tokens: np.ndarray, failed: str):
        """The slot's (logits, h, c) after ``tokens``, nothing written; ``failed`` ends the error messages."""
        try:
            return self._checked_run(tokens, *self.slots.gather(np.array([slot])))
        except NonFinite:
            self.metrics.row_failures.labels(self.name, "non_finite").inc()
            raise SessionStepError(
                Status.FAILED_PRECONDITION,
                f"session {session_id}'s state became non-finite (NaN or infinity) while reading the prompt "
                f"({len(tokens)} characters); {failed}",
            ) from None
        except Exception as error:
            self.metrics.row_failures.labels(self.name, "exception").inc()
            raise SessionStepError(
                Status.INTERNAL,
                f"model step failed for session {session_id} while reading the prompt: {error}; {failed}",
            ) from error

    def _read(self, slot: int, tokens: np.ndarray, session_id: str) -> None:
        logits, h, c = self._prefill(slot, session_id, tokens, "the prompt was not read (try another prompt)")
        self.slots.scatter(np.array([slot]), h, c, logits)

    def _explicit(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray):
        try:
            logits, h, c = self._checked_run(tokens, h, c)
        except NonFinite:
            raise ServiceError(
                Status.FAILED_PRECONDITION,
                "the model's output for this input and state is not finite (NaN or infinity); nothing was kept: "
                "send h and c as this model returned them, with finite values (or neither, for a fresh sequence)",
            ) from None
        except Exception as error:
            raise ServiceError(Status.INTERNAL, f"model step failed: {error}") from error
        return logits[0], h, c

    def _sample(self, turns: Sequence[Turn], logits: np.ndarray, positions: Sequence[int] | None = None) -> np.ndarray:
        """One token per row; a row's position is its turn's count unless given (taken modulo 2**64)."""
        params = [t.sampling for t in turns]
        return self._draw(
            logits,
            np.array([p.temperature for p in params], np.float64),
            np.array([p.top_k for p in params], np.int64),
            np.array([p.top_p for p in params], np.float64),
            as_uint64(p.seed for p in params),
            as_uint64(positions if positions is not None else (t._tokens_seen for t in turns)),
        )

    def _admit(self, turn: Turn, tokens: np.ndarray) -> None:
        self.metrics.queue_wait.labels(self.name).observe(time.perf_counter() - turn.submitted_at)
        slot, session_id = turn.slot, turn.session_id
        kept = f"the prompt was not read: the session keeps its state after {turn._tokens_seen} characters"
        try:  # nothing is written until the prompt is read and the first character drawn
            position = turn._tokens_seen + len(tokens)
            if len(tokens):
                logits, h, c = self._prefill(
                    slot, session_id, tokens, f"{kept}; it can be exported or continued with another prompt, or closed"
                )
            else:
                logits = self.slots.logits[[slot]]  # [1, vocab]
            token = None
            if not turn._cancelled and turn.sampling.max_tokens > 0:
                try:
                    token = int(self._sample([turn], logits, [position])[0])
                except Exception as error:
                    raise SessionStepError(
                        Status.INTERNAL, f"sampling failed for session {session_id}: {error}; {kept}"
                    ) from error
            if len(tokens):
                self.slots.scatter(np.array([slot]), h, c, logits)
        except Exception as error:
            cause = error.__cause__ if isinstance(error, SessionStepError) else error
            log.error("turn failed for session %s: %s", session_id, error, exc_info=cause)
            with self.lock:
                turn._finish(error)
                self._notify([turn])
            return
        with self.lock:
            turn._tokens_seen = position
            if token is None:  # max_tokens 0 ends by length; a turn cancelled before it began has no reason
                if not turn._cancelled:
                    turn._finish_reason = turn._finish_reason or LENGTH
                turn._finish()
            else:
                turn._deliver(token, self.codec.vocab[token])
                self._turns.append(turn)
                self.metrics.time_to_first_token.labels(self.name).observe(time.perf_counter() - turn.submitted_at)
                self._tokens.inc()
            self._notify([turn])

    def _next_batch(self) -> list[Turn]:
        """Up to max_batch runnable turns (called with the lock held); the rest go first next time."""
        batch = [t for t in self._turns if t._runnable(self.stream_buffer_chars)][: self.max_batch]
        if len(batch) == self.max_batch:
            self._turns.rotate(-self.max_batch)
        return batch

    def _row_failure(self, turn: Turn, error: Exception | None, what: str = "model step") -> SessionStepError:
        """The error that ends ``turn`` when its step fails alone (``error`` None: the state became non-finite)."""
        self.metrics.row_failures.labels(self.name, "non_finite" if error is None else "exception").inc()
        seen = turn._tokens_seen - 1  # its pending character is counted, but not read
        kept = (
            f"the step was not applied: the session keeps its state after {seen} characters (the last character "
            "sent was not read into it)"
        )
        if error is None:
            message = (
                f"session {turn.session_id}'s state became non-finite (NaN or infinity) on reading character "
                f"{seen + 1}; {kept}. It can still be exported, or continued with another prompt or sampling (the "
                "same continuation fails the same way); or close it and start a new one"
            )
            return SessionStepError(Status.FAILED_PRECONDITION, message)
        failure = SessionStepError(
            Status.INTERNAL,
            f"{what} failed for session {turn.session_id}: {error}; {kept}. Retry the turn, or export or close the "
            "session",
        )
        failure.__cause__ = error
        return failure

    def _step(self, batch: list[Turn]) -> None:
        slots = np.array([t.slot for t in batch])
        tokens = np.array([t._pending for t in batch], dtype=np.int64)[:, None]  # [batch, 1]

        def forward(rows: np.ndarray):
            h, c = self.slots.gather(slots[rows])
            logits, h, c = self.backend.run({"tokens": tokens[rows], "h0": h, "c0": c})
            return logits[:, -1], h, c

        parts, raised = contain(len(batch), forward, "model step")
        failures = {i: self._row_failure(batch[i], error) for i, error in raised.items()}
        with self.lock:  # a cancellation arriving after this snapshot is handled at the next step
            finishing = np.array([t._finishing for t in batch], bool)
        drawn = np.full(len(batch), -1, np.int64)  # the character drawn for each row that goes on
        if parts:
            rows, (logits, h, c) = _join(parts)
            finite = None if all_finite(h, c, logits) else finite_rows(h, c, logits)
            if finite is not None and not finite.all():
                for i in rows[~finite].tolist():
                    failures[i] = self._row_failure(batch[i], None)
                rows, logits, h, c = rows[finite], logits[finite], h[:, finite], c[:, finite]
            continuing = np.flatnonzero(~finishing[rows])  # positions in rows

            def draw(picked: np.ndarray) -> np.ndarray:
                chosen = continuing[picked]
                return self._sample([batch[i] for i in rows[chosen].tolist()], logits[chosen])

            sampled, unsampled = contain(len(continuing), draw, "sampling") if len(continuing) else ([], {})
            for j, error in unsampled.items():
                i = int(rows[continuing[j]])
                failures[i] = self._row_failure(batch[i], error, "sampling")
            for picked, tokens_drawn in sampled:
                drawn[rows[continuing[picked]]] = tokens_drawn
            if unsampled:
                keep = np.array([i not in failures for i in rows.tolist()], bool)
                rows, logits, h, c = rows[keep], logits[keep], h[:, keep], c[:, keep]
            self.slots.scatter(slots[rows], h, c, logits)  # failed rows keep their state
        for error in failures.values():
            log.error("%s", error.message, exc_info=error.__cause__)
        vocab = self.codec.vocab
        with self.lock:
            for i, (turn, token) in enumerate(zip(batch, drawn.tolist(), strict=True)):
                if token >= 0:
                    turn._deliver(token, vocab[token])
                    continue
                error = failures.get(i)
                if error is not None:  # its pending character was not read
                    turn._tokens_seen -= 1
                turn._finish(error)  # or its last character is fed now
                self._turns.remove(turn)
            self._notify(batch)
        self._batch_size.observe(len(batch))
        self._tokens.inc(int((drawn >= 0).sum()))

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
                            if turn._end is None:
                                turn._finish(error)
                                self._turns.remove(turn)
                        self._notify(batch)
                now = time.perf_counter()
                if last_step is not None:
                    self._inter_token.observe(now - last_step)
                last_step = now
