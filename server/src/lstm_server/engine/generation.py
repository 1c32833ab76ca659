"""Continuous batching for one generation model.

The surface: ``submit(slot, tokens, sampling, position) -> Turn``. A turn is:
read the prompt (the "prefill": turns that join together, and ``read``s taken
at the same time, share the calls, one per distinct prompt length, each on the
rows still reading), draw its first
character (the entry's sampler graph), then repeat {feed the last character
to the model; draw the next with the turn's own parameters and random stream;
hand it to the turn's stream}. The scheduler advances every turn that has a
character to feed in one batched call of the decoder (``runtime/decoding.py``:
the decode graph, K characters per row per call, sampling inside the graph):
it gathers their slots' (h, c), runs the call, scatters the new state, and
delivers each row's characters at once. Turns join (after their prefill) and
leave between calls; nobody waits for another turn to finish.

K adapts: each call takes as many characters as fit in ``decode_budget_ms``
at the time a character has taken at this batch size (measured, per
power-of-two batch bucket), at most ``max_decode_steps``, and no more than
the longest row needs. After a turn joins, K starts again at 1 and doubles with
every call (others are often joining at the same time, and each waits for the
call in flight). A turn that joins or a job that arrives waits at most about
one budget. Each row asks for its own count of characters (``steps``):
what is left of its ``max_tokens``, and the room in its stream buffer; past
it the row's state stays as it is. A stop string that ends inside a row's
characters ends the turn there: the row is run again, alone, from its state
before the call with exactly the characters delivered (the same draws give
the same characters), so the state has read exactly the text sent. The engine knows slots, not
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
(the first and the last go at once), and all streams together about
``stream_messages_per_s`` (the interval grows with the number of running
turns): fewer, fuller messages leave the CPU to the model instead of to gRPC.

What the state has seen: every character of the prompt and every generated
character, counted the moment it is handed to the stream (the turn's
``tokens_seen``). A turn is complete once its last character has been fed;
``completion`` then resolves (on the event loop) with how it ended and the
count. A cancelled turn (client cancel, deadline, disconnect, close) feeds the
character it had already produced and stops: the state has seen the prompt
and exactly the characters generated before the cancellation was noticed: the
characters of every call that began before it (at most ``stream_buffer_chars``
beyond what the reader took).

Faults stay in their row. A batched call that raises is run again in
halves, down to single rows, until the rows that fail alone are found
(``faults.contain``); the others go on exactly as if nothing had happened,
since a row's result does not depend on its batch. A row whose new h, c or
logits are not all finite (one vectorised check over the batch) fails too. A
failed row's call is not applied: none of its new characters is sent, its slot
keeps the state from before the call and its count goes back by the character
that was not read (that character was sent already), so the state is
consistent, can be exported, and continues from there; its turn ends with a
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
from ..logs import call_fields
from ..metrics import Metrics
from ..runtime.backends import Backend
from ..runtime.decoding import DecodeInputs, DecodeOutputs, Decoder
from .codec import CharCodec
from .faults import contain
from .sampling import Sampling, as_uint64, softmax, uniforms
from .slots import SlotState, StateSlots, all_finite, finite_rows
from .threads import name_os_thread

LENGTH, STOP = "length", "stop"
NON_FINITE, MODEL_FAILED = "NON_FINITE_STATE", "MODEL_FAILED"  # the reasons of a row's failures
log = logging.getLogger(__name__)
B = TypeVar("B", bound=Backend)
D = TypeVar("D", bound=Decoder)


class SessionStepError(ServiceError):
    """One turn's step failed alone; its slot's state and count are as they were before that step."""


class NonFinite(Exception):
    """A model call produced NaN or infinity in its new state or logits."""


def _join(parts: list[tuple[np.ndarray, DecodeOutputs]]) -> tuple[np.ndarray, DecodeOutputs]:
    """The rows and outputs of several contained decoder calls, as one batch."""
    if len(parts) == 1:
        return parts[0]
    rows = np.concatenate([r for r, _ in parts])
    outs = [out for _, out in parts]
    joined = DecodeOutputs(
        np.concatenate([o.sampled for o in outs]),
        np.concatenate([o.logits for o in outs]),
        np.concatenate([o.h for o in outs], axis=1),
        np.concatenate([o.c for o in outs], axis=1),
    )
    return rows, joined


def _bucket(batch: int) -> int:
    """The power of two at or above ``batch``: calls on about as many rows share a time per character."""
    return 1 << (batch - 1).bit_length()


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
    The times (``time.perf_counter()``) and ``model_calls``, for metrics and
    trace spans, are the model thread's until ``completion`` resolves.
    """

    def __init__(self, engine: GenerationEngine, slot: int, position: int, sampling: Sampling, session_id: str) -> None:
        self.engine = engine
        self.slot = slot
        self.session_id = session_id  # for messages and logs only
        self.log_fields = dict(call_fields())  # the submitting call's, for the model thread's log lines
        self.sampling = sampling
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None  # the model thread took it: its queueing ends, its prefill starts
        self.first_at: float | None = None  # its prompt read and first character drawn
        self.ended_at: float | None = None  # its last character fed, or it failed
        self.model_calls = 0  # the decode calls its row ran in
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

    def _to_send(self, text: str) -> tuple[int, str | None]:
        """How many of the characters ``text`` (drawn in this order) the turn sends, and why it ends there if it
        does: max_tokens (LENGTH) or the end of a stop string (STOP, first)."""
        n, reason = len(text), None
        if self._remaining <= n:
            n, reason = self._remaining, LENGTH
        if self._stop_window:  # no stop string ends inside the tail already sent: the turn would have ended
            seen = self._tail + text[:n]
            ends = [seen.find(stop) + len(stop) - len(self._tail) for stop in self.sampling.stop if stop in seen]
            if ends:
                n, reason = min(ends), STOP
        return n, reason

    def _send(self, text: str, reason: str | None) -> None:
        """Hand ``text`` to the reader and count it (lock held); ``reason``: the turn draws no more."""
        self._tokens_seen += len(text)
        self._remaining -= len(text)
        self._outbox.append(text)
        self._outbox_chars += len(text)
        if self._stop_window:
            self._tail = (self._tail + text)[-self._stop_window :]
        if reason is not None:
            self._finish_reason = reason

    def _finish(self, error: BaseException | None = None) -> None:
        """The last character is fed, or the turn failed (lock held); ``completion`` resolves on the event loop."""
        if error is not None and not isinstance(error, ServiceError):
            failure = ServiceError(Status.INTERNAL, f"generation failed: {error}")
            failure.__cause__ = error
            error = failure
        self._pending = None
        self._end = TurnEnd(self._finish_reason, error, self._tokens_seen)
        self.ended_at = time.perf_counter()

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
                next_send = loop.time() + engine.send_interval()


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


