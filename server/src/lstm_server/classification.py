"""Dynamic batching for one classifier: requests from many clients share model calls.

Texts wait at most ``max_delay_ms`` (or until ``max_batch`` are queued), are
sorted by token count so each call pads little, and run in calls of at most
``max_batch`` texts on the model's worker thread. Padding never changes a
result: the model reads ``lengths`` (see the export's verification).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backends import Backend
from .metrics import Metrics
from .sampling import softmax


class ClassifierEngine:
    def __init__(
        self,
        name: str,
        backend: Backend,
        tokenizer,
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
        self.unk_id = tokenizer.token_to_id("[UNK]")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
        self._queue: list[tuple[list[int], asyncio.Future, float]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

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
        self._wake.set()
        return list(await asyncio.gather(*futures))

    def _run(self, batch: list[list[int]]) -> np.ndarray:
        lengths = np.array([len(ids) for ids in batch], np.int64)
        tokens = np.full((len(batch), int(lengths.max())), self.pad_id, np.int64)
        for row, ids in enumerate(batch):
            tokens[row, : len(ids)] = ids
        layers, hidden = self.state_shape
        zeros = np.zeros((layers, len(batch), hidden), np.float32)
        logits, _, _ = self.backend.run({"tokens": tokens, "lengths": lengths, "h0": zeros, "c0": zeros})
        return softmax(logits)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            oldest = self._queue[0][2]
            wait = self.max_delay - (time.perf_counter() - oldest)
            if len(self._queue) < self.max_batch and wait > 0:
                await asyncio.sleep(wait)
            taken, self._queue = self._queue, []
            taken.sort(key=lambda item: len(item[0]))
            now = time.perf_counter()
            for _, _, queued_at in taken:
                self._queue_wait.observe(now - queued_at)
            for start in range(0, len(taken), self.max_batch):
                chunk = [item for item in taken[start : start + self.max_batch] if not item[1].done()]
                if not chunk:
                    continue
                self._batch_size.observe(len(chunk))
                try:
                    probabilities = await loop.run_in_executor(self._executor, self._run, [ids for ids, _, _ in chunk])
                except Exception as error:  # the model failed: every waiting caller gets the error
                    for _, future, _ in chunk:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, future, _), row in zip(chunk, probabilities, strict=True):
                    if not future.done():
                        future.set_result(row)
