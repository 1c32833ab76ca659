"""The exported language model stepped in-process with onnxruntime, one character at a time, its sampler graph
drawing each: what a served session must produce.

The server's tests use ``Reference`` directly. The client's tests, whose process must not load onnxruntime, run
this module instead: ``python -m tests.reference ENTRY_DIR TEXT OUT.npz`` writes the arrays ``logits``, ``h`` and
``c`` after a fresh session reads ``TEXT``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lstm_server.engine.sampling import as_uint64, uniforms
from lstm_server.runtime.model_repository import load_entry


class Reference:
    """The exported language model stepped in-process with onnxruntime: what a session must produce."""

    def __init__(self, entry_dir: Path) -> None:
        self.entry = load_entry(entry_dir)
        self.session = ort.InferenceSession(str(self.entry.file("model.onnx")), providers=["CPUExecutionProvider"])
        self.sampler = ort.InferenceSession(str(self.entry.file("sample.onnx")), providers=["CPUExecutionProvider"])
        self.index = {ch: i for i, ch in enumerate(self.entry.vocab)}
        self.state_shape = (self.entry.num_layers, 1, self.entry.hidden_size)

    def feed(self, text: str, h=None, c=None):
        h = np.zeros(self.state_shape, np.float32) if h is None else h
        c = np.zeros(self.state_shape, np.float32) if c is None else c
        ids = np.array([[self.index[ch] for ch in text]], np.int64)
        logits, h, c = self.session.run(None, {"tokens": ids, "h0": h, "c0": c})
        return logits[0, -1], h, c

    def sample(self, logits, temperature=1.0, top_k=0, top_p=1.0, seed=0, position=0) -> int:
        """The entry's sampler graph on one row of logits, with one session's parameters at ``position``."""
        feeds = {
            "logits": np.asarray([logits], np.float32),
            "draws": uniforms(as_uint64([seed]), as_uint64([position])),
            "temperature": np.array([temperature], np.float64),
            "top_k": np.array([top_k], np.int64),
            "top_p": np.array([top_p], np.float64),
        }
        return int(self.sampler.run(["token"], feeds)[0][0])

    def generate(self, prompt: str, n: int, *, temperature=1.0, top_k=0, top_p=1.0, seed=0, stop=()):
        """(generated text, h, c after it) for a fresh session reading ``prompt`` then sampling ``n`` characters."""
        logits, h, c = self.feed(prompt)
        position, text = len(prompt), ""
        for _ in range(n):
            token = self.sample(logits, temperature, top_k, top_p, seed, position)
            text += self.entry.vocab[token]
            position += 1
            logits, h, c = self.feed(self.entry.vocab[token], h, c)
            if any(text.endswith(s) for s in stop):
                break
        return text, h, c


if __name__ == "__main__":
    entry, prompt, target = sys.argv[1:]
    logits, h, c = Reference(Path(entry)).feed(prompt)
    np.savez(target, logits=logits, h=h, c=c)
