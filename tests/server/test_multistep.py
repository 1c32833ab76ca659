"""Multi-step decoding on the exported tiny model: K=1, K=8, any batch and the in-process reference agree.

Each session's text and its state afterwards (h, c and next-character logits, bitwise) are the same whether the
engine draws one character per call or eight, whether the session runs alone or beside others, and equal what
stepping the entry in-process one character at a time produces (``tests/reference.py``). Stop strings are chosen
to end inside a call's characters, and max_tokens is not a multiple of K.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from lstm_server.engine.codec import CharCodec
from lstm_server.engine.generation import EngineConfig, GenerationEngine
from lstm_server.engine.sampling import Sampling
from lstm_server.engine.slots import StateSlots
from lstm_server.metrics import Metrics
from lstm_server.runtime.backends import OnnxBackend
from lstm_server.runtime.decoding import GraphDecoder, Sampler, SteppedDecoder, load_decoder
from lstm_server.runtime.model_repository import list_entries, load_entry

from ..serving import joining_at_once

PROMPTS = ["KING:\nthe ", "QUEEN", "LORD:\n", "K", "KING:\nthe queen "]
CHARS = 45  # not a multiple of 8
SHIPPED = Path(__file__).resolve().parents[2] / "models"
NARROW_ROWS = 4  # calls on up to 4 rows run on the decoder's one-thread session, larger ones on two threads


def plans(reference) -> list[tuple[str, Sampling]]:
    """Greedy and seeded sessions (plain, top-k, top-p, both), half with a stop string that ends mid-call."""
    settings = [
        {"temperature": 0.0},
        {"temperature": 0.8, "seed": 3},
        {"temperature": 1.0, "top_k": 5, "seed": 4},
        {"temperature": 0.9, "top_p": 0.8, "seed": 5},
        {"temperature": 1.2, "top_k": 10, "top_p": 0.9, "seed": 6},
    ]
    made = []
    for i in range(10):
        prompt, params = PROMPTS[i % len(PROMPTS)], settings[i % len(settings)]
        stop: tuple[str, ...] = ()
        if i % 2:  # a stop string taken from the session's own text, ending at character 13 + i (mid-call)
            text = reference.generate(prompt, CHARS, **params)[0]
            stop = (text[11 + i : 13 + i],)
        made.append((prompt, Sampling(max_tokens=CHARS, stop=stop, **params)))
    return made


class PromptReads:
    """A backend wrapper recording the shape of every prompt read (``tokens`` [rows, characters])."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.device = inner, inner.name, inner.device
        self.shapes: list[tuple[int, int]] = []

    def run(self, inputs):
        self.shapes.append(inputs["tokens"].shape)
        return self.inner.run(inputs)


def run(
    entry_dir,
    plan: list[tuple[str, Sampling]],
    max_steps: int,
    together: bool,
    stepped: bool = False,
    reads: list | None = None,
):
    """(text, h, c, logits) of every planned session, on an engine drawing up to ``max_steps`` per call. Together:
    every turn is submitted while the model thread is held, so all join at once (their prompts read in shared
    calls) and step together; ``reads`` gets the shapes of the prompt reads."""
    entry = load_entry(entry_dir)
    backend = OnnxBackend(entry, "cpu", 2)
    sampler = Sampler(entry, 2, True)
    if stepped:
        decoder = SteppedDecoder(backend, sampler, entry.num_layers, entry.hidden_size, len(entry.vocab))
    else:
        decoder = load_decoder(entry, backend, 64, max_steps, 2, True, NARROW_ROWS)  # batches cross the switch
        assert isinstance(decoder, GraphDecoder)
    codec = CharCodec(entry.vocab)
    slots = StateSlots(entry.num_layers, entry.hidden_size, len(codec), 64)
    # a budget no call reaches: K is 1 for the first call (which measures), then doubles up to max_steps
    config = EngineConfig(64, 10_000, 0.0, 0.0, max_steps, 1e6)
    engine = GenerationEngine("charlm", backend, codec, slots, decoder, Metrics(), config)
    recorded = engine.wrap_backend(PromptReads)

    async def one(prompt: str, sampling: Sampling):
        slot = engine.slots.allocate()
        turn = engine.submit(slot, np.array(codec.encode(prompt)), sampling, 0)
        parts = []
        while (chunk := await turn.take()).end is None:
            parts.append(chunk.text)
        text, end = "".join(parts) + chunk.text, chunk.end
        assert end.failure is None and end.tokens_seen == len(prompt) + len(text)
        state = engine.slots.read(slot)
        return text, state.h, state.c, state.logits

    async def scenario():
        engine.start()
        try:
            if together:
                async with joining_at_once(engine, len(plan)):
                    return await asyncio.gather(*(one(p, s) for p, s in plan))
            return [await one(p, s) for p, s in plan]
        finally:
            await engine.stop()
            if reads is not None:
                reads.extend(recorded.shapes)

    return asyncio.run(scenario())


def assert_same(actual, expected) -> None:
    for (text, h, c, logits), (text_e, h_e, c_e, logits_e) in zip(actual, expected, strict=True):
        assert text == text_e
        assert np.array_equal(h, h_e) and np.array_equal(c, c_e) and np.array_equal(logits, logits_e)


@pytest.fixture(scope="module")
def expected(exported, reference):
    """The reference: each session stepped in-process one character at a time (text, h, c)."""
    plan = plans(reference)
    made = []
    for prompt, s in plan:
        text, h, c = reference.generate(
            prompt, CHARS, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed, stop=s.stop
        )
        made.append((text, h, c, None))
    return plan, made


