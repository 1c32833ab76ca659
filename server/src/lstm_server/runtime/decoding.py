"""Drawing characters: a language model's sampler graph, and K characters per call.

Every character a server draws comes from the entry's ``sample.onnx`` (the one
definition of sampling, written by ``lstm-export``): alone (a turn's first
character, right after its prompt) or inside ``decode.onnx``, which runs the
step and the same sampler K times in one call. An entry without a decode graph,
or a runtime other than onnxruntime, gets ``SteppedDecoder``: the backend's
step and the sampler graph in a Python loop, with the same results.

Both decoders take ``DecodeInputs`` and return ``DecodeOutputs`` (the decode
graph's contract, ``lstm_export.decode_graph``): row r feeds ``tokens[r]``, then
``steps[r]`` times samples a token with ``draws[r, k]`` and feeds it; its
``logits``, ``h`` and ``c`` are those after the last token it read, and
``sampled[r, k]`` is -1 past its steps.

``GraphDecoder`` binds its inputs and outputs (onnxruntime IO binding) to
buffers allocated once for ``capacity`` rows and ``max_steps`` characters:
``inputs(batch, k)`` hands out views to fill, and a call allocates nothing.
A call on at most ``single_thread_rows`` rows runs on a second session of the
same graph with one intra-op thread: a few rows gain nothing from a parallel
section, and a server that shares its cores with gRPC loses to one (a worker
thread descheduled stalls the call; a spinning one burns a core). Thread
counts do not change a row's result: the export checks the graph bitwise
across them, and the multi-step tests run across this switch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np

from .backends import Backend, onnx_session
from .model_repository import DECODE_FILE, SAMPLE_FILE, ModelEntry


@dataclass
class DecodeInputs:
    """One decoder call's inputs (the decode graph's, by name)."""

    tokens: np.ndarray  # int64 [batch]: each row's pending token, fed first
    h0: np.ndarray  # float32 [layers, batch, hidden]
    c0: np.ndarray  # float32 [layers, batch, hidden]
    draws: np.ndarray  # float64 [batch, K]: uniforms in [0, 1)
    temperature: np.ndarray  # float64 [batch]
    top_k: np.ndarray  # int64 [batch]
    top_p: np.ndarray  # float64 [batch]
    steps: np.ndarray  # int64 [batch]: characters each row samples (and reads, its pending one first)

    def rows(self, rows: np.ndarray) -> DecodeInputs:
        """A copy holding only ``rows``."""
        return DecodeInputs(
            **{
                f.name: (getattr(self, f.name)[:, rows] if f.name in ("h0", "c0") else getattr(self, f.name)[rows])
                for f in fields(self)
            }
        )


@dataclass
class DecodeOutputs:
    """One decoder call's outputs: each row's characters (-1 past its steps), and its logits and state after the
    last character it read."""

    sampled: np.ndarray  # int64 [batch, K]
    logits: np.ndarray  # float32 [batch, vocab]
    h: np.ndarray  # float32 [layers, batch, hidden]
    c: np.ndarray

    def copy(self) -> DecodeOutputs:
        """Arrays of its own (a decoder may reuse its output buffers on the next call)."""
        return DecodeOutputs(self.sampled.copy(), self.logits.copy(), self.h.copy(), self.c.copy())


class Decoder(Protocol):
    name: str

    def sample(
        self, logits: np.ndarray, draws: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray
    ) -> np.ndarray:
        """One token per row of ``logits`` [batch, vocab] (the sampler graph)."""

    def inputs(self, batch: int, steps_per_call: int) -> DecodeInputs:
        """Arrays of these shapes to fill for ``decode`` (views of preallocated buffers where the decoder has
        them: valid until the next call)."""

    def decode(self, inputs: DecodeInputs) -> DecodeOutputs:
        """K characters for every row (outputs valid until the next call)."""


class Sampler:
    """``sample.onnx`` on onnxruntime."""

    def __init__(self, entry: ModelEntry, threads: int, spinning: bool) -> None:
        self.session = onnx_session(entry, entry.file(SAMPLE_FILE), "cpu", threads, spinning)

    def __call__(self, logits, draws, temperature, top_k, top_p) -> np.ndarray:
        feeds = {"logits": logits, "draws": draws, "temperature": temperature, "top_k": top_k, "top_p": top_p}
        return self.session.run(["token"], feeds)[0]


def _allocate(batch: int, steps_per_call: int, layers: int, hidden: int) -> DecodeInputs:
    state = (layers, batch, hidden)
    return DecodeInputs(
        tokens=np.zeros(batch, np.int64),
        h0=np.zeros(state, np.float32),
        c0=np.zeros(state, np.float32),
        draws=np.zeros((batch, steps_per_call), np.float64),
        temperature=np.ones(batch, np.float64),
        top_k=np.zeros(batch, np.int64),
        top_p=np.ones(batch, np.float64),
        steps=np.zeros(batch, np.int64),
    )


def _view(buffer: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The first elements of ``buffer`` as a C-contiguous array of ``shape``."""
    return buffer.reshape(-1)[: int(np.prod(shape))].reshape(shape)


