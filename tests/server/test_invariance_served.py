"""Batch invariance as served, on every shipped entry under models/ (the defaults included).

Sessions generating concurrently (so the server batches them) produce exactly, character for character and bit
for bit in their exported state, what each produces alone, and what stepping the entry in-process with
onnxruntime produces; a text's classification is bitwise the same alone, in a padded batch, and in-process.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from lstm_client import Client
from lstm_server.engine.sampling import softmax
from lstm_server.runtime.model_repository import list_entries, load_entry

from ..reference import Reference
from ..serving import ServerThread, array_of

MODELS = Path(__file__).resolve().parents[2] / "models"
ENTRIES = list_entries(MODELS)
PROMPTS = [
    "ROMEO:\n",
    "KING HENRY:\nWhat ",
    "First Citizen:\nBefore we proceed any further, hear me ",
    "O",
    "JULIET:\nAy",
]
TEXTS = [
    "a gorgeous , moving film",
    "i wanted to like it . i did not .",
    "dull",
    "the most magnificent and heartbreaking performance of the year , and a script that never stops surprising",
    "it 's not bad , but it is not good either",
    "an unexpectedly sweet and funny story about loss",
]
CHARS = 48


def sampling(i: int) -> dict:
    """Half the sessions greedy, half seeded sampling with their own settings."""
    if i % 2 == 0:
        return {"temperature": 0.0}
    return {"temperature": 0.7 + 0.1 * (i % 3), "top_k": 0 if i % 3 else 20, "seed": 1000 + i}


def generate(client: Client, i: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    params = sampling(i)
    with client.session(model="charlm", prompt=PROMPTS[i % len(PROMPTS)], **params) as session:
        text = "".join(chunk.text for chunk in session.generate(max_tokens=CHARS))
        state = session.export()
    return text, array_of(state.h), array_of(state.c), array_of(state.next_logits)


def mean_batch(running: ServerThread, model: str) -> float:
    registry = running.server.metrics.registry
    count = registry.get_sample_value("lstm_batch_size_count", {"model": model}) or 0
    return (registry.get_sample_value("lstm_batch_size_sum", {"model": model}) or 0) / max(count, 1)


@pytest.mark.parametrize("version", ENTRIES.get("charlm", []))
def test_served_generation_is_the_same_alone_batched_and_in_process(version) -> None:
    running = ServerThread(MODELS, model_versions=f"charlm={version}", threads=2)
    try:
        sessions = 12
        with Client(running.address) as client:
            alone = [generate(client, i) for i in range(sessions)]
            together: list = [None] * sessions
            start = threading.Barrier(sessions)

            def run(i: int) -> None:
                start.wait()
                together[i] = generate(client, i)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(sessions)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
        assert mean_batch(running, "charlm") > 1.5  # the concurrent sessions really shared model calls
    finally:
        running.stop()
    reference = Reference(MODELS / "charlm" / str(version))
    for i in range(sessions):
        text, h, c, _ = alone[i]
        assert together[i][0] == text, f"session {i}: batched text differs from alone"
        for name, a, b in zip(("h", "c", "next_logits"), alone[i][1:], together[i][1:], strict=True):
            assert np.array_equal(a, b), f"session {i}: batched {name} is not bitwise the same as alone"
        expected, h_ref, c_ref = reference.generate(PROMPTS[i % len(PROMPTS)], CHARS, **sampling(i))
        assert text == expected, f"session {i}: served text differs from in-process stepping"
        assert np.array_equal(h.ravel(), h_ref.ravel()) and np.array_equal(c.ravel(), c_ref.ravel())


@pytest.mark.parametrize("version", ENTRIES.get("sentiment", []))
def test_served_classification_is_the_same_alone_batched_and_in_process(version) -> None:
    entry = load_entry(MODELS / "sentiment" / str(version))
    running = ServerThread(MODELS, model_versions=f"sentiment={version}", threads=2, classify_max_delay_ms=20)
    try:
        with Client(running.address) as client:
            alone = [client.classify([text])[0].probabilities for text in TEXTS]
            one_call = [r.probabilities for r in client.classify(TEXTS)]  # one padded batch
            reversed_call = [r.probabilities for r in client.classify(TEXTS[::-1])][::-1]
            concurrent: list = [None] * len(TEXTS)

            def run(i: int) -> None:
                concurrent[i] = client.classify([TEXTS[i]])[0].probabilities

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(TEXTS))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
    finally:
        running.stop()
    assert one_call == alone and reversed_call == alone and concurrent == alone  # float32 values, exactly
    session = ort.InferenceSession(str(entry.file("model.onnx")), providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_str(entry.tokenizer_json())
    layers = entry.num_layers * entry.num_directions
    for text, served in zip(TEXTS, alone, strict=True):
        ids = np.array([tokenizer.encode(text).ids], np.int64)
        zeros = np.zeros((layers, 1, entry.hidden_size), np.float32)
        feeds = {"tokens": ids, "lengths": np.array([ids.shape[1]], np.int64), "h0": zeros, "c0": zeros}
        probabilities = softmax(session.run(["logits"], feeds)[0])[0]
        assert served == dict(zip(entry.labels, probabilities.tolist(), strict=True)), text
