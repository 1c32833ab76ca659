"""Continuous batching for one generation model.

A turn is: read the prompt (one full-sequence call, the "prefill"), then
repeat {sample the next character with the turn's own parameters and random
stream; hand it to the turn's stream; feed it to the model}. The scheduler
loop steps every turn that has a character to feed in one batched model
call: it gathers their slots' (h, c), runs one step, scatters the new state,
samples all rows at once, and delivers. Turns join (after their prefill) and
leave between steps; nobody waits for another turn to finish.

All model calls of a model run on one worker thread, so the event loop keeps
serving while the model computes and slot memory is only touched there.

What the state has seen: every character of the prompt and every generated
character, counted the moment it is handed to the stream (``tokens_seen``).
A turn is complete, and the session free, only once its last character has
been fed; the stream's final message is sent after that. A cancelled turn
(client cancel, deadline, disconnect) feeds the character it had already
produced and stops: the session has seen the prompt and exactly the
characters generated before the cancellation was noticed (at most
``stream_buffer_chars`` beyond what the client was sent).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from .backends import Backend
from .codec import CharCodec
from .errors import ServiceError
from .metrics import Metrics
from .sampling import Sampling, sample, softmax
from .sessions import Session
from .state import StateSlots

LENGTH, STOP = "length", "stop"
log = logging.getLogger(__name__)


@dataclass
class Chunk:
    text: str
    tokens_seen: int
    finish_reason: str | None = None


class Turn:
    """One Generate call (or one Chat message) on one session."""

    def __init__(self, session: Session, sampling: Sampling, engine: GenerationEngine) -> None:
        self.session = session
        self.sampling = sampling
        self.engine = engine
        self.remaining = sampling.max_tokens
        self.pending: int | None = None  # generated, delivered, not yet fed
        self.finish_reason: str | None = None  # set once no more characters will be sampled
        self.cancelled = False
        self.complete = False
        self.error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self._outbox: list[str] = []
        self._outbox_chars = 0
        self._tail = ""
        self._stop_window = max((len(s) for s in sampling.stop), default=0)
        self._changed = asyncio.Event()

    @property
    def finishing(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def runnable(self, buffer_limit: int) -> bool:
        """Has a character to feed, and its reader keeps up (or it is finishing anyway)."""
        return self.pending is not None and (self.finishing or self._outbox_chars < buffer_limit)

    def deliver(self, token: int, char: str) -> None:
        self.pending = token
        self.session.tokens_seen += 1
        self.remaining -= 1
        self._outbox.append(char)
        self._outbox_chars += 1
        if self._stop_window:
            self._tail = (self._tail + char)[-self._stop_window :]
            if any(self._tail.endswith(s) for s in self.sampling.stop):
                self.finish_reason = STOP
        if self.finish_reason is None and self.remaining <= 0:
            self.finish_reason = LENGTH
        self._changed.set()

    def finish(self, error: BaseException | None = None) -> None:
        """The last character is fed (or the turn failed): the session is free again."""
        self.complete = True
        self.error = error
        self.pending = None
        self.session.busy = False
        self.session.turn = None
        self.session.touch()
        if self.session.closed:
            self.engine.slots.release(self.session.slot)
        self._changed.set()

    def cancel(self) -> None:
        if not self.complete:
            self.cancelled = True
            self.engine.wake()

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The turn's text as it is produced, coalesced; the last chunk carries the finish reason."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            complete = self.complete
            text = "".join(self._outbox)
            self._outbox.clear()
            self._outbox_chars = 0
            self.engine.wake()  # a paused turn may run again
            if complete and self.error is not None:
                raise ServiceError(grpc.StatusCode.INTERNAL, f"generation failed: {self.error}") from self.error
            if complete:
                yield Chunk(text, self.session.tokens_seen, self.finish_reason or LENGTH)
                return
            if text:
                yield Chunk(text, self.session.tokens_seen)


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
        metrics: Metrics,
    ) -> None:
        self.name = name
        self.backend = backend
        self.codec = codec
        self.slots = slots
        self.max_batch = max_batch
        self.stream_buffer_chars = stream_buffer_chars
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
        self._turns: collections.deque[Turn] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._admissions: set[asyncio.Task] = set()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"scheduler-{self.name}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def wake(self) -> None:
        self._wake.set()

    @property
    def active_turns(self) -> int:
        return len(self._turns)

    # -- model calls (worker thread) -----------------------------------------

    def _prefill_slot(self, slot: int, ids: np.ndarray) -> None:
        h, c = self.slots.gather(np.array([slot]))
        logits, h, c = self.backend.run({"tokens": ids[None, :], "h0": h, "c0": c})
        self.slots.scatter(np.array([slot]), h, c, logits[:, -1])

    def _step_slots(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        h, c = self.slots.gather(slots)
        logits, h, c = self.backend.run({"tokens": tokens[:, None], "h0": h, "c0": c})
        logits = logits[:, -1]
        self.slots.scatter(slots, h, c, logits)
        return logits

    def _explicit(self, ids: np.ndarray, h: np.ndarray, c: np.ndarray):
        logits, h, c = self.backend.run({"tokens": ids[None, :], "h0": h, "c0": c})
        return logits[0, -1], h, c

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- session operations ------------------------------------------------------

    async def read(self, session: Session, ids: np.ndarray) -> None:
        """Feed ``ids`` to the session's state in one call (the session must be held busy by the caller)."""
        if len(ids):
            await self._in_worker(self._prefill_slot, session.slot, ids)
            session.tokens_seen += len(ids)
            session.has_logits = True

    async def step(self, ids: np.ndarray, h: np.ndarray, c: np.ndarray):
        """Explicit-state call: (next-character probabilities, hn, cn); nothing is kept."""
        logits, h, c = await self._in_worker(self._explicit, ids, h, c)
        return softmax(logits), h, c

    def submit(self, session: Session, ids: np.ndarray, sampling: Sampling) -> Turn:
        """Start a turn on a session the caller has marked busy; read its chunks with ``turn.chunks()``."""
        turn = Turn(session, sampling, self)
        session.turn = turn
        task = asyncio.get_running_loop().create_task(self._admit(turn, ids))
        self._admissions.add(task)
        task.add_done_callback(self._admissions.discard)
        return turn

    async def _admit(self, turn: Turn, ids: np.ndarray) -> None:
        try:
            self.metrics.queue_wait.labels(self.name).observe(time.perf_counter() - turn.submitted_at)
            await self.read(turn.session, ids)
            if turn.cancelled or turn.sampling.max_tokens == 0:
                turn.finish_reason = turn.finish_reason or LENGTH
                turn.finish()
                return
            slot = turn.session.slot
            token = self._sample([turn], self.slots.logits[[slot]])[0]
            turn.deliver(int(token), self.codec.vocab[token])
            self.metrics.time_to_first_token.labels(self.name).observe(time.perf_counter() - turn.submitted_at)
            self.metrics.tokens_generated.labels(self.name).inc()
            self._turns.append(turn)
            self.wake()
        except Exception as error:
            log.exception("prefill failed for session %s", turn.session.id)
            turn.finish(error)

    # -- the loop --------------------------------------------------------------

    def _sample(self, turns: list[Turn], logits: np.ndarray) -> np.ndarray:
        params = [t.sampling for t in turns]
        return sample(
            logits,
            np.array([p.temperature for p in params]),
            np.array([p.top_k for p in params]),
            np.array([p.top_p for p in params]),
            np.array([p.seed for p in params], dtype=np.uint64),
            np.array([t.session.tokens_seen for t in turns], dtype=np.uint64),
        )

    def _next_batch(self) -> list[Turn]:
        batch = [t for t in self._turns if t.runnable(self.stream_buffer_chars)][: self.max_batch]
        if len(batch) == self.max_batch:
            self._turns.rotate(-self.max_batch)  # the next step starts with the ones left out
        return batch

    async def _loop(self) -> None:
        last_step = time.perf_counter()
        while True:
            batch = self._next_batch()
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                last_step = time.perf_counter()
                continue
            slots = np.array([t.session.slot for t in batch])
            tokens = np.array([t.pending for t in batch], dtype=np.int64)
            logits = await self._in_worker(self._step_slots, slots, tokens)
            now = time.perf_counter()
            self.metrics.batch_size.labels(self.name).observe(len(batch))
            self.metrics.inter_token_latency.labels(self.name).observe(now - last_step)
            last_step = now
            continuing = []
            for row, turn in enumerate(batch):
                if turn.finishing:
                    turn.finish()
                    self._turns.remove(turn)
                else:
                    continuing.append(row)
            if continuing:
                rows = np.array(continuing)
                turns = [batch[r] for r in continuing]
                drawn = self._sample(turns, logits[rows])
                vocab = self.codec.vocab
                for turn, token in zip(turns, drawn.tolist(), strict=True):
                    turn.deliver(token, vocab[token])
                self.metrics.tokens_generated.labels(self.name).inc(len(turns))