class GraphDecoder:
    """``decode.onnx`` on onnxruntime, inputs and outputs bound to buffers allocated once."""

    name = "decode graph"

    def __init__(
        self,
        entry: ModelEntry,
        sampler: Sampler,
        capacity: int,
        max_steps: int,
        threads: int,
        spinning: bool,
        single_thread_rows: int = 0,
    ) -> None:
        self.session = onnx_session(entry, entry.file(DECODE_FILE), "cpu", threads, spinning)
        self.single_thread_rows = single_thread_rows if threads > 1 else 0
        narrow = onnx_session(entry, entry.file(DECODE_FILE), "cpu", 1, spinning) if self.single_thread_rows else None
        self.sample = sampler
        self._layers, self._hidden, self._vocab = entry.num_layers, entry.hidden_size, len(entry.vocab)
        self._in = _allocate(capacity, max_steps, self._layers, self._hidden)
        self._out = DecodeOutputs(
            np.zeros((capacity, max_steps), np.int64),
            np.zeros((capacity, self._vocab), np.float32),
            np.zeros_like(self._in.h0),
            np.zeros_like(self._in.c0),
        )
        self._sessions = [(self.session, self.session.io_binding())]  # by width: [wide, narrow]
        if narrow is not None:
            self._sessions.append((narrow, narrow.io_binding()))

    def inputs(self, batch: int, steps_per_call: int) -> DecodeInputs:
        state = (self._layers, batch, self._hidden)
        return DecodeInputs(
            **{
                f.name: _view(
                    getattr(self._in, f.name),
                    state if f.name in ("h0", "c0") else (batch, steps_per_call) if f.name == "draws" else (batch,),
                )
                for f in fields(DecodeInputs)
            }
        )

    def decode(self, inputs: DecodeInputs) -> DecodeOutputs:
        batch, steps_per_call = inputs.draws.shape
        state = (self._layers, batch, self._hidden)
        out = DecodeOutputs(
            _view(self._out.sampled, (batch, steps_per_call)),
            _view(self._out.logits, (batch, self._vocab)),
            _view(self._out.h, state),
            _view(self._out.c, state),
        )
        session, binding = self._sessions[batch <= self.single_thread_rows]
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for f in fields(DecodeInputs):
            binding.bind_cpu_input(f.name, np.ascontiguousarray(getattr(inputs, f.name)))
        for name, array in (("sampled", out.sampled), ("logits", out.logits), ("hn", out.h), ("cn", out.c)):
            binding.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
        session.run_with_iobinding(binding)
        return out


class SteppedDecoder:
    """The backend's one-character step and the sampler graph in a loop: what ``decode.onnx`` does, for a runtime
    or an entry without it."""

    name = "step loop"

    def __init__(self, backend: Backend, sampler: Sampler, layers: int, hidden: int, vocab: int) -> None:
        self.backend = backend
        self.sample = sampler
        self._layers, self._hidden, self._vocab = layers, hidden, vocab

    def inputs(self, batch: int, steps_per_call: int) -> DecodeInputs:
        return _allocate(batch, steps_per_call, self._layers, self._hidden)

    def decode(self, inputs: DecodeInputs) -> DecodeOutputs:
        batch, steps_per_call = inputs.draws.shape
        tokens, h, c = inputs.tokens, inputs.h0, inputs.c0
        logits = np.zeros((batch, self._vocab), np.float32)
        sampled = np.full((batch, steps_per_call), -1, np.int64)
        for k in range(int(inputs.steps.max(initial=0))):
            active = k < inputs.steps
            new_logits, new_h, new_c = self.backend.run({"tokens": tokens[:, None], "h0": h, "c0": c})
            new_logits = new_logits[:, -1]
            drawn = self.sample(new_logits, inputs.draws[:, k], inputs.temperature, inputs.top_k, inputs.top_p)
            logits = np.where(active[:, None], new_logits, logits)
            h = np.where(active[None, :, None], new_h, h)
            c = np.where(active[None, :, None], new_c, c)
            tokens = np.where(active, drawn, tokens)
            sampled[:, k] = np.where(active, drawn, -1)
        return DecodeOutputs(sampled, logits, h, c)


def load_decoder(
    entry: ModelEntry,
    backend: Backend,
    capacity: int,
    max_steps: int,
    threads: int,
    spinning: bool,
    single_thread_rows: int = 0,
) -> Decoder:
    """The decode graph when ``backend`` is onnxruntime and the entry has one (calls on at most
    ``single_thread_rows`` rows on one thread), else the step loop."""
    sampler = Sampler(entry, 1, spinning)  # one row or a few: no worker threads to spin beside the decoder's
    if backend.name == "onnxruntime" and backend.device == "cpu" and entry.has_decode_graph:
        return GraphDecoder(entry, sampler, capacity, max_steps, threads, spinning, single_thread_rows)
    return SteppedDecoder(backend, sampler, entry.num_layers, entry.hidden_size, len(entry.vocab))
