"""The classifier's batcher with a stand-in model: calls cut by length, results in order and as soon as ready."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading

import numpy as np

from lstm_server.engine.classification import (
    CALL_OVERHEAD,
    STEP_OVERHEAD_ROWS,
    ClassifierEngine,
    split_by_length,
)
from lstm_server.metrics import Metrics


def cost(lengths: list[int], ends: list[int]) -> float:
    total, begin = 0.0, 0
    for end in ends:
        total += lengths[end - 1] * (end - begin + STEP_OVERHEAD_ROWS) + CALL_OVERHEAD
        begin = end
    return total


def test_split_by_length_takes_the_cheapest_cuts() -> None:
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 10)
        top = rng.choice([4, 16, 80])
        lengths = sorted(rng.randint(1, top) for _ in range(n))
        ends = split_by_length(lengths)
        assert ends[-1] == n and ends == sorted(set(ends))
        assert all(lengths[end - 1] != lengths[end] for end in ends[:-1])  # never inside a run of equal lengths
        every = ([*cuts, n] for k in range(n) for cuts in itertools.combinations(range(1, n), k))  # brute force
        assert cost(lengths, ends) == min(cost(lengths, e) for e in every), lengths


def test_split_by_length_keeps_similar_texts_together() -> None:
    assert split_by_length([7]) == [1]
    assert split_by_length([5, 6, 6, 7, 8, 9, 10]) == [7]
    assert split_by_length([2] * 20 + [40] * 20) == [20, 40]
    assert split_by_length([1, 5, 10, 11, 17]) == [5]  # tests/server/test_invariance_served.py's padded batch


class Words:
    """A stand-in tokenizer: one id per word (its length), [UNK] is 1."""

    class Encoding:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

    def token_to_id(self, token: str) -> int:
        return 1

    def encode(self, text: str) -> Encoding:
        return self.Encoding([len(word) + 1 for word in text.split()])


class SumModel:
    """Logits (sum of the row's ids, length); blocks a call longer than ``block_over`` tokens until ``release``."""

    name, device = "fake", "cpu"

    def __init__(self, block_over: int = 10**9) -> None:
        self.calls: list[tuple[int, int]] = []  # (rows, padded length)
        self.block_over = block_over
        self.release = threading.Event()

    def run(self, inputs):
        tokens, lengths = inputs["tokens"], inputs["lengths"]
        self.calls.append(tokens.shape)
        if tokens.shape[1] > self.block_over:
            assert self.release.wait(10)
        mask = np.arange(tokens.shape[1]) < lengths[:, None]
        logits = np.stack([(tokens * mask).sum(axis=1), lengths], axis=1).astype(np.float32)
        return logits, inputs["h0"], inputs["c0"]


def engine(model: SumModel, max_batch: int = 64) -> ClassifierEngine:
    return ClassifierEngine("fake", model, Words(), ["a", "b"], (1, 4), 0, max_batch, 50.0, Metrics())


def probabilities(text: str) -> np.ndarray:
    ids = Words().encode(text).ids or [1]
    logits = np.array([sum(ids), len(ids)], np.float64)
    exp = np.exp(logits - logits.max())
    return (exp / exp.sum()).astype(np.float32)


def test_short_and_long_texts_run_in_calls_of_their_own() -> None:
    short = [f"w{i} x" for i in range(12)]  # 2 tokens
    long = [" ".join(f"word{i}" for i in range(40 + k)) for k in range(12)]  # 40-51 tokens
    texts = [t for pair in zip(long, short, strict=True) for t in pair]
    model = SumModel()

    async def scenario():
        batcher = engine(model)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.classify([t]) for t in texts), batcher.classify(texts))
        finally:
            await batcher.stop()

    *alone, together = asyncio.run(scenario())
    assert model.calls == [(24, 2), (24, 51)]  # the short texts padded to 2, not to 51
    for text, (one,), row in zip(texts, alone, together, strict=True):
        assert np.array_equal(one, probabilities(text)) and np.array_equal(row, probabilities(text))


def test_calls_hold_at_most_max_batch_texts() -> None:
    texts = [" ".join(["w"] * (1 + i % 5)) for i in range(23)]
    model = SumModel()

    async def scenario():
        batcher = engine(model, max_batch=8)
        batcher.start()
        try:
            return await batcher.classify(texts)
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert sum(rows for rows, _ in model.calls) == 23 and max(rows for rows, _ in model.calls) <= 8
    assert all(np.array_equal(r, probabilities(t)) for r, t in zip(results, texts, strict=True))


def test_a_short_call_answers_its_callers_while_a_long_one_runs() -> None:
    model = SumModel(block_over=10)

    async def scenario():
        batcher = engine(model)
        batcher.start()
        try:
            short = [asyncio.ensure_future(batcher.classify([f"short {i}"])) for i in range(4)]
            long = [asyncio.ensure_future(batcher.classify([" ".join(["w"] * (30 + i))])) for i in range(4)]
            await asyncio.wait_for(asyncio.gather(*short), 10)  # the long call is still blocked in the model
            assert not any(f.done() for f in long)
            model.release.set()
            return await asyncio.wait_for(asyncio.gather(*long), 10)
        finally:
            model.release.set()
            await batcher.stop()

    asyncio.run(scenario())
    assert model.calls == [(4, 2), (4, 33)]