@dataclass(frozen=True)
class _Admission:
    """A prompt job: a turn waiting for its prompt to be read and its first character drawn."""

    turn: Turn
    tokens: np.ndarray

    @property
    def slot(self) -> int:
        return self.turn.slot


@dataclass(frozen=True)
class _PromptRead:
    """A prompt job: a prompt for an idle slot's state to read (``GenerationEngine.read``); ``future`` gets None, or
    the failure."""

    slot: int
    tokens: np.ndarray
    session_id: str
    future: Future


_PromptJob = _Admission | _PromptRead


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
        decoder: Decoder,
        max_decode_steps: int = 32,
        decode_budget_ms: float = 10.0,
        stream_messages_per_s: float = 0.0,
    ) -> None:
        self.name = name
        self.backend = backend
        self.codec = codec
        self.slots = slots
        self.max_batch = max_batch
        self.stream_buffer_chars = stream_buffer_chars
        self.stream_interval_s = stream_interval_ms / 1000
        self.stream_messages_per_s = stream_messages_per_s
        self.metrics = metrics
        self.decoder = decoder
        self.max_decode_steps = max_decode_steps
        self.decode_budget_s = decode_budget_ms / 1000
        self._char_seconds: dict[int, float] = {}  # per batch bucket: a moving average of a call's time / K
        self._ramp = 1  # K's cap: 1 after a turn joins, doubled by every call since (model thread only)
        self._vocab = np.array(codec.vocab, dtype=object)
        self._batch_size = metrics.batch_size.labels(name)  # labelled once, not on every step
        self._tokens = metrics.tokens_generated.labels(name)
        self._prompt_chars = metrics.prompt_characters.labels(name)
        self._queued = metrics.queue_depth.labels(name)
        self._prefill_seconds = metrics.model_call.labels(name, "prefill")
        self._decode_seconds = metrics.model_call.labels(name, "decode")
        self._step_seconds = metrics.model_call.labels(name, "step")
        self.lock = threading.Condition()
        self._jobs: list[Callable[[], None] | _PromptJob] = []  # prompt jobs: consecutive ones are taken together
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
        """Run the model's prompts, reads and explicit steps through ``wrap(current backend)`` from the next call
        on (fault injection in tests, or instrumentation); returns the wrapper."""
        with self.lock:
            self.backend = wrapped = wrap(self.backend)
        return wrapped

    def wrap_decoder(self, wrap: Callable[[Decoder], D]) -> D:
        """Draw characters through ``wrap(current decoder)`` from the next call on; returns the wrapper."""
        with self.lock:
            self.decoder = wrapped = wrap(self.decoder)
        return wrapped

    def send_interval(self) -> float:
        """The least time between two messages of one stream: ``stream_interval_ms``, longer when the running
        turns would together send more than ``stream_messages_per_s`` messages a second (0: no such cap)."""
        if self.stream_messages_per_s <= 0:
            return self.stream_interval_s
        return max(self.stream_interval_s, len(self._turns) / self.stream_messages_per_s)

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

    def _post(self, job: Callable[[], None] | _PromptJob) -> None:
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
            future: Future = Future()
            self._post(_PromptRead(slot, tokens, session_id, future))
            await asyncio.wrap_future(future)

    async def step(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Explicit-state call: (next-character probabilities, hn, cn); nothing is kept."""
        logits, h, c = await self._call(self._explicit, tokens, h, c)
        return softmax(logits), h, c

    def submit(self, slot: int, tokens: np.ndarray, sampling: Sampling, position: int, session_id: str = "") -> Turn:
        """Start a turn on ``slot``, whose state has read ``position`` characters (the position of its first
        sampled character, after the prompt ``tokens``). Read its text with ``turn.chunks()``; ``turn.completion``
        says how it ended. The slot must not be used otherwise until then."""
        turn = Turn(self, slot, position, sampling, session_id)
        self._queued.inc()
        self._post(_Admission(turn, tokens))
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

    def _checked_step(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray):
        """A Step call's (last logits [1, vocab], h, c) after one sequence ``tokens``, timed; raises ``NonFinite``
        on NaN or infinity."""
        started = time.perf_counter()
        logits, h, c = self.backend.run({"tokens": tokens[None, :], "h0": h, "c0": c})
        self._step_seconds.observe(time.perf_counter() - started)
        self._prompt_chars.inc(len(tokens))
        logits = logits[:, -1]
        if not all_finite(h, c, logits):
            raise NonFinite
        return logits, h, c

    def _read_prompts(self, slots: np.ndarray, prompts: list[np.ndarray]) -> list[tuple | Exception]:
        """Per slot, its (logits [1, vocab], h, c) after its prompt (nothing written), or why it failed alone
        (``NonFinite``, or the runtime's error). The prompts are read together: each call takes the rows still
        reading, the same number of characters each (up to the next prompt's end), so n prompts of one length take
        one call. Reading a prompt in parts with the state carried equals reading it at once, and a row's results
        do not depend on its batch (both are in the entry's batch-invariance check), so a row reads exactly as it
        would alone. A call that raises is retried apart (``contain``)."""
        n = len(prompts)
        h, c = self.slots.gather(slots)
        logits = np.zeros((n, self.vocab_size), np.float32)
        lengths = np.fromiter(map(len, prompts), np.int64, n)
        failed: dict[int, Exception] = {}
        start = 0
        for end in np.unique(lengths).tolist():
            rows = np.flatnonzero(lengths >= end)
            rows = rows[[r not in failed for r in rows.tolist()]]
            if len(rows):
                tokens = np.stack([prompts[r][start:end] for r in rows.tolist()])
                parts, raised = contain(len(rows), partial(self._read_part, tokens, h, c, rows), "prompt read")
                for part, (step_logits, new_h, new_c) in parts:
                    h[:, rows[part]], c[:, rows[part]], logits[rows[part]] = new_h, new_c, step_logits[:, -1]
                failed.update({int(rows[i]): error for i, error in raised.items()})
            start = end
        self._prompt_chars.inc(int(lengths.sum()) - sum(int(lengths[r]) for r in failed))
        finite = finite_rows(h, c, logits)
        return [
            failed[r] if r in failed else NonFinite() if not finite[r] else (logits[[r]], h[:, [r]], c[:, [r]])
            for r in range(n)
        ]

    def _read_part(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray, rows: np.ndarray, part: np.ndarray):
        """One call of ``_read_prompts``: rows ``rows[part]`` read ``tokens[part]`` from their state in ``h``, ``c``."""
        started = time.perf_counter()
        out = self.backend.run({"tokens": tokens[part], "h0": h[:, rows[part]], "c0": c[:, rows[part]]})
        self._prefill_seconds.observe(time.perf_counter() - started)
        return out

    def _prompt_failure(self, session_id: str, chars: int, error: Exception, kept: str) -> SessionStepError:
        """The error of a prompt that failed alone (``error``: ``NonFinite`` or the runtime's); ``kept`` ends the
        message."""
        if isinstance(error, NonFinite):
            self.metrics.row_failures.labels(self.name, "non_finite").inc()
            return SessionStepError(
                Status.FAILED_PRECONDITION,
                f"session {session_id}'s state became non-finite (NaN or infinity) while reading the prompt "
                f"({chars} characters); {kept}",
                reason=NON_FINITE,
            )
        self.metrics.row_failures.labels(self.name, "exception").inc()
        failure = SessionStepError(
            Status.INTERNAL,
            f"model step failed for session {session_id} while reading the prompt: {error}; {kept}",
            reason=MODEL_FAILED,
        )
        failure.__cause__ = error
        return failure

    def _store_read(self, job: _PromptRead, result: tuple | Exception) -> None:
        """Write a read's new state, or fail its future (the slot keeps its state)."""
        if isinstance(result, Exception):
            kept = "the prompt was not read (try another prompt)"
            job.future.set_exception(self._prompt_failure(job.session_id, len(job.tokens), result, kept))
            return
        logits, h, c = result
        self.slots.scatter(np.array([job.slot]), h, c, logits)
        job.future.set_result(None)

    def _explicit(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray):
        try:
            logits, h, c = self._checked_step(tokens, h, c)
        except NonFinite:
            raise ServiceError(
                Status.FAILED_PRECONDITION,
                "the model's output for this input and state is not finite (NaN or infinity); nothing was kept: "
                "send h and c as this model returned them, with finite values (or neither, for a fresh sequence)",
                reason=NON_FINITE,
            ) from None
        except Exception as error:
            raise ServiceError(Status.INTERNAL, f"model step failed: {error}", reason=MODEL_FAILED) from error
        return logits[0], h, c

    def _draw_first(self, turn: Turn, logits: np.ndarray, position: int) -> int:
        """A turn's first character, from the logits after its prompt [1, vocab], at ``position``."""
        p = turn.sampling
        draws = uniforms(as_uint64([p.seed]), as_uint64([position]))
        return int(
            self.decoder.sample(
                logits, draws, np.array([p.temperature]), np.array([p.top_k], np.int64), np.array([p.top_p])
            )[0]
        )

    def _read_together(self, jobs: list[_PromptJob]) -> None:
        """Prompt jobs taken together (turns joining, reads): their prompts read in shared calls, then each one
        finished: a turn's first character drawn, a read's state written."""
        now = time.perf_counter()
        live: list[_PromptJob] = []
        for job in jobs:
            if isinstance(job, _PromptRead):
                if job.future.set_running_or_notify_cancel():  # its caller may have gone
                    live.append(job)
                continue
            self._queued.dec()
            job.turn.admitted_at = now
            self.metrics.queue_wait.labels(self.name).observe(now - job.turn.submitted_at)
            live.append(job)
        reading = [job for job in live if len(job.tokens)]  # a read always has a prompt; a turn may not
        results = iter(
            self._read_prompts(np.fromiter((job.slot for job in reading), np.intp), [job.tokens for job in reading])
        )
        for job in live:
            read = next(results) if len(job.tokens) else None
            if isinstance(job, _Admission):
                self._start(job.turn, job.tokens, read)
            else:
                self._store_read(job, read)

    def _start(self, turn: Turn, tokens: np.ndarray, read: tuple | Exception | None) -> None:
        """Draw a turn's first character after its prompt (``read``: ``_read_prompts``'s result, None without a
        prompt), write its state, and add it to the running turns; or end it with the failure."""
        slot, session_id = turn.slot, turn.session_id
        kept = f"the prompt was not read: the session keeps its state after {turn._tokens_seen} characters"
        try:  # nothing is written until the prompt is read and the first character drawn
            position = turn._tokens_seen + len(tokens)
            if isinstance(read, Exception):
                why = f"{kept}; it can be exported or continued with another prompt, or closed"
                raise self._prompt_failure(session_id, len(tokens), read, why)
            if read is not None:
                logits, h, c = read
            else:
                logits = self.slots.logits[[slot]]  # [1, vocab]
            token = None
            if not turn._cancelled and turn.sampling.max_tokens > 0:
                try:
                    token = self._draw_first(turn, logits, position)
                except Exception as error:
                    raise SessionStepError(
                        Status.INTERNAL,
                        f"sampling failed for session {session_id}: {error}; {kept}",
                        reason=MODEL_FAILED,
                    ) from error
            if read is not None:
                self.slots.scatter(np.array([slot]), h, c, logits)
        except Exception as error:
            cause = error.__cause__ if isinstance(error, SessionStepError) else error
            log.error("turn failed for session %s: %s", session_id, error, exc_info=cause, extra=turn.log_fields)
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
                char = self.codec.vocab[token]
                turn._send(char, turn._to_send(char)[1])
                turn._pending = token
                self._turns.append(turn)
                self._ramp = 1  # others may be joining too: short calls until they are in
                turn.first_at = time.perf_counter()
                self._tokens.inc()
            self._notify([turn])

    def _next_batch(self) -> list[Turn]:
        """Up to max_batch runnable turns (called with the lock held); the rest go first next time."""
        batch = [t for t in self._turns if t._runnable(self.stream_buffer_chars)][: self.max_batch]
        if len(batch) == self.max_batch:
            self._turns.rotate(-self.max_batch)
        return batch

    def _row_failure(self, turn: Turn, error: Exception | None) -> SessionStepError:
        """The error that ends ``turn`` when its call fails alone (``error`` None: the state became non-finite)."""
        self.metrics.row_failures.labels(self.name, "non_finite" if error is None else "exception").inc()
        seen = turn._tokens_seen - 1  # its pending character is counted, but not read
        kept = (
            f"the step was not applied: the session keeps its state after {seen} characters (the last character "
            "sent was not read into it)"
        )
        if error is None:
            message = (
                f"session {turn.session_id}'s state became non-finite (NaN or infinity) on reading the characters "
                f"after the first {seen}; {kept}. It can still be exported, or continued with another prompt or "
                "sampling (the same continuation fails the same way); or close it and start a new one"
            )
            return SessionStepError(Status.FAILED_PRECONDITION, message, reason=NON_FINITE)
        failure = SessionStepError(
            Status.INTERNAL,
            f"model step failed for session {turn.session_id}: {error}; {kept}. Retry the turn, or export or close "
            "the session",
            reason=MODEL_FAILED,
        )
        failure.__cause__ = error
        return failure

    def _steps_per_call(self, batch: int) -> tuple[int, int]:
        """(K for a call on ``batch`` rows, the K the time budget alone allows): what fits the budget at the measured
        time per character, and at most the ramp since the last turn joined (1, 2, 4, ...: a turn that arrives while
        others join waits little)."""
        seconds = self._char_seconds.get(_bucket(batch))
        ramp, self._ramp = self._ramp, min(2 * self._ramp, self.max_decode_steps)
        if seconds is None:
            return 1, 1  # measured first
        budget = max(1, min(self.max_decode_steps, int(self.decode_budget_s / seconds)))
        return min(ramp, budget), budget

    def _measured(self, batch: int, steps: int, seconds: float) -> None:
        """Fold a call that took ``steps`` characters into its batch bucket's time per character. Only calls whose K
        the budget chose count: a short call (the ramp, or rows near their end) spreads the call's fixed cost over
        few characters and would hold K down."""
        bucket, per_char = _bucket(batch), seconds / steps
        old = self._char_seconds.get(bucket)
        self._char_seconds[bucket] = per_char if old is None else 0.8 * old + 0.2 * per_char

    def _decode_inputs(self, batch: list[Turn], steps: np.ndarray) -> DecodeInputs:
        """The decoder's inputs for ``batch``: pending tokens, gathered state, parameters and each row's draws."""
        n, k = len(batch), int(steps.max())
        inputs = self.decoder.inputs(n, k)
        slots = np.fromiter((t.slot for t in batch), np.intp, n)
        inputs.tokens[:] = np.fromiter((t._pending for t in batch), np.int64, n)
        np.take(self.slots.h, slots, axis=1, out=inputs.h0, mode="clip")  # "raise" would copy through a buffer
        np.take(self.slots.c, slots, axis=1, out=inputs.c0, mode="clip")
        params = [t.sampling for t in batch]
        inputs.temperature[:] = np.fromiter((p.temperature for p in params), np.float64, n)
        inputs.top_k[:] = np.fromiter((p.top_k for p in params), np.int64, n)
        inputs.top_p[:] = np.fromiter((p.top_p for p in params), np.float64, n)
        inputs.steps[:] = steps
        positions = as_uint64(t._tokens_seen for t in batch)[:, None] + np.arange(k, dtype=np.uint64)
        inputs.draws[:] = uniforms(as_uint64(p.seed for p in params)[:, None], positions)
        return inputs

    def _decode(self, inputs: DecodeInputs, n: int) -> tuple[np.ndarray, DecodeOutputs | None, dict[int, Exception]]:
        """The decoder on every row, contained: (rows that ran, their outputs (None: no row ran), the error of each
        row that failed)."""

        def run(rows: np.ndarray) -> DecodeOutputs:
            if len(rows) == n:
                return self.decoder.decode(inputs)
            return self.decoder.decode(inputs.rows(rows)).copy()  # the next call reuses the decoder's buffers

        parts, raised = contain(n, run, "model step")
        if not parts:
            return np.zeros(0, np.intp), None, raised
        rows, out = _join(parts)
        return rows, out, raised

    def _step(self, batch: list[Turn]) -> None:
        """One decoder call for ``batch``."""
        n = len(batch)
        with self.lock:  # a cancellation arriving after this snapshot is handled at the next call
            finishing = np.fromiter((t._finishing for t in batch), bool, n)
        room = np.fromiter((t._remaining + 1 for t in batch), np.int64, n)  # the last drawn may go unsent
        room = np.minimum(room, self.stream_buffer_chars - np.fromiter((t._outbox_chars for t in batch), np.int64, n))
        k, budget = self._steps_per_call(n)
        steps = np.where(finishing, 1, np.clip(room, 1, k))
        started = time.perf_counter()
        inputs = self._decode_inputs(batch, steps)
        called = time.perf_counter()
        rows, out, raised = self._decode(inputs, n)
        self._decode_seconds.observe(time.perf_counter() - called)
        failures = {i: self._row_failure(batch[i], error) for i, error in raised.items()}
        sends: dict[int, tuple[int, str | None]] = {}  # row -> (characters sent, reason)
        rerun: list[int] = []  # positions in ``rows`` whose stop string ended before their last read character
        if len(rows):
            finite = None if all_finite(out.h, out.c, out.logits) else finite_rows(out.h, out.c, out.logits)
            if finite is not None and not finite.all():
                for i in rows[~finite].tolist():
                    failures[i] = self._row_failure(batch[i], None)
                rows, out = (
                    rows[finite],
                    DecodeOutputs(out.sampled[finite], out.logits[finite], out.h[:, finite], out.c[:, finite]),
                )
            texts = self._vocab[np.maximum(out.sampled, 0)].sum(axis=1)  # one string per row (past steps: unused)
            for j, i in enumerate(rows.tolist()):
                if finishing[i]:
                    continue
                sent, reason = batch[i]._to_send(texts[j][: steps[i]])
                sends[i] = (sent, reason)
                if sent + 1 < steps[i]:
                    rerun.append(j)
            keep = np.ones(len(rows), bool)
            keep[rerun] = False
            slots = np.fromiter((batch[i].slot for i in rows[keep].tolist()), np.intp)
            self.slots.scatter(slots, out.h[:, keep], out.c[:, keep], out.logits[keep])  # failed rows keep theirs
            sampled = out.sampled.copy() if rerun else out.sampled
            if rerun:
                self._rerun(batch, inputs, rows[rerun], sends, failures)
        for i, error in failures.items():
            log.error("%s", error.message, exc_info=error.__cause__, extra=batch[i].log_fields)
        delivered = 0
        with self.lock:
            for j, i in enumerate(rows.tolist()):
                turn = batch[i]
                turn.model_calls += 1
                if i in failures:
                    continue
                if i in sends:
                    sent, reason = sends[i]
                    turn._send(texts[j][:sent], reason)
                    delivered += sent
                    if sent == steps[i]:  # the last one drawn is sent, not yet read
                        turn._pending = int(sampled[j, sent - 1])
                        continue
                turn._finish()  # every character sent is read
                self._turns.remove(turn)
            for i, error in failures.items():
                batch[i]._tokens_seen -= 1  # its pending character was not read
                batch[i]._finish(error)
                self._turns.remove(batch[i])
            self._notify(batch)
        if int(steps.max()) == budget:
            self._measured(n, budget, time.perf_counter() - started)
        self._batch_size.observe(n)
        self._tokens.inc(delivered)

    def _rerun(
        self,
        batch: list[Turn],
        inputs: DecodeInputs,
        rows: np.ndarray,
        sends: dict[int, tuple[int, str | None]],
        failures: dict[int, SessionStepError],
    ) -> None:
        """Rows whose stop string ended before their last character read: run again alone from their state before
        the call, reading exactly their pending character and the characters sent (the same draws draw the same
        characters), and keep that state."""
        again = inputs.rows(rows)
        again.steps[:] = [sends[i][0] + 1 for i in rows.tolist()]
        try:
            out = self.decoder.decode(again)
            if not all_finite(out.h, out.c, out.logits):
                raise NonFinite
        except Exception as error:  # the same computation just ran: not expected
            for i in rows.tolist():
                failures[i] = self._row_failure(batch[i], None if isinstance(error, NonFinite) else error)
            return
        self.slots.scatter(np.fromiter((batch[i].slot for i in rows.tolist()), np.intp), out.h, out.c, out.logits)

    def _run_jobs(self, jobs: list[Callable[[], None] | _PromptJob]) -> None:
        """Run ``jobs`` in order; consecutive prompt jobs (turns joining, reads) together, up to ``max_batch``."""
        together: list[_PromptJob] = []
        for job in jobs:
            prompt = isinstance(job, _PromptJob)
            if prompt:
                together.append(job)
            if together and (not prompt or len(together) == self.max_batch):
                self._read_together(together)
                together = []
            if not prompt:
                job()
        if together:
            self._read_together(together)

    def _run(self) -> None:
        name_os_thread(f"model-{self.name}")
        while True:
            with self.lock:
                while not self._stopping and not (batch := self._next_batch()) and not self._jobs:
                    self.lock.wait()
                if self._stopping:
                    return
                jobs, self._jobs = self._jobs, []
            self._run_jobs(jobs)
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
