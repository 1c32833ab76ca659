"""The scheduler with a stand-in model: backpressure, coalescing and fairness, without gRPC."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from lstm_server.config import ServerConfig
from lstm_server.engine.codec import CharCodec
from lstm_server.engine.faults import RowFailed
from lstm_server.engine.generation import EngineConfig, GenerationEngine
from lstm_server.engine.models import ServedModel, ServedModels
from lstm_server.engine.sampling import Sampling
from lstm_server.engine.slots import StateSlots
from lstm_server.engine.turn import Turn
from lstm_server.errors import ServiceError, Status
from lstm_server.metrics import Metrics
from lstm_server.runtime.decoding import SteppedDecoder
from lstm_server.runtime.model_repository import ModelEntry
from lstm_server.sessions.failures import read_error, step_error, turn_error
from lstm_server.sessions.manager import SessionManager
from lstm_server.sessions.store import MemoryStore
from lstm_server.sessions.table import SessionTable
from lstm_server.sessions.turn import TurnStream

from ..serving import joining_at_once


class CountingModel:
    """Always predicts 'b'; h counts the characters fed, so the state shows what was read."""

    name, device = "fake", "cpu"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def run(self, inputs):
        tokens = inputs["tokens"]
        self.batches.append(tokens.shape[0])
        logits = np.zeros((*tokens.shape, 2), np.float32)
        logits[..., 1] = 5.0
        return logits, inputs["h0"] + tokens.shape[1], inputs["c0"]


def greedy(logits, draws, temperature, top_k, top_p) -> np.ndarray:
    """The stand-in sampler: the most likely character."""
    return logits.argmax(axis=1)


def new_engine(model, buffer: int = 1000, max_batch: int = 8, sampler=greedy, **options) -> GenerationEngine:
    """An engine on a stand-in model whose decoder steps it in a loop (``options``: the engine's K settings)."""
    decoder = SteppedDecoder(model, sampler, 1, 3, 2)
    config = EngineConfig(max_batch, buffer, **{"stream_interval_ms": 0.0, "stream_messages_per_s": 0.0, **options})
    return GenerationEngine("m", model, CharCodec(["a", "b"]), StateSlots(1, 3, 2, 16), decoder, Metrics(), config)


def make_engine(buffer: int = 5, max_batch: int = 8) -> tuple[GenerationEngine, CountingModel]:
    model = CountingModel()
    return new_engine(model, buffer, max_batch), model


NAMES: dict[int, str] = {}  # id(turn) -> the name its failures are worded with


def start(engine: GenerationEngine, name: str, ids, sampling: Sampling, position: int = 0) -> Turn:
    """A turn on a new slot of ``engine`` (a fresh sequence unless ``position`` says otherwise)."""
    return submit(engine, engine.slots.allocate(), ids, sampling, position, name)


def submit(engine: GenerationEngine, slot: int, ids, sampling: Sampling, position: int, name: str) -> Turn:
    turn = engine.submit(slot, np.array(ids), sampling, position)
    NAMES[id(turn)] = name
    return turn


async def read_all(turn: Turn) -> str:
    """The turn's text (every chunk through the engine's channel); its failure worded as the sessions layer
    words it for the turn's name."""
    parts = []
    while (chunk := await turn.take()).end is None:
        parts.append(chunk.text)
    if chunk.end.failure is not None:
        raise turn_error(chunk.end.failure, NAMES[id(turn)])
    return "".join(parts) + chunk.text


async def read(engine: GenerationEngine, slot: int, ids, name: str) -> None:
    """A prompt read; its failure worded as for CreateSession."""
    try:
        await engine.read(slot, np.array(ids))
    except RowFailed as failed:
        raise read_error(failed.failure, name) from None


def h_of(engine: GenerationEngine, slot: int) -> float:
    """The stand-in model's count of the characters a slot's state has read."""
    return float(engine.slots.read(slot).h[0, 0, 0])


def test_a_stalled_reader_pauses_its_turn_and_nobody_else() -> None:
    async def scenario():
        engine, _ = make_engine(buffer=5)
        engine.start()
        stalled = start(engine, "s", [0], Sampling(temperature=0, max_tokens=100))
        other = start(engine, "o", [0], Sampling(temperature=0, max_tokens=60))
        assert await asyncio.wait_for(read_all(other), 10) == "b" * 60  # not held back by the stalled one
        await asyncio.sleep(0.05)
        progress = stalled.progress()
        assert progress.tokens_seen == 1 + 5 and stalled.end is None  # paused at the buffer limit
        assert progress.buffered == 5
        text = await asyncio.wait_for(read_all(stalled), 10)  # reading again resumes it
        await engine.stop()
        return text, stalled, engine

    text, stalled, engine = asyncio.run(scenario())
    assert text == "b" * 100 and stalled.end.tokens_seen == 101
    assert h_of(engine, stalled.slot) == 101  # the state read exactly the 101 characters


def test_turns_share_steps_and_max_batch_is_respected() -> None:
    async def scenario():
        engine, model = make_engine(buffer=1000, max_batch=3)
        engine.start()
        turns = [start(engine, str(i), [0], Sampling(temperature=0, max_tokens=30)) for i in range(5)]
        texts = await asyncio.gather(*(read_all(t) for t in turns))
        await engine.stop()
        return texts, model.batches

    texts, batches = asyncio.run(scenario())
    assert texts == ["b" * 30] * 5
    steps = [b for b in batches if b > 1]
    assert max(batches) == 3 and steps, "turns were never stepped together"


def test_cancel_feeds_the_last_character_and_frees_the_session() -> None:
    async def scenario():
        engine, _ = make_engine(buffer=3)
        engine.start()
        turn = start(engine, "c", [0, 0], Sampling(temperature=0, max_tokens=1000))
        await asyncio.sleep(0.05)  # paused at the buffer limit
        turn.cancel()
        text = await asyncio.wait_for(read_all(turn), 10)
        await engine.stop()
        return text, turn, engine

    text, turn, engine = asyncio.run(scenario())
    assert text == "bbb" and turn.end is not None
    assert turn.end.tokens_seen == 2 + 3
    assert h_of(engine, turn.slot) == 5  # every counted character was fed


class FailingOnce(CountingModel):
    """Fails the first batched step (batch > 1), then works."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def run(self, inputs):
        if inputs["tokens"].shape[0] > 1 and not self.failed:
            self.failed = True
            raise RuntimeError("device lost")
        return super().run(inputs)


def run_turns(model, sessions_and_prompts, max_tokens: int = 30):
    """One greedy turn per (name, prompt ids, c marker), then one more, on a fresh engine: (outcomes, turns,
    engine)."""

    async def scenario():
        engine = new_engine(model)
        turns = []
        for name, ids, marker in sessions_and_prompts:
            slot = engine.slots.allocate()
            h, c = np.zeros(engine.slots.slot_shape, np.float32), np.zeros(engine.slots.slot_shape, np.float32)
            c[0, 0, 0] = marker
            engine.slots.write(slot, h, c, None)
            turns.append(submit(engine, slot, ids, Sampling(temperature=0, max_tokens=max_tokens), 0, name))
        engine.start()  # after the submissions: every turn is admitted before the first step
        outcomes = await asyncio.gather(*(read_all(t) for t in turns), return_exceptions=True)
        after = start(engine, "later", [0], Sampling(temperature=0, max_tokens=5))
        outcomes.append(await asyncio.wait_for(read_all(after), 10))
        await engine.stop()
        return outcomes, turns, engine

    return asyncio.run(scenario())


def test_a_batched_step_that_fails_is_retried_apart_and_nobody_notices() -> None:
    model = FailingOnce()
    outcomes, made, engine = run_turns(model, [(str(i), [0], 0.0) for i in range(3)], max_tokens=50)
    assert model.failed and outcomes == ["b" * 50] * 3 + ["bbbbb"]
    assert all(t.end.tokens_seen == 51 and h_of(engine, t.slot) == 51 for t in made)


class Poisoned(CountingModel):
    """A row whose c carries marker -1 raises once it has read 5 characters; marker -2 turns NaN there."""

    def run(self, inputs):
        c0, h0 = inputs["c0"][0, :, 0], inputs["h0"][0, :, 0]
        if np.any((c0 == -1) & (h0 >= 5)):
            raise RuntimeError("kernel exploded")
        logits, h, c = super().run(inputs)
        h[0, (c0 == -2) & (h0 >= 5)] = np.nan
        return logits, h, c


def test_a_failing_row_ends_only_its_own_turn_and_keeps_its_state() -> None:
    model = Poisoned()
    plan = [("ok1", [0], 0.0), ("raises", [0, 0], -1.0), ("ok2", [0, 1, 0], 0.0), ("nan", [1], -2.0), ("ok3", [1], 0.0)]
    outcomes, made, engine = run_turns(model, plan)
    ok1, raises, ok2, nan, ok3, later = outcomes
    assert ok1 == ok2 == ok3 == "b" * 30 and later == "bbbbb"
    assert isinstance(raises, ServiceError) and raises.code == Status.INTERNAL
    assert "model step failed for session raises: kernel exploded" in raises.message
    assert isinstance(nan, ServiceError) and nan.code == Status.FAILED_PRECONDITION
    assert "non-finite (NaN or infinity)" in nan.message
    for bad, error in ((made[1], raises), (made[3], nan)):  # the failed call was not applied, and the count says so
        kept = bad.end.tokens_seen  # the call that failed may have drawn several characters
        assert 2 <= kept <= 5 and h_of(engine, bad.slot) == kept
        assert f"keeps its state after {kept} characters" in error.message
    assert [t.end.tokens_seen for t in (made[0], made[2], made[4])] == [31, 33, 31]
    assert max(model.batches) == 5  # they were stepped together


def test_a_row_whose_sampling_raises_fails_alone_and_its_step_is_not_applied() -> None:
    model = CountingModel()
    bad_top_k, draws_of_bad = 7, []

    def flaky_sample(logits, draws, temperature, top_k, top_p):
        if np.any(top_k == bad_top_k):
            draws_of_bad.append(len(draws))
            if len(draws_of_bad) >= 4:  # its first character, then two steps, then the third step fails
                raise FloatingPointError("bad draw")
        return greedy(logits, draws, temperature, top_k, top_p)

    async def scenario():
        engine = new_engine(model, sampler=flaky_sample, max_decode_steps=1)
        turns = [
            start(engine, name, [0], Sampling(temperature=0, max_tokens=20, top_k=top_k))
            for name, top_k in (("good", 1), ("bad", bad_top_k), ("also-good", 2))
        ]
        engine.start()
        outcomes = await asyncio.gather(*(read_all(t) for t in turns), return_exceptions=True)
        await engine.stop()
        return outcomes, turns, engine

    (good, bad, also_good), made, engine = asyncio.run(scenario())
    assert good == also_good == "b" * 20
    assert isinstance(bad, ServiceError) and bad.code == Status.INTERNAL
    assert bad.message.startswith("model step failed for session bad: bad draw; the step was not applied")
    assert made[1].end.tokens_seen == 3 and h_of(engine, made[1].slot) == 3  # as before the step


class NanAfterPrompt(CountingModel):
    """Any call that reads more than one character at once turns the state NaN; single steps are fine."""

    def run(self, inputs):
        logits, h, c = super().run(inputs)
        if inputs["tokens"].shape[1] > 1:
            c = c + np.inf
        return logits, h, c


async def step(engine: GenerationEngine, tokens, h, c):
    try:
        return await engine.step(tokens, h, c)
    except RowFailed as failed:
        raise step_error(failed.failure) from None


def test_a_prompt_or_step_that_turns_non_finite_changes_nothing() -> None:
    async def scenario():
        engine = new_engine(NanAfterPrompt())
        engine.start()
        slot = engine.slots.allocate()
        await read(engine, slot, [0], "p")  # one character: fine
        seen = 1
        errors = []
        failing = []  # the turn, submitted once the read is over (a slot serves one read or turn at a time)
        for call in (
            lambda: read(engine, slot, [0, 1], "p"),
            lambda: read_all(
                failing.append(submit(engine, slot, [0, 1, 0], Sampling(max_tokens=3), seen, "p")) or failing[0]
            ),
            lambda: step(engine, np.array([0, 0]), np.zeros((1, 1, 3), np.float32), np.zeros((1, 1, 3), np.float32)),
        ):
            try:
                await call()
            except ServiceError as error:
                errors.append(error)
        seen = failing[0].end.tokens_seen
        last = submit(engine, slot, [1], Sampling(temperature=0, max_tokens=3), seen, "p")
        text = await read_all(last)
        await engine.stop()
        return slot, last, engine, errors, text

    slot, last, engine, errors, text = asyncio.run(scenario())
    assert [e.code for e in errors] == [Status.FAILED_PRECONDITION] * 3
    assert "the prompt was not read" in errors[0].message and "after 1 characters" in errors[1].message
    assert "nothing was kept" in errors[2].message
    assert text == "bbb" and last.end.tokens_seen == 1 + 1 + 3 and h_of(engine, slot) == 5


def test_sampling_positions_past_2_to_the_64_wrap_instead_of_failing_the_batch() -> None:
    async def scenario():
        engine, _ = make_engine(buffer=1000)
        engine.start()
        sampling = Sampling(temperature=1.0, seed=2**64 - 1, max_tokens=6)
        huge = start(engine, "huge", [0], sampling, position=2**64 - 2)
        normal = start(engine, "normal", [0], sampling)
        texts = await asyncio.gather(*(read_all(t) for t in (huge, normal)))
        await engine.stop()
        return texts, huge

    texts, huge = asyncio.run(scenario())
    assert [len(t) for t in texts] == [6, 6] and huge.end.tokens_seen == 2**64 + 5


class NoCodec:
    """The memory store never encodes nor decodes a state."""

    def encode(self, state):
        raise AssertionError("the memory store encoded a state")

    def decode(self, data, tenant, session_id):
        raise AssertionError("the memory store decoded a state")


def make_manager(engine: GenerationEngine) -> SessionManager:
    """The sessions layer over ``engine`` alone, with the memory store."""
    entry = ModelEntry(Path("m") / "1", {"name": "m", "version": 1, "task": "generation"})
    models = ServedModels({"m": ServedModel(entry, engine.backend, engine)})
    config = ServerConfig(models="unused")
    table = SessionTable(config.max_sessions, config.idle_timeout_s)
    return SessionManager(config, models, table, Metrics(), MemoryStore(table, config.idle_timeout_s), NoCodec())


async def read_session_turn(turn: TurnStream) -> str:
    return "".join([chunk.text async for chunk in turn.chunks()])


def test_closing_a_session_mid_turn_aborts_the_stream_and_frees_the_slot_once() -> None:
    async def scenario():
        engine, _ = make_engine(buffer=4)
        engine.start()
        manager = make_manager(engine)
        model, nothing = manager.models.get("m"), np.zeros(0, np.int64)
        closing = await manager.create(model, nothing, {}, "t")
        turn = manager.start_turn(closing, np.array([0]), {"temperature": 0.0, "max_tokens": 1000})
        await asyncio.sleep(0.05)
        await manager.close(closing.id, "t")
        idle = await manager.create(model, nothing, {}, "t")
        await manager.close(idle.id, "t")  # an idle session is freed at once
        try:
            await asyncio.wait_for(read_session_turn(turn), 10)
            outcome = None
        except ServiceError as error:
            outcome = error
        await asyncio.sleep(0.05)
        await manager.stop()
        await engine.stop()
        return engine, outcome

    engine, outcome = asyncio.run(scenario())
    assert outcome is not None and outcome.code == Status.ABORTED and "closed during the turn" in outcome.message
    assert engine.slots.used == 0 and engine.slots.free_slots() == list(range(16))  # each slot back exactly once


def test_a_slot_released_twice_is_freed_once() -> None:
    slots = StateSlots(1, 2, 3, capacity=2)
    first = slots.allocate()
    slots.release(first)
    slots.release(first)  # a bug elsewhere: logged, and the slot is not handed out twice
    assert slots.used == 0 and slots.free_slots() == [0, 1]
    assert {slots.allocate(), slots.allocate()} == {0, 1}
    with pytest.raises(ServiceError):
        slots.allocate()


class CallSizes:
    """A decoder wrapper recording each call's (rows, K)."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.sample, self.inputs = inner, inner.name, inner.sample, inner.inputs
        self.calls: list[tuple[int, int]] = []

    def decode(self, inputs):
        self.calls.append(inputs.draws.shape)
        return self.inner.decode(inputs)


def test_k_ramps_after_a_join_and_each_row_takes_only_what_it_needs() -> None:
    async def scenario():
        engine = new_engine(CountingModel(), max_decode_steps=8, decode_budget_ms=1e6)  # the budget never binds
        sizes = engine.wrap_decoder(CallSizes)
        engine.start()
        first = start(engine, "a", [0], Sampling(temperature=0, max_tokens=40))
        assert await read_all(first) == "b" * 40
        calls_alone = list(sizes.calls)
        sizes.calls.clear()
        short = start(engine, "b", [0], Sampling(temperature=0, max_tokens=3))
        assert await read_all(short) == "bbb"
        result = (calls_alone, list(sizes.calls), first.end, short.end)
        await engine.stop()
        return result, engine

    (alone, short_calls, first, short), engine = asyncio.run(scenario())
    # 1 (measured first), then 2, 4, 8, 8, ... up to the 39 characters left after the first; the last call reads
    # the last character sent and draws one that is not sent
    assert [k for _, k in alone] == [1, 2, 4, 8, 8, 8, 8, 1]
    assert [k for _, k in short_calls] == [1, 2]  # 3 characters: the first from the sampler, 2 more, then done
    assert first.tokens_seen == 41 and h_of(engine, 0) == 41  # the prompt and every character sent
    assert short.tokens_seen == 4


def test_many_running_turns_stretch_every_stream_s_message_interval() -> None:
    engine = new_engine(CountingModel(), stream_messages_per_s=100.0, stream_interval_ms=20.0)
    assert engine.send_interval() == 0.02  # no running turns
    engine._turns.extend([object()] * 10)  # stand-ins: only their number matters
    assert engine.send_interval() == pytest.approx(0.1)  # 10 streams sharing 100 messages a second


class RaisesOnSecondB(CountingModel):
    """Raises on any call in which a row's second character is 'b' (a prompt that fails alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts: list[tuple[int, int]] = []  # every call's tokens shape, failed ones included

    def run(self, inputs):
        tokens = inputs["tokens"]
        self.attempts.append(tokens.shape)
        if tokens.shape[1] >= 2 and (tokens[:, 1] == 1).any():
            raise RuntimeError("bad prompt")
        return super().run(inputs)


def test_prompts_read_together_fail_alone() -> None:
    """Turns that join at once share their prompt reads; the one whose prompt fails ends alone (the others read
    exactly their own prompts) and its state is untouched."""

    async def scenario():
        model = RaisesOnSecondB()
        engine = new_engine(model)
        engine.start()
        async with joining_at_once(engine, len(PROMPTS_ONE_BAD)):
            turns = [start(engine, name, ids, Sampling(temperature=0, max_tokens=4)) for name, ids in PROMPTS_ONE_BAD]
        results = await asyncio.gather(*(read_all(t) for t in turns), return_exceptions=True)
        await engine.stop()
        return engine, model, turns, results

    engine, model, turns, results = asyncio.run(scenario())
    assert results[0] == "bbbb" and results[2] == "bbbb"
    assert isinstance(results[1], ServiceError) and results[1].code is Status.INTERNAL
    assert "model step failed for session bad while reading the prompt: bad prompt" in results[1].message
    assert h_of(engine, turns[0].slot) == 2 + 4 and h_of(engine, turns[2].slot) == 3 + 4
    assert h_of(engine, turns[1].slot) == 0 and turns[1].end.tokens_seen == 0
    # "aa", "ab" and the first two of "aaa" read together; that call raised, so its rows were retried apart
    # ("ab" failing alone), then the third character of "aaa"
    assert model.attempts[:6] == [(3, 2), (1, 2), (2, 2), (1, 2), (1, 2), (1, 1)]


PROMPTS_ONE_BAD = [("good", [0, 0]), ("bad", [0, 1]), ("longer", [0, 0, 0])]


def test_reads_and_turns_taken_together_share_their_prompt_reads() -> None:
    """A session's prompt read (``engine.read``) joins the turns' prompt reads taken at the same time; a read that
    fails alone raises for its caller only and leaves its slot as it was."""

    async def scenario():
        model = RaisesOnSecondB()
        engine = new_engine(model)
        engine.start()
        slots = [engine.slots.allocate() for _ in range(3)]
        async with joining_at_once(engine, 4):
            reads = [
                asyncio.ensure_future(read(engine, slot, ids, name))
                for slot, (name, ids) in zip(slots, [("r0", [0, 0]), ("bad", [0, 1]), ("r2", [0, 0, 0])], strict=True)
            ]
            await asyncio.sleep(0)  # the reads are posted
            turn = start(engine, "t", [0, 0], Sampling(temperature=0, max_tokens=2))
        outcomes = await asyncio.gather(*reads, return_exceptions=True)
        text = await read_all(turn)
        await engine.stop()
        return engine, model, slots, outcomes, text, turn

    engine, model, slots, outcomes, text, turn = asyncio.run(scenario())
    assert outcomes[0] is None and outcomes[2] is None and text == "bb"
    assert isinstance(outcomes[1], ServiceError) and outcomes[1].code is Status.INTERNAL
    assert "session bad while reading the prompt: bad prompt; the prompt was not read" in outcomes[1].message
    assert [h_of(engine, slot) for slot in slots] == [2, 0, 3] and h_of(engine, turn.slot) == 2 + 2
    assert model.attempts[0] == (4, 2)  # all four prompts' first two characters in one call (it raised)


def test_a_slot_lent_to_the_model_thread_is_not_touched_by_the_event_loop() -> None:
    """From submission until the turn's end is visible, the slot is the model thread's: the event loop's reads,
    writes, copies and releases of it raise; at the end it is home again, before the reader sees the end."""

    async def scenario():
        engine, _ = make_engine(buffer=2)
        turn = start(engine, "t", [0], Sampling(temperature=0, max_tokens=5))
        zeros = np.zeros(engine.slots.slot_shape, np.float32)
        refused = []
        for touch in (
            lambda: engine.slots.read(turn.slot),
            lambda: engine.slots.write(turn.slot, zeros, zeros),
            lambda: engine.slots.copy(turn.slot, engine.slots.allocate()),
            lambda: engine.slots.release(turn.slot),
            lambda: engine.submit(turn.slot, np.array([0]), Sampling(max_tokens=1), 0),
        ):
            with pytest.raises(RuntimeError, match="lent to the model thread"):
                touch()
            refused.append(True)
        engine.start()
        text = await read_all(turn)
        state = engine.slots.read(turn.slot)  # home again
        await engine.stop()
        return refused, text, state

    refused, text, state = asyncio.run(scenario())
    assert len(refused) == 5 and text == "bbbbb" and state.h[0, 0, 0] == 6