@pytest.mark.parametrize("max_steps", [1, 8])
@pytest.mark.parametrize("together", [False, True], ids=["alone", "batched"])
def test_k_and_batch_change_nothing(exported, expected, max_steps: int, together: bool, monkeypatch) -> None:
    plan, reference = expected
    reruns = []
    rerun = GenerationEngine._rerun
    monkeypatch.setattr(GenerationEngine, "_rerun", lambda self, *args: reruns.append(args[2]) or rerun(self, *args))
    reads: list[tuple[int, int]] = []
    served = run(exported / "charlm" / "1", plan, max_steps, together, reads=reads)
    lengths = sorted({len(prompt) for prompt, _ in plan})
    if together:  # one call per distinct prompt length, each on the rows still reading
        assert reads == [
            (sum(len(p) >= end for p, _ in plan), end - start)
            for start, end in zip([0, *lengths], lengths, strict=False)
        ]
    else:
        assert sorted(reads) == sorted((1, len(prompt)) for prompt, _ in plan)
    assert bool(reruns) == (max_steps > 1)  # with K > 1 some stop string ended inside a call's characters
    assert any(s.stop and len(text) < CHARS for (text, *_), (_, s) in zip(served, plan, strict=True))
    for (text, h, c, _), (text_e, h_e, c_e, _) in zip(served, reference, strict=True):
        assert text == text_e
        assert np.array_equal(h, h_e) and np.array_equal(c, c_e)
    if (max_steps, together) == (8, True):  # logits too, against K=1 alone
        assert_same(served, run(exported / "charlm" / "1", plan, 1, False))


def test_the_step_loop_decoder_equals_the_decode_graph(exported, expected) -> None:
    plan, _ = expected
    graph = run(exported / "charlm" / "1", plan, 8, True)
    assert_same(run(exported / "charlm" / "1", plan, 8, True, stepped=True), graph)


@pytest.mark.parametrize(
    "shipped",
    [None, *list_entries(SHIPPED).get("charlm", [])],
    ids=lambda v: "test model" if v is None else f"charlm/{v}",
)
def test_calls_on_few_rows_run_on_one_thread_with_the_same_results(exported, shipped: int | None) -> None:
    """Up to ``single_thread_rows`` rows a call runs on the one-thread session, above it on the wide one, and a row's
    outputs are bitwise the same on either: on the test model and on every shipped entry."""
    entry = load_entry(exported / "charlm" / "1" if shipped is None else SHIPPED / "charlm" / str(shipped))
    backend = OnnxBackend(entry, "cpu", 2)
    decoder = load_decoder(entry, backend, 64, 8, 2, True, NARROW_ROWS)
    assert isinstance(decoder, GraphDecoder)
    (wide, _), (narrow, _) = decoder._sessions
    assert narrow.get_session_options().intra_op_num_threads == 1
    assert wide.get_session_options().intra_op_num_threads == 2
    used: list[str] = []
    for name, session in (("wide", wide), ("narrow", narrow)):
        run_bound = session.run_with_iobinding
        session.run_with_iobinding = lambda binding, *a, _run=run_bound, _name=name: (
            used.append(_name) or _run(binding, *a)
        )
    rng = np.random.default_rng(0)
    layers, hidden = entry.num_layers, entry.hidden_size
    state = rng.standard_normal((2, layers, 9, hidden)).astype(np.float32)
    tokens, draws = rng.integers(0, len(entry.vocab), 9), rng.random((9, 8))

    def decode(rows: int):
        inputs = decoder.inputs(rows, 8)
        inputs.tokens[:], inputs.h0[:], inputs.c0[:] = tokens[:rows], state[0][:, :rows], state[1][:, :rows]
        inputs.draws[:], inputs.temperature[:], inputs.top_k[:], inputs.top_p[:] = draws[:rows], 0.9, 0, 1.0
        inputs.steps[:] = np.arange(rows) % 8 + 1
        return decoder.decode(inputs).copy()

    alone, few, many = decode(1), decode(NARROW_ROWS), decode(9)
    assert used == ["narrow", "narrow", "wide"]
    for out in (alone, few):
        rows = len(out.sampled)
        assert np.array_equal(out.sampled, many.sampled[:rows])
        for got, full in ((out.logits, many.logits[:rows]), (out.h, many.h[:, :rows]), (out.c, many.c[:, :rows])):
            assert np.array_equal(got, full)
    assert load_decoder(entry, OnnxBackend(entry, "cpu", 1), 64, 8, 1, True, NARROW_ROWS)._sessions[1:] == []


@pytest.mark.parametrize("version", list_entries(SHIPPED).get("charlm", []), ids=lambda v: f"charlm/{v}")
def test_prompts_read_together_on_a_shipped_entry_equal_each_read_alone(version: int) -> None:
    """Turns that join at once have their prompts read in shared calls (one per distinct length, on the rows still
    reading); every session's text and state are bitwise what it gets alone."""
    prompts = ["ROMEO:\n", "KING HENRY:\nWhat ", "O", "JULIET:\nAy", "ROMEO:\n", "First Citizen:\nBefore we proceed "]
    settings = [{"temperature": 0.0}, {"temperature": 0.8, "seed": 7}, {"temperature": 1.0, "top_k": 5, "seed": 8}]
    plan = [(p, Sampling(max_tokens=24, **settings[i % len(settings)])) for i, p in enumerate(prompts)]
    reads: list[tuple[int, int]] = []
    together = run(SHIPPED / "charlm" / str(version), plan, 8, together=True, reads=reads)
    assert reads[0] == (len(plan), 1)  # every prompt's first character in one call
    assert len(reads) == len({len(p) for p in prompts})
    assert_same(together, run(SHIPPED / "charlm" / str(version), plan, 8, together=False))
