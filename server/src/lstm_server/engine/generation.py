"""Continuous batching for one character language model (docs/server.md, "The generation engine").

``submit(slot, tokens, sampling, position) -> Turn``. Two threads per model. The prefill thread takes the posted
jobs: a turn's prompt is read (``prefill.py``, shared with the turns and reads taken at the same time) and its
first character drawn at once, without waiting for the decode call in flight; then the turn joins the running
turns. The decode thread advances them: every call is plan (``plan.py``: rows and K per row) -> execute
(``execute.py``: gather the slots' state, one call of the decode graph, contained per row) -> apply (scatter the
new state, hand each row its characters, end the turns that are complete). A turn's fields are the prefill
thread's until it joins and the decode thread's after (``turn.py``); a slot is theirs while it is lent
(``slots.py``). The event loop submits work and takes text. A row that fails fails alone (``faults.py``) and says
how in a ``RowFailure``; the layers above word it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from ..config import ServerConfig
from ..metrics import Metrics
from ..runtime.backends import Backend
from ..runtime.decoding import DecodeInputs, Decoder
from .codec import CharCodec
from .execute import Send, StepOutputs, execute, sends
from .faults import DECODE, ENGINE, MODEL_FAILED, NON_FINITE, SAMPLE, STEP, RowFailed, RowFailure
from .pause import hold
from .plan import StepPlan, StepSizer, plan
from .prefill import Admission, CacheUse, PromptJob, PromptRead, PromptState, draw_first, read_prompts
from .prefix_cache import CachedState, CacheEntry, PrefixCache
from .sampling import Sampling, softmax
from .slots import StateSlots, all_finite
from .threads import name_os_thread
from .turn import Pacer, Turn

log = logging.getLogger(__name__)
B = TypeVar("B", bound=Backend)
T = TypeVar("T")
D = TypeVar("D", bound=Decoder)


@dataclass(frozen=True)
class EngineConfig:
    """The scheduler's settings (``ServerConfig`` has their meaning and limits)."""

    max_batch: int = 256
    stream_buffer_chars: int = 1024
    stream_interval_ms: float = 20.0
    stream_messages_per_s: float = 2000.0
    max_decode_steps: int = 32
    decode_budget_ms: float = 25.0
    decode_nice: int = 10
    prefix_cache_bytes: int = 0
    prefix_cache_stride: int = 256
    prefix_cache_shared: bool = False  # all tenants share the model's prefix cache

    @classmethod
    def of(cls, config: ServerConfig) -> EngineConfig:
        fields = set(cls.__dataclass_fields__) - {"prefix_cache_shared"}
        return cls(**{name: getattr(config, name) for name in fields})


