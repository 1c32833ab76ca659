"""Dynamic batching for one classifier: requests from many clients share model calls.

Texts wait at most ``max_delay_ms`` (or until ``max_batch`` are queued), are
sorted by token count, and run in calls of at most ``max_batch`` texts on the
model's worker thread. A call steps all its rows as many times as its longest
text has tokens, so the sorted texts are cut where padding the shorter ones
would cost more than another call (``split_by_length``): texts of 3 and 40
tokens do not share a call. A batch's calls are queued on the worker together
(it does not wait for the event loop between them), and the callers of each
call get their results as soon as it ends. Padding never changes a result: the
model reads ``lengths`` (see the export's verification).

Memory is bounded per call, not per request. A call holds at most
``max_call_tokens`` tokens (rows times the padded length; a text longer than
that runs alone): onnxruntime's arena takes about 32 KB per token of a call at
its peak and keeps it, so one call of 64 texts of 4,096 tokens used to take
8 GB for good. Once a call over ``RELEASE_OVER_TOKENS`` has run, the arena
hands back what no tensor holds (``release_memory``) after ``RELEASE_IDLE_S``
without a text queued, so a large request leaves the server's RSS near where it
was; the short calls of everyday traffic keep their memory from call to call.
Queued texts wait as arrays of int32 token ids (4 bytes a token).

Faults stay with their text. When a call raises, its texts are run again in
halves, down to single texts (``faults.contain``), so only a text that
fails alone gets the error (INTERNAL); the others get exactly the
probabilities they get alone, since a row does not depend on its batch. A text
whose logits are not all finite fails alone too (INTERNAL). A caller's error
names the text: ``texts[i]: ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from .. import tracing
from ..errors import ServiceError, Status
from ..metrics import Metrics
from ..runtime.backends import Backend
from .faults import contain
from .sampling import softmax
from .threads import name_os_thread

log = logging.getLogger(__name__)
B = TypeVar("B", bound=Backend)

# The model time of a call over texts sorted by length, in units of one row's step: the classifier's graph steps
# every row of a call as many times as its longest text has tokens, and each step and each call cost something of
# their own, so a call costs ``longest * (rows + STEP_OVERHEAD_ROWS) + CALL_OVERHEAD``. Measured on the sentiment
# entries (onnxruntime on the CPU, int8 and fp32, batches of 1 to 64 texts of 10 to 50 tokens): a step costs what
# about 3 more rows would; the savings change little with the call overhead from 5 to 64 (bench/RESULTS.md, the
# classifier's batching).
STEP_OVERHEAD_ROWS = 4
CALL_OVERHEAD = 32
# The most tokens (rows x padded length) of one call: about 260 MB of tensors at the peak of such a call, and 512 MB
# of onnxruntime's arena (it grows by powers of two); a text of 4,096 characters has at most 16,384 tokens (NFKC
# makes 4 tokens of some characters: U+2A0C is four integral signs), so the default max_classify_chars fits one call.
# Texts of everyday length (64 x 200 tokens) never meet it; 256 texts of 4,096 tokens, in calls of 4, took 56-67 s
# against 98 s in calls of 64 (whose arena growth cost more than the smaller calls): bench/results/2026-12-06-
# classify-memory.md.
MAX_CALL_TOKENS = 16_384
# Once a call of more than this many tokens (about 64 MB of arena) has run, the arena's free memory is given back
# after RELEASE_IDLE_S seconds without a text queued: steady traffic keeps its memory from call to call (allocating
# it again costs page faults: a release after every call made calls of 64 x 200 tokens up to 2x slower in a probe),
# and everyday calls (64 texts of up to 32 tokens) never ask for it.
RELEASE_OVER_TOKENS = 2_048
RELEASE_IDLE_S = 1.0


def split_by_length(
    lengths: list[int],
    step_overhead: float = STEP_OVERHEAD_ROWS,
    call_overhead: float = CALL_OVERHEAD,
    max_tokens: int | None = None,
) -> list[int]:
    """The calls that cover texts of ascending token ``lengths`` in the least model time by the cost model above:
    the end of each (exclusive; the last is ``len(lengths)``). Exact: dynamic programming over the runs of equal
    lengths (cutting one never pays); a few dozen microseconds for 64 texts.

    ``max_tokens``: no call holds more than this many tokens, its rows times its longest text (a text longer than
    that has a call of its own). Each group of texts the dynamic programming considers is then costed as the
    fewest calls that fit, rows shared out evenly (cut inside a run of equal lengths where need be), each call
    padded to the group's longest text; the groups chosen are the least costly so (near the least model time, no
    longer exact: a call of the group's shorter texts is padded less than costed)."""
    n = len(lengths)

    def calls(rows: int, steps: int) -> int:  # calls needed for ``rows`` texts of at most ``steps`` tokens
        return 1 if max_tokens is None else -(-rows // max(1, max_tokens // max(steps, 1)))

    starts = [0]  # where a call may start: 0 and the end of each run of equal lengths so far
    least = [0.0]  # the least cost of the texts before each start
    cut = [0]  # for each start, where the last group before it starts
    for end in range(1, n + 1):
        if end < n and lengths[end] == lengths[end - 1]:
            continue
        steps = lengths[end - 1]
        cost, k = min(
            (least[k] + steps * (end - start) + calls(end - start, steps) * (steps * step_overhead + call_overhead), k)
            for k, start in enumerate(starts)
        )
        starts.append(end)
        least.append(cost)
        cut.append(k)
    ends = []
    k = len(starts) - 1
    while k:
        start, end = starts[cut[k]], starts[k]
        pieces = calls(end - start, lengths[end - 1])
        ends += [start + (end - start) * piece // pieces for piece in range(pieces, 0, -1)]
        k = cut[k]
    return ends[::-1]


class ClassifierEngine:
    """The batcher and backend of one classifier."""

    def __init__(
        self,
        name: str,
        backend: Backend,
        tokenizer: Any,  # a tokenizers.Tokenizer
        labels: list[str],
        state_shape: tuple[int, int],
        pad_id: int,
        max_batch: int,
        max_delay_ms: float,
        metrics: Metrics,
        max_call_tokens: int = MAX_CALL_TOKENS,
    ) -> None:
        self.name = name
        self.backend = backend
        self.tokenizer = tokenizer
        self.labels = labels
        self.state_shape = state_shape
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000
        self.max_call_tokens = max_call_tokens
        self._largest_call = 0  # tokens of the largest call since the arena last gave its memory back
        self._queue_wait = metrics.queue_wait.labels(name)
        self._batch_size = metrics.batch_size.labels(name)
        self._queued = metrics.queue_depth.labels(name)
        self._call_seconds = metrics.model_call.labels(name, "classify")
        self._prompt_chars = metrics.prompt_characters.labels(name)
        self.unk_id = tokenizer.token_to_id("[UNK]")
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"model-{name}", initializer=name_os_thread, initargs=(f"model-{name}",)
        )
        self._queue: list[tuple[np.ndarray, asyncio.Future, float]] = []
        self._wake = asyncio.Event()
        self._full = asyncio.Event()  # max_batch texts are queued: stop waiting for more
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def wrap_backend(self, wrap: Callable[[Backend], B]) -> B:
        """Run the model through ``wrap(current backend)`` from the next call on (fault injection in tests, or
        instrumentation); returns the wrapper."""
        self.backend = wrapped = wrap(self.backend)
        return wrapped

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids or [self.unk_id]

    async def classify(self, texts: list[str]) -> list[np.ndarray]:
        """Label probabilities for each text, in order."""
        loop = asyncio.get_running_loop()
        futures = []
        for text in texts:
            future = loop.create_future()
            self._queue.append((np.array(self.encode(text), np.int32), future, time.perf_counter()))
            futures.append(future)
        self._queued.inc(len(texts))
        self._prompt_chars.inc(sum(map(len, texts)))
        self._wake.set()
        if len(self._queue) >= self.max_batch:
            self._full.set()
        with tracing.span("lstm.classify", {"lstm.texts": len(texts)}):
            results = await asyncio.gather(*futures, return_exceptions=True)
        for i, result in enumerate(results):
            if isinstance(result, ServiceError):
                raise ServiceError(
                    result.code, f"texts[{i}]: {result.message}", reason=result.reason, field=f"texts[{i}]"
                ) from result
            if isinstance(result, BaseException):
                raise result
        return results

    def _logits(self, batch: list[Sequence[int]]) -> np.ndarray:
        lengths = np.array([len(ids) for ids in batch], np.int64)
        tokens = np.full((len(batch), int(lengths.max())), self.pad_id, np.int64)
        self._largest_call = max(self._largest_call, tokens.size)
        for row, ids in enumerate(batch):
            tokens[row, : len(ids)] = ids
        layers, hidden = self.state_shape
        zeros = np.zeros((layers, len(batch), hidden), np.float32)
        started = time.perf_counter()
        logits, _, _ = self.backend.run({"tokens": tokens, "lengths": lengths, "h0": zeros, "c0": zeros})
        self._call_seconds.observe(time.perf_counter() - started)
        return logits

    def classify_encoded(self, batch: list[Sequence[int]]) -> list[np.ndarray | ServiceError]:
        """Per text (token ids, as ``encode`` gives them), its label probabilities or the error of the model on
        that text alone: one batch as given, run in the calling thread (the batcher runs it on the model thread;
        tools call it to choose a batch themselves)."""
        parts, raised = contain(len(batch), lambda rows: self._logits([batch[i] for i in rows]), "classifier call")
        results: list[np.ndarray | ServiceError] = [None] * len(batch)  # type: ignore[list-item]
        for i, error in raised.items():
            log.error(
                "classifier %s failed on a text of %d tokens: %s", self.name, len(batch[i]), error, exc_info=error
            )
            results[i] = ServiceError(
                Status.INTERNAL, f"the classifier failed on this text: {error}", reason="MODEL_FAILED"
            )
        for rows, logits in parts:
            probabilities = softmax(logits)
            finite = np.isfinite(logits).all(axis=1)
            for i, ok, row in zip(rows.tolist(), finite.tolist(), probabilities, strict=True):
                results[i] = row
                if not ok:
                    log.error("classifier %s gave non-finite logits for a text of %d tokens", self.name, len(batch[i]))
                    results[i] = ServiceError(
                        Status.INTERNAL,
                        "the classifier's output for this text is not finite (NaN or infinity), so it has no "
                        "probabilities; the same text fails the same way again (the other texts are not affected)",
                        reason="NON_FINITE_OUTPUT",
                    )
        return results

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                if self._largest_call > RELEASE_OVER_TOKENS:  # large calls ran: give their memory back once idle
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), RELEASE_IDLE_S)
                    if not self._queue:
                        try:
                            await loop.run_in_executor(self._executor, self.release_memory)
                        except Exception:  # the next batch runs all the same, on the memory the arena kept
                            log.exception("classifier %s: giving memory back failed", self.name)
                        continue
                await self._wake.wait()
            oldest = self._queue[0][2]
            wait = self.max_delay - (time.perf_counter() - oldest)
            if len(self._queue) < self.max_batch and wait > 0:
                self._full.clear()
                with contextlib.suppress(TimeoutError):  # the delay is over, or max_batch texts are queued
                    await asyncio.wait_for(self._full.wait(), wait)
            taken, self._queue = self._queue, []
            self._queued.dec(len(taken))
            taken.sort(key=lambda item: len(item[0]))
            now = time.perf_counter()
            for _, _, queued_at in taken:
                self._queue_wait.observe(now - queued_at)
            for start in range(0, len(taken), self.max_batch):
                chunk = [item for item in taken[start : start + self.max_batch] if not item[1].done()]
                if not chunk:
                    continue
                calls = []
                begin = 0
                for end in split_by_length([len(ids) for ids, _, _ in chunk], max_tokens=self.max_call_tokens):
                    part, begin = chunk[begin:end], end
                    self._batch_size.observe(len(part))
                    calls.append(
                        (part, loop.run_in_executor(self._executor, self.classify_encoded, [ids for ids, _, _ in part]))
                    )
                try:
                    for part, call in calls:
                        try:
                            results = await call
                        except Exception as error:  # a bug outside the model call: every waiting caller gets the error
                            log.exception("classifier %s: batch failed", self.name)
                            for _, future, _ in part:
                                if not future.done():
                                    future.set_exception(error)
                            continue
                        for (_, future, _), result in zip(part, results, strict=True):
                            if future.done():
                                continue
                            if isinstance(result, ServiceError):
                                future.set_exception(result)
                            else:
                                future.set_result(result)
                finally:
                    for _, call in calls:  # the batcher is stopping: calls not started yet are not made
                        call.cancel()

    def release_memory(self) -> None:
        """Hand back to the system the memory the runtime holds for calls and no tensor uses now (onnxruntime's
        arena keeps what its largest call took, otherwise): one call of one token that shrinks the arena after it.
        A backend without ``run_releasing`` (TorchScript, which frees as it goes, or a wrapper) is left alone."""
        self._largest_call = 0
        run_releasing = getattr(self.backend, "run_releasing", None)
        if run_releasing is None:
            return
        layers, hidden = self.state_shape
        zeros = np.zeros((layers, 1, hidden), np.float32)
        one = {"tokens": np.full((1, 1), self.pad_id, np.int64), "lengths": np.ones(1, np.int64)}
        run_releasing({**one, "h0": zeros, "c0": zeros})
