"""Classify's memory is bounded per model call and given back (issue 20): no call holds more than the engine's
``max_call_tokens`` (rows x padded length; a longer text alone), results stay bitwise what each text gets alone,
the runtime's arena is shrunk once the batcher is idle after a large call, and the limits are bounded."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from lstm_server.config import MAX_CLASSIFY_REQUEST_CHARS, ConfigError, ServerConfig, load_config
from lstm_server.engine import classification
from lstm_server.engine.classification import MAX_CALL_TOKENS, ClassifierEngine, split_by_length
from lstm_server.metrics import Metrics
from lstm_server.runtime.backends import OnnxBackend
from lstm_server.runtime.model_repository import load_latest

from .test_classify_batching import SumModel, Words, probabilities

MODELS = Path(__file__).resolve().parents[2] / "models"


def calls_of(lengths: list[int], ends: list[int]) -> list[list[int]]:
    begins = [0, *ends[:-1]]
    return [lengths[begin:end] for begin, end in zip(begins, ends, strict=True)]


def test_split_by_length_keeps_every_call_within_max_tokens() -> None:
    rng = random.Random(0)
    for _ in range(500):
        lengths = sorted(rng.choice([rng.randint(1, 40), rng.randint(1, 400)]) for _ in range(rng.randint(1, 64)))
        budget = rng.choice([1, 50, 256, 1000, 4096])
        ends = split_by_length(lengths, max_tokens=budget)
        assert ends[-1] == len(lengths) and ends == sorted(set(ends)), (lengths, budget, ends)
        for call in calls_of(lengths, ends):
            assert len(call) * max(call) <= budget or len(call) == 1, (lengths, budget, ends)
        if len(lengths) * lengths[-1] <= budget:  # a budget that does not bind changes nothing
            assert ends == split_by_length(lengths)
    assert split_by_length([4096] * 64, max_tokens=16384) == list(range(4, 65, 4))  # 16 calls of 4
    assert split_by_length([843] * 64, max_tokens=16384) == [16, 32, 48, 64]  # rows shared out evenly
    assert split_by_length([10, 20, 30000], max_tokens=16384) == [2, 3]  # a text over the budget runs alone


class ArenaModel(SumModel):
    """The stand-in model, with ``run_releasing`` (as OnnxBackend has) recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.released: list[tuple[int, int]] = []

    def run_releasing(self, inputs):
        self.released.append(inputs["tokens"].shape)
        return self.run(inputs)


def test_calls_hold_at_most_max_call_tokens_and_the_memory_is_given_back_once_idle(monkeypatch) -> None:
    monkeypatch.setattr(classification, "RELEASE_IDLE_S", 0.05)
    monkeypatch.setattr(classification, "RELEASE_OVER_TOKENS", 100)
    texts = [" ".join(["w"] * n) for n in (3, 90, 7, 60, 60, 200, 1, 45)] * 4  # 32 texts, 1 to 200 tokens
    model = ArenaModel()

    async def scenario():
        batcher = ClassifierEngine("fake", model, Words(), ["a", "b"], (1, 4), 0, 64, 50.0, Metrics(), 250)
        batcher.start()
        try:
            small = await batcher.classify(["a b c"])
            await asyncio.sleep(0.2)
            assert model.released == []  # a small call keeps its memory
            results = await batcher.classify(texts)
            calls_after_batch = len(model.calls)
            for _ in range(100):
                if model.released:
                    break
                await asyncio.sleep(0.02)
            return small, results, calls_after_batch
        finally:
            await batcher.stop()

    (small,), results, calls_after_batch = asyncio.run(scenario())
    assert np.array_equal(small, probabilities("a b c"))
    assert all(np.array_equal(r, probabilities(t)) for r, t in zip(results, texts, strict=True))
    batch_calls = model.calls[1:calls_after_batch]
    assert sum(rows for rows, _ in batch_calls) == len(texts)
    assert all(rows * length <= 250 or rows == 1 for rows, length in batch_calls), batch_calls
    assert model.released == [(1, 1)]  # one call of one token, once idle


def status_kb(key: str) -> int:
    lines = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in lines if line.startswith(key + ":"))


def test_a_large_request_leaves_the_memory_where_it_was(monkeypatch) -> None:
    """The shipped sentiment entry on onnxruntime: 16 texts of 400 to 1,000 tokens in one call of 16,000 tokens
    peaked ~400 MB over the idle RSS and kept it for good; in calls of 4,096 tokens the peak is ~100 MB and ~5 MB
    stays once the arena is shrunk. Each text's probabilities are bitwise those it gets alone."""
    monkeypatch.setattr(classification, "RELEASE_IDLE_S", 0.05)
    entry = load_latest(MODELS, "sentiment")
    layers = entry.num_layers * entry.num_directions
    tokenizer = Tokenizer.from_str(entry.tokenizer_json())
    backend = OnnxBackend(entry, "cpu", 1)
    args = (entry.labels, (layers, entry.hidden_size), entry.manifest.get("pad_id", 0), 64, 5.0, Metrics(), 4096)
    engine = ClassifierEngine(entry.name, backend, tokenizer, *args)
    texts = [". " * (400 + 40 * i) + "a gorgeous film" for i in range(16)]  # 403 to 1003 tokens

    async def scenario():
        engine.start()
        try:
            await engine.classify(["warm up"])
            await asyncio.sleep(0.2)
            before = status_kb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
            results = await engine.classify(texts)
            peak = status_kb("VmHWM")
            deadline = time.monotonic() + 5
            while status_kb("VmRSS") - before > 64 * 1024 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return before, peak, status_kb("VmRSS"), results
        finally:
            await engine.stop()

    before, peak, settled, results = asyncio.run(scenario())
    grew, kept = (peak - before) / 1024, (settled - before) / 1024
    assert grew < 250, f"the request's peak was {grew:.0f} MB over the idle RSS (one call of 16,000 tokens: ~400)"
    assert kept < 64, f"{kept:.0f} MB still held after the request (the arena kept what the calls took)"
    for text, result in zip(texts, results, strict=True):
        (alone,) = engine.classify_encoded([engine.encode(text)])
        assert np.array_equal(result, alone)


def test_the_classify_limits_are_bounded() -> None:
    assert MAX_CALL_TOKENS >= 4 * ServerConfig().max_classify_chars  # a text of the default limit fits one call
    with pytest.raises(ConfigError, match="--max-classify-chars: must be a number from 1 to 8192, got 100000000"):
        load_config(["--max-classify-chars", "100000000"], {})
    with pytest.raises(ConfigError, match="--max-classify-texts: must be a number from 1 to 4096, got 5000"):
        load_config(["--max-classify-texts", "5000"], {})
    with pytest.raises(ConfigError, match="a request of 1024 texts of 8192 characters is 8388608 characters"):
        load_config(["--max-classify-texts", "1024", "--max-classify-chars", "8192"], {})
    assert load_config(["--max-classify-texts", "512", "--max-classify-chars", "8192"], {}).max_classify_texts == 512
    assert ServerConfig().max_classify_texts * ServerConfig().max_classify_chars <= MAX_CLASSIFY_REQUEST_CHARS