class GenerationEngine:
    """The scheduler, slots and backend of one character language model."""

    def __init__(
        self,
        name: str,
        backend: Backend,
        codec: CharCodec,
        slots: StateSlots,
        decoder: Decoder,
        metrics: Metrics,
        config: EngineConfig = EngineConfig(),
    ) -> None:
        self.name = name
        self.backend = backend
        self.codec = codec
        self.slots = slots
        self.decoder = decoder
        self.metrics = metrics
        self.config = config
        self.sizer = StepSizer(config.decode_budget_ms, config.max_decode_steps)  # decode thread
        self._vocab = np.array(codec.vocab, dtype=object)
        self._batch_size = metrics.batch_size.labels(name)  # labelled once, not on every step
        self._current_batch = metrics.current_batch.labels(name)
        self._tokens = metrics.tokens_generated.labels(name)
        self._prompt_chars = metrics.prompt_characters.labels(name)
        self._queued = metrics.queue_depth.labels(name)
        self._prefill_seconds = metrics.model_call.labels(name, "prefill")
        self._decode_seconds = metrics.model_call.labels(name, "decode")
        self._step_seconds = metrics.model_call.labels(name, "step")
        self.cache = PrefixCache(config.prefix_cache_bytes, config.prefix_cache_stride)  # the prefill thread's
        self._cache_metrics = tuple(
            m.labels(name)
            for m in (
                metrics.prefix_cache_lookups,
                metrics.prefix_cache_hits,
                metrics.prefix_cache_saved,
                metrics.prefix_cache_bytes,
                metrics.prefix_cache_entries,
                metrics.prefix_cache_evictions,
            )
        )
        self._evicted = 0  # the cache's evictions counted so far (prefill thread)
        self.publish_reads = False  # reads report the states they read, for a second level (set before start)
        mutex = threading.Lock()  # guards the fields below, and what a turn's threads share
        self.lock = threading.Condition(mutex)  # the decode thread waits on it: a turn may run
        self._admit = threading.Condition(mutex)  # the prefill thread waits on it: a job was posted
        self._jobs: list[Callable[[], None] | PromptJob] = []  # posted by the event loop, taken by the prefill thread
        self._turns: collections.deque[Turn] = collections.deque()  # running: appended by prefill, read by decode
        self._joined = False  # a turn joined since the last decode call (set by prefill, cleared by decode)
        self._stopping = False
        self._to_notify: set[Turn] = set()  # turns with news, until the event loop's flush (lock held)
        self._notify_scheduled = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pacer = Pacer(self.send_interval)  # event loop

    # -- lifecycle (event loop) ------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for name, run in ((f"model-{self.name}", self._decode_loop), (f"model-{self.name}-in", self._prefill_loop)):
            self._threads.append(threading.Thread(target=run, args=(name,), name=name, daemon=True))
            self._threads[-1].start()

    async def stop(self) -> None:
        with self.lock:
            self._stopping = True
            self.lock.notify()
            self._admit.notify()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)

    def paused(self, timeout_s: float = 10.0) -> contextlib.AbstractContextManager[Callable[[int], bool]]:
        """Hold the prefill thread between two jobs while the block runs (``pause.py``; tests and tools): turns
        submitted meanwhile join together when it ends."""
        return hold(self.name, self._post, lambda: len(self._jobs), self.lock, timeout_s)

    def wrap_backend(self, wrap: Callable[[Backend], B]) -> B:
        """Run prompts, reads and Steps through ``wrap(current backend)`` from the next call on (fault injection
        in tests, or instrumentation); returns the wrapper."""
        with self.lock:
            self.backend = wrapped = wrap(self.backend)
        return wrapped

    def wrap_decoder(self, wrap: Callable[[Decoder], D]) -> D:
        """Draw characters through ``wrap(current decoder)`` from the next call on; returns the wrapper."""
        with self.lock:
            self.decoder = wrapped = wrap(self.decoder)
        return wrapped

    def send_interval(self) -> float:
        """The least time between two chunks of one stream: ``stream_interval_ms``, longer when the running turns
        would together send more than ``stream_messages_per_s`` chunks a second (0: no such cap)."""
        interval = self.config.stream_interval_ms / 1000
        if self.config.stream_messages_per_s <= 0:
            return interval
        return max(interval, len(self._turns) / self.config.stream_messages_per_s)

    # -- requests (event loop) ----------------------------------------------------

    def _post(self, job: Callable[[], None] | PromptJob) -> None:
        with self._admit:
            self._jobs.append(job)
            self._admit.notify()

    def release_after_pending(self, slot: int) -> None:
        """Free a slot on the prefill thread, once the work submitted before (a read in flight) is done."""
        self._post(lambda: self.slots.release(slot))

    def cache_use(self, tenant: str | None) -> CacheUse | None:
        """How a read into a fresh state goes through the prefix cache for ``tenant`` (None: the state is not
        fresh, or the cache is off): in the tenant's own scope, or the model's shared one."""
        if tenant is None or not self.cache.enabled:
            return None
        return CacheUse(self.cache_scope(tenant), self.publish_reads)

    def offer(self, scope: str, tokens: np.ndarray, state: CachedState) -> None:
        """Put ``state``, the state after ``tokens`` (from a second level), in the prefix cache of ``scope``, before
        the reads submitted after this."""

        def keep() -> None:
            self.cache.insert(scope, tokens, state)
            self._cache_sizes()

        self._post(keep)

    def cache_scope(self, tenant: str) -> str:
        """The prefix cache scope of ``tenant``'s reads (never one tenant's name for another's)."""
        return "shared" if self.config.prefix_cache_shared else f"tenant:{tenant}"

    async def read(self, slot: int, tokens: np.ndarray, fresh_for: str | None = None) -> CacheUse | None:
        """Feed ``tokens`` to the slot's state (the caller holds the slot and counts them); ``RowFailed`` if the
        read failed alone (the slot keeps its state). ``fresh_for``: the slot holds a fresh state, read for this
        tenant through the prefix cache (what it did is returned)."""
        use = None
        if len(tokens):
            future: Future = Future()
            use = self.cache_use(fresh_for)
            self.slots.lend(slot)  # the prefill thread gives it back, cancelled or not
            self._post(PromptRead(slot, tokens, future, use))
            await asyncio.wrap_future(future)
        return use

    async def step(
        self, tokens: np.ndarray, h: np.ndarray | None, c: np.ndarray | None, tenant: str = ""
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Explicit-state call: (next-character probabilities, hn, cn); nothing is kept but, from a fresh state
        (``h`` and ``c`` None), ``tenant``'s prefix cache entries. ``RowFailed`` if it fails."""
        if h is None or c is None:
            use = self.cache_use(tenant)
            if use is not None:
                logits, h, c = await self._on_prefill(lambda: self._fresh_step(tokens, use))
                return softmax(logits), h, c
            h, c = np.zeros(self.slots.slot_shape, np.float32), np.zeros(self.slots.slot_shape, np.float32)
        logits, h, c = await self._on_prefill(lambda: self._explicit(tokens, h, c))
        return softmax(logits), h, c

    async def cache_entries(self, tenant: str, limit: int) -> list[CacheEntry]:
        """The prefix cache's checkpoints in ``tenant``'s own scope, shortest first, at most ``limit``."""
        return await self._on_prefill(lambda: self.cache.entries(f"tenant:{tenant}", limit))

    async def clear_cache(self, tenant: str) -> int:
        """Forget the prefix cache's checkpoints in ``tenant``'s own scope; how many there were."""

        def clear() -> int:
            cleared = self.cache.clear(f"tenant:{tenant}")
            self._cache_sizes()
            return cleared

        return await self._on_prefill(clear)

    async def _on_prefill(self, call: Callable[[], T]) -> T:
        """``call()`` run on the prefill thread, between two jobs."""
        future: Future = Future()

        def job() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as error:
                    future.set_exception(error)

        self._post(job)
        return await asyncio.wrap_future(future)

    def submit(
        self, slot: int, tokens: np.ndarray, sampling: Sampling, position: int, fresh_for: str | None = None
    ) -> Turn:
        """Start a turn on ``slot``, whose state has read ``position`` characters, reading ``tokens`` first. The
        slot is the model threads' until the turn's ``end`` is set. ``fresh_for``: the slot holds a fresh state
        (``position`` 0), read for this tenant through the prefix cache (``turn.cache`` says what it did)."""
        self.slots.lend(slot)
        use = self.cache_use(fresh_for) if len(tokens) else None
        turn = Turn(slot, position, sampling, self.lock, self.pacer, self.config.stream_buffer_chars, use)
        self._queued.inc()
        self._post(Admission(turn, tokens, turn.cache))
        return turn

    def _flush_notifications(self) -> None:
        with self.lock:
            turns, self._to_notify = self._to_notify, set()
            self._notify_scheduled = False
            ended = [turn.end is not None for turn in turns]
        now = self._loop.time()
        self.pacer.flushed(now)
        for turn, end in zip(turns, ended, strict=True):
            turn.wake(end, now)

    # -- model threads: the loops ----------------------------------------------------

    def _notify(self, turns: Sequence[Turn]) -> None:
        """Wake the readers of ``turns`` (lock held); one event-loop callback per burst."""
        self._to_notify.update(turns)
        if not self._notify_scheduled:
            self._notify_scheduled = True
            self._loop.call_soon_threadsafe(self._flush_notifications)

    def _next_batch(self) -> list[Turn]:
        """Up to max_batch runnable turns (lock held); the rest go first next time."""
        limit = self.config.max_batch
        batch = [t for t in self._turns if t.runnable][:limit]
        if len(batch) == limit:
            self._turns.rotate(-limit)
        return batch

    def _decode_loop(self, name: str) -> None:
        """The decode thread: one decode call after another while a turn can run."""
        name_os_thread(name)
        if self.config.decode_nice:
            try:  # per thread on Linux: the event loop and the prefill thread go first on a shared core
                tid = threading.get_native_id()
                os.setpriority(
                    os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.config.decode_nice)
                )
            except OSError as error:
                log.warning("could not lower the decode thread's priority: %s", error)
        while True:
            with self.lock:
                while not self._stopping and not (batch := self._next_batch()):
                    self._current_batch.set(0)
                    self.lock.wait()
                if self._stopping:
                    return
            try:
                self._step(batch)
            except Exception as error:  # a bug: end these turns, keep serving the others
                log.exception("model step failed for %d sessions", len(batch))
                with self.lock:
                    self._end([t for t in batch if t.end is None], RowFailure(MODEL_FAILED, ENGINE, None, 0, error))

    def _prefill_loop(self, name: str) -> None:
        """The prefill thread: the posted jobs in order (prompt reads, turns joining, Steps), without waiting for a
        decode call in flight."""
        name_os_thread(name)
        while True:
            with self._admit:
                while not self._stopping and not self._jobs:
                    self._admit.wait()
                if self._stopping:
                    return
                jobs, self._jobs = self._jobs, []
            self._run_jobs(jobs)

    def _run_jobs(self, jobs: list[Callable[[], None] | PromptJob]) -> None:
        """Run ``jobs`` in order; consecutive prompt jobs (turns joining, reads) together, up to ``max_batch``."""
        together: list[PromptJob] = []
        for job in jobs:
            prompt = isinstance(job, PromptJob)
            if prompt:
                together.append(job)
            if together and (not prompt or len(together) == self.config.max_batch):
                self._read_together(together)
                together = []
            if not prompt:
                job()
        if together:
            self._read_together(together)

    def _end(self, turns: list[Turn], failure: RowFailure | None = None) -> None:
        """After ``turns`` changed (lock held): fail them with ``failure`` if given; give the slots of those that
        ended back, take them out of the running turns, and wake their readers."""
        for turn in turns:
            if failure is not None:
                turn.fail(failure)
            if turn.end is not None:
                self.slots.give_back(turn.slot)
        if any(t.end is not None for t in self._turns):
            self._turns = collections.deque(t for t in self._turns if t.end is None)
        self._notify(turns)

    # -- prefill thread: prompts ------------------------------------------------------

    def _read_together(self, jobs: list[PromptJob]) -> None:
        """Prompt jobs taken together: their prompts read in shared calls (``read_prompts``), then each finished: a
        turn's first character drawn, a read's state written."""
        now = time.perf_counter()
        live: list[PromptJob] = []
        for job in jobs:
            if isinstance(job, PromptRead):
                if job.future.set_running_or_notify_cancel():  # its caller may have gone
                    live.append(job)
                else:
                    self.slots.give_back(job.slot)
                continue
            self._queued.dec()
            job.turn.admit(now)
            self.metrics.queue_wait.labels(self.name).observe(now - job.turn.submitted_at)
            live.append(job)
        reading = [job for job in live if len(job.tokens)]  # a read always has a prompt; a turn may not
        slots = np.fromiter((job.slot for job in reading), np.intp, len(reading))
        h, c = self.slots.gather(slots)
        prompts = [job.tokens for job in reading]
        keep: list[tuple[str, np.ndarray, int, list[tuple[int, PromptState]]]] = []
        results = self._read(prompts, [job.cache for job in reading], h, c, self._prefill_seconds.observe, keep)
        results = iter(results)
        for job in live:
            read = next(results) if len(job.tokens) else None
            if isinstance(job, Admission):
                self._begin(job.turn, job.tokens, read)
            elif isinstance(read, RowFailure):
                self.slots.give_back(job.slot)
                job.future.set_exception(RowFailed(read))
            else:
                self.slots.scatter(np.array([job.slot]), read.h, read.c, read.logits)
                self.slots.give_back(job.slot)
                job.future.set_result(None)
        self._keep(keep)  # after the turns began: never before their first character

    def _read(
        self,
        prompts: list[np.ndarray],
        uses: list[CacheUse | None],
        h: np.ndarray,
        c: np.ndarray,
        observe: Callable[[float], None],
        keep: list[tuple[str, np.ndarray, int, list[tuple[int, PromptState]]]],
    ) -> list[PromptState | RowFailure]:
        """``read_prompts`` from ``h``, ``c`` [layers x directions, n, hidden], counted; a row with a ``CacheUse``
        (a fresh state) starts from the longest cached prefix of its prompt instead, and what it should leave in
        the cache is added to ``keep`` (for ``_keep``)."""
        starts = [0] * len(prompts)
        diverged = [0] * len(prompts)
        done: dict[int, PromptState] = {}
        lookups = hits = saved = 0
        for r, use in enumerate(uses):
            if use is None:
                continue
            use.started = time.perf_counter()
            found, state, diverged[r] = self.cache.lookup(use.scope, prompts[r])
            use.saved, use.ended = found, time.perf_counter()
            lookups, hits, saved, starts[r] = lookups + 1, hits + (found > 0), saved + found, found
            if state is not None and found == len(prompts[r]):
                done[r] = PromptState(*state)
            elif state is not None:
                h[:, r], c[:, r] = state.h[:, 0], state.c[:, 0]
        if lookups:
            for metric, count in zip(self._cache_metrics[:3], (lookups, hits, saved), strict=True):
                metric.inc(count)
        todo = [r for r in range(len(prompts)) if r not in done]
        results: dict[int, PromptState | RowFailure] = dict(done)
        if todo:
            rest = [prompts[r][starts[r] :] for r in todo]
            cuts = [
                [p - starts[r] for p in self.cache.cuts(starts[r], len(prompts[r]), diverged[r])[:-1]]
                if uses[r]
                else []
                for r in todo
            ]
            read, kept = read_prompts(self.backend, h[:, todo], c[:, todo], self.slots.vocab_size, rest, observe, cuts)
            results.update(zip(todo, read, strict=True))
            self._prompt_chars.inc(sum(len(p) for p, out in zip(rest, read, strict=True) if isinstance(out, tuple)))
            for r, out, states in zip(todo, read, kept, strict=True):
                if uses[r] is not None and isinstance(out, PromptState):
                    states = [*states, (len(prompts[r]) - starts[r], out)]
                    keep.append((uses[r].scope, prompts[r], starts[r], states))
                    if uses[r].publish:
                        uses[r].read = self._published(starts[r], len(prompts[r]), states)
        return [results[r] for r in range(len(prompts))]

    def _keep(self, keep: list[tuple[str, np.ndarray, int, list[tuple[int, PromptState]]]]) -> None:
        """Write the checkpoints of the reads just done into the prefix cache (each: its scope, its prompt, where
        the read started, and its states by position from there), then publish the cache's size."""
        for scope, prompt, start, states in keep:
            for position, state in states:
                if all_finite(*state):
                    self.cache.insert(scope, prompt[: start + position], CachedState(*state))
        if keep:
            self._cache_sizes()

    def _published(self, start: int, end: int, states: list[tuple[int, PromptState]]) -> list[tuple[int, CachedState]]:
        """Of a read's states (by position from ``start``), those a second level keeps: at the stride's multiples
        and at the end (``end``), where a lookup that knows only the text looks."""
        stride = self.cache.stride
        return [
            (start + p, CachedState(*state))
            for p, state in states
            if start + p == end or (stride and (start + p) % stride == 0)
        ]

    def _cache_sizes(self) -> None:
        """Publish the prefix cache's bytes, entries and evictions (prefill thread)."""
        self._cache_metrics[3].set(self.cache.bytes)
        self._cache_metrics[4].set(len(self.cache))
        self._cache_metrics[5].inc(self.cache.evictions - self._evicted)
        self._evicted = self.cache.evictions

    def _begin(self, turn: Turn, tokens: np.ndarray, read: PromptState | RowFailure | None) -> None:
        """Draw a turn's first character after its prompt (``read``: its state after the prompt, None without
        one), write its state, and add it to the running turns; or end it with its failure. Nothing is written
        until the prompt is read and the first character drawn."""
        position = turn.tokens_seen + len(tokens)
        failure = replace(read, kept=turn.tokens_seen) if isinstance(read, RowFailure) else None
        token = None
        if failure is None and not turn.cancelled and turn.sampling.max_tokens > 0:
            logits = read.logits if read is not None else self.slots.logits[[turn.slot]]  # [1, vocab]
            try:
                token = draw_first(self.decoder, turn.sampling, logits, position)
            except Exception as error:
                failure = RowFailure(MODEL_FAILED, SAMPLE, turn.tokens_seen, len(tokens), error)
        if failure is not None:
            self._count(failure, turn)
            with self.lock:
                self._end([turn], failure)
            return
        if read is not None:
            self.slots.scatter(np.array([turn.slot]), read.h, read.c, read.logits)
        with self.lock:
            turn.begin(position, token, self.codec.vocab[token] if token is not None else "")
            if token is not None:  # from here on the decode thread runs it
                self._turns.append(turn)
                self._joined = True
                self._tokens.inc()
                self.lock.notify()
            self._end([turn])

    def _count(self, failure: RowFailure, turn: Turn) -> None:
        """Count and log a row's failure (the layers above word it for the caller)."""
        self.metrics.row_failures.labels(self.name, "non_finite" if failure.cause is None else "exception").inc()
        log.error("row failed: %s in %s", failure.kind, failure.phase, exc_info=failure.cause, extra=turn.log_fields)

    def _fresh_step(self, tokens: np.ndarray, use: CacheUse):
        """A Step call's (last logits [vocab], h, c) after ``tokens`` from a fresh state, through the prefix cache."""
        layers, _, hidden = self.slots.slot_shape
        h, c = np.zeros((layers, 1, hidden), np.float32), np.zeros((layers, 1, hidden), np.float32)
        keep: list[tuple[str, np.ndarray, int, list[tuple[int, PromptState]]]] = []
        (read,) = self._read([tokens], [use], h, c, self._step_seconds.observe, keep)
        if isinstance(read, RowFailure):
            raise RowFailed(replace(read, phase=STEP, chars=len(tokens))) from read.cause
        self._keep(keep)
        return read.logits[0], read.h, read.c

    def _explicit(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray):
        """A Step call's (last logits [vocab], h, c) after one sequence ``tokens``, timed."""
        started = time.perf_counter()
        try:
            logits, h, c = self.backend.run({"tokens": tokens[None, :], "h0": h, "c0": c})
        except Exception as error:
            raise RowFailed(RowFailure(MODEL_FAILED, STEP, None, len(tokens), error)) from error
        self._step_seconds.observe(time.perf_counter() - started)
        self._prompt_chars.inc(len(tokens))
        logits = logits[:, -1]
        if not all_finite(h, c, logits):
            raise RowFailed(RowFailure(NON_FINITE, STEP, None, len(tokens)))
        return logits[0], h, c

    # -- decode thread: one decode call ---------------------------------------------

    def _step(self, batch: list[Turn]) -> None:
        """One decode call for ``batch``: plan, execute, apply."""
        started = time.perf_counter()
        self._current_batch.set(len(batch))
        with self.lock:  # a cancellation arriving after this is handled at the next call
            if self._joined:
                self.sizer.joined()
                self._joined = False
            k, budget = self.sizer.next(len(batch))
            step = plan(batch, k, budget, self.config.stream_buffer_chars)
        outputs = execute(self.decoder, self.slots, step, self._decode_seconds.observe)
        self._apply(step, outputs)
        if step.k == step.budget:
            self.sizer.measured(len(batch), step.budget, time.perf_counter() - started)

    def _apply(self, step: StepPlan, outputs: StepOutputs) -> None:
        """Write the new state of the rows that ran, hand each its characters, end the turns that are complete. A
        row whose stop string ended before its last character read is run again (``_rerun``)."""
        rows, out, failures = outputs.rows, outputs.out, outputs.failures
        sent: dict[int, Send] = {}
        if out is not None:
            sent, rerun = sends(step, outputs, self._vocab)
            keep = np.ones(len(rows), bool)
            keep[rerun] = False
            self.slots.scatter(step.slots[rows[keep]], out.h[:, keep], out.c[:, keep], out.logits[keep])
            if rerun:
                self._rerun(step, outputs.inputs, rows[rerun], sent, failures)
        for i, failure in failures.items():
            self._count(failure, step.turns[i])
        delivered = 0
        with self.lock:
            for i in rows.tolist():
                step.turns[i].ran()
                if i not in failures:
                    text, reason, pending = sent[i]
                    step.turns[i].deliver(text, reason, pending)
                    delivered += len(text)
            for i, failure in failures.items():
                step.turns[i].fail(failure)
            self._end(step.turns)
        self._batch_size.observe(len(step.turns))
        self._tokens.inc(delivered)

    def _rerun(
        self,
        step: StepPlan,
        inputs: DecodeInputs,
        rows: np.ndarray,
        sends: dict[int, Send],
        failures: dict[int, RowFailure],
    ) -> None:
        """Rows whose stop string ended before their last character read: run again alone from their state before
        the call, reading exactly their pending character and the characters sent (the same draws draw the same
        characters), and keep that state."""
        again = inputs.rows(rows)
        again.steps[:] = [len(sends[i][0]) + 1 for i in rows.tolist()]
        try:
            out = self.decoder.decode(again)
            error = None if all_finite(out.h, out.c, out.logits) else "non-finite"
        except Exception as raised:  # the same computation just ran: not expected
            error = raised
        if error is None:
            self.slots.scatter(step.slots[rows], out.h, out.c, out.logits)
            return
        for i in rows.tolist():
            kept = step.turns[i].tokens_seen - 1
            failures[i] = (
                RowFailure(NON_FINITE, DECODE, kept)
                if isinstance(error, str)
                else RowFailure(MODEL_FAILED, DECODE, kept, 0, error)
            )
