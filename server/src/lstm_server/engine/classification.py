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
from collections.abc import Callable
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


def split_by_length(
    lengths: list[int], step_overhead: float = STEP_OVERHEAD_ROWS, call_overhead: float = CALL_OVERHEAD
) -> list[int]:
    """The calls that cover texts of ascending token ``lengths`` in the least model time by the cost model above:
    the end of each (exclusive; the last is ``len(lengths)``). Exact: dynamic programming over the runs of equal
    lengths (cutting one never pays); a few dozen microseconds for 64 texts."""
    n = len(lengths)
    starts = [0]  # where a call may start: 0 and the end of each run of equal lengths so far
    least = [0.0]  # the least cost of the texts before each start
    cut = [0]  # for each start, where the last call before it starts
    for end in range(1, n + 1):
        if end < n and lengths[end] == lengths[end - 1]:
            continue
        steps = lengths[end - 1]
        cost, k = min((least[k] + steps * (end - start + step_overhead), k) for k, start in enumerate(starts))
        starts.append(end)
        least.append(cost + call_overhead)
        cut.append(k)
    ends = []
    k = len(starts) - 1
    while k:
        ends.append(starts[k])
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
    ) -> None:
        self.name = name
        self.backend = backend
        self.tokenizer = tokenizer
        self.labels = labels
        self.state_shape = state_shape
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000
        self._queue_wait = metrics.queue_wait.labels(name)
        self._batch_size = metrics.batch_size.labels(name)
        self._queued = metrics.queue_depth.labels(name)
        self._call_seconds = metrics.model_call.labels(name, "classify")
        self._prompt_chars = metrics.prompt_characters.labels(name)
        self.unk_id = tokenizer.token_to_id("[UNK]")
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"model-{name}", initializer=name_os_thread, initargs=(f"model-{name}",)
        )
        self._queue: list[tuple[list[int], asyncio.Future, float]] = []
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
            self._queue.append((self.encode(text), future, time.perf_counter()))
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

    def _logits(self, batch: list[list[int]]) -> np.ndarray:
        lengths = np.array([len(ids) for ids in batch], np.int64)
        tokens = np.full((len(batch), int(lengths.max())), self.pad_id, np.int64)
        for row, ids in enumerate(batch):
            tokens[row, : len(ids)] = ids
        layers, hidden = self.state_shape
        zeros = np.zeros((layers, len(batch), hidden), np.float32)
        started = time.perf_counter()
        logits, _, _ = self.backend.run({"tokens": tokens, "lengths": lengths, "h0": zeros, "c0": zeros})
        self._call_seconds.observe(time.perf_counter() - started)
        return logits

    def classify_encoded(self, batch: list[list[int]]) -> list[np.ndarray | ServiceError]:
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
                for end in split_by_length([len(ids) for ids, _, _ in chunk]):
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
