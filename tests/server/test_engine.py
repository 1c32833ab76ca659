"""The scheduler with a stand-in model: backpressure, coalescing and fairness, without gRPC."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from lstm_server.codec import CharCodec
from lstm_server.errors import ServiceError
from lstm_server.generation import GenerationEngine
from lstm_server.metrics import Metrics
from lstm_server.sampling import Sampling
from lstm_server.sessions import NO_OPTIONS, Session
from lstm_server.state import StateSlots


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


def make_engine(buffer: int = 5, max_batch: int = 8) -> tuple[GenerationEngine, CountingModel]:
    model = CountingModel()
    engine = GenerationEngine(
        "m", model, CharCodec(["a", "b"]), StateSlots(1, 3, 2, 16), max_batch, buffer, 0.0, Metrics()
    )
    return engine, model


def session(engine: GenerationEngine, name: str) -> Session:
    return Session(name, "m", engine.slots.allocate(), 1, NO_OPTIONS, busy=True)


async def read_all(turn) -> str:
    return "".join([chunk.text async for chunk in turn.chunks()])


def test_a_stalled_reader_pauses_its_turn_and_nobody_else() -> None:
    async def scenario():
        engine, _ = make_engine(buffer=5)
        engine.start()
        stalled = engine.submit(session(engine, "s"), np.array([0]), Sampling(temperature=0, max_tokens=100))
        other = engine.submit(session(engine, "o"), np.array([0]), Sampling(temperature=0, max_tokens=60))
        assert await asyncio.wait_for(read_all(other), 10) == "b" * 60  # not held back by the stalled one
        await asyncio.sleep(0.05)
        assert stalled.session.tokens_seen == 1 + 5 and not stalled.complete  # paused at the buffer limit
        assert stalled.outbox_chars == 5
        text = await asyncio.wait_for(read_all(stalled), 10)  # reading again resumes it
        await engine.stop()
        return text, stalled

    text, stalled = asyncio.run(scenario())
    assert text == "b" * 100 and stalled.session.tokens_seen == 101 and not stalled.session.busy
    slots = stalled.engine.slots
    assert slots.h[0, stalled.session.slot, 0] == 101  # the state read exactly the 101 characters


def test_turns_share_steps_and_max_batch_is_respected() -> None:
    async def scenario():
        engine, model = make_engine(buffer=1000, max_batch=3)
        engine.start()
        turns = [
            engine.submit(session(engine, str(i)), np.array([0]), Sampling(temperature=0, max_tokens=30))
            for i in range(5)
        ]
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
        turn = engine.submit(session(engine, "c"), np.array([0, 0]), Sampling(temperature=0, max_tokens=1000))
        await asyncio.sleep(0.05)  # paused at the buffer limit
        turn.cancel()
        text = await asyncio.wait_for(read_all(turn), 10)
        await engine.stop()
        return text, turn

    text, turn = asyncio.run(scenario())
    assert text == "bbb" and turn.complete and not turn.session.busy
    assert turn.session.tokens_seen == 2 + 3
    assert turn.engine.slots.h[0, turn.session.slot, 0] == 5  # every counted character was fed


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
    """One greedy turn per (name, prompt ids, c marker), then one more, on a fresh engine: (outcomes, sessions,
    engine)."""

    async def scenario():
        engine = GenerationEngine("m", model, CharCodec(["a", "b"]), StateSlots(1, 3, 2, 16), 8, 1000, 0.0, Metrics())
        turns = []
        for name, ids, marker in sessions_and_prompts:
            made = session(engine, name)
            engine.slots.c[0, made.slot, 0] = marker
            turns.append(engine.submit(made, np.array(ids), Sampling(temperature=0, max_tokens=max_tokens)))
        engine.start()  # after the submissions: every turn is admitted before the first step
        outcomes = await asyncio.gather(*(read_all(t) for t in turns), return_exceptions=True)
        after = engine.submit(session(engine, "later"), np.array([0]), Sampling(temperature=0, max_tokens=5))
        outcomes.append(await asyncio.wait_for(read_all(after), 10))
        await engine.stop()
        return outcomes, [t.session for t in turns], engine

    return asyncio.run(scenario())


def test_a_batched_step_that_fails_is_retried_apart_and_nobody_notices() -> None:
    model = FailingOnce()
    outcomes, made, engine = run_turns(model, [(str(i), [0], 0.0) for i in range(3)], max_tokens=50)
    assert model.failed and outcomes == ["b" * 50] * 3 + ["bbbbb"]
    assert all(s.tokens_seen == 51 and engine.slots.h[0, s.slot, 0] == 51 and not s.busy for s in made)


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
    assert isinstance(raises, ServiceError) and raises.code == grpc.StatusCode.INTERNAL
    assert f"model step failed for session {made[1].id}: kernel exploded" in raises.message
    assert "keeps its state after 5 characters" in raises.message
    assert isinstance(nan, ServiceError) and nan.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "non-finite (NaN or infinity)" in nan.message and "keeps its state after 5 characters" in nan.message
    for bad in (made[1], made[3]):  # the failed step was not applied, and the count says so
        assert bad.tokens_seen == 5 and engine.slots.h[0, bad.slot, 0] == 5 and not bad.busy
    assert [s.tokens_seen for s in (made[0], made[2], made[4])] == [31, 33, 31]
    assert max(model.batches) == 5  # they were stepped together


def test_a_row_whose_sampling_raises_fails_alone_and_its_step_is_not_applied() -> None:
    model = CountingModel()

    async def scenario():
        engine = GenerationEngine("m", model, CharCodec(["a", "b"]), StateSlots(1, 3, 2, 16), 8, 1000, 0.0, Metrics())
        sample = engine._sample

        def flaky_sample(turns, logits, positions=None):
            if any(t.session.id == "bad" and t.session.tokens_seen >= 4 for t in turns):
                raise FloatingPointError("bad draw")
            return sample(turns, logits, positions)

        engine._sample = flaky_sample
        made = [session(engine, name) for name in ("good", "bad", "also-good")]
        turns = [engine.submit(s, np.array([0]), Sampling(temperature=0, max_tokens=20)) for s in made]
        engine.start()
        outcomes = await asyncio.gather(*(read_all(t) for t in turns), return_exceptions=True)
        await engine.stop()
        return outcomes, made, engine

    (good, bad, also_good), made, engine = asyncio.run(scenario())
    assert good == also_good == "b" * 20
    assert isinstance(bad, ServiceError) and bad.code == grpc.StatusCode.INTERNAL
    assert bad.message.startswith("sampling failed for session bad: bad draw; the step was not applied")
    assert made[1].tokens_seen == 3 and engine.slots.h[0, made[1].slot, 0] == 3  # as before the failed step


class NanAfterPrompt(CountingModel):
    """Any call that reads more than one character at once turns the state NaN; single steps are fine."""

    def run(self, inputs):
        logits, h, c = super().run(inputs)
        if inputs["tokens"].shape[1] > 1:
            c = c + np.inf
        return logits, h, c


def test_a_prompt_or_step_that_turns_non_finite_changes_nothing() -> None:
    async def scenario():
        engine = GenerationEngine(
            "m", NanAfterPrompt(), CharCodec(["a", "b"]), StateSlots(1, 3, 2, 16), 8, 1000, 0.0, Metrics()
        )
        engine.start()
        s = session(engine, "p")
        await engine.read(s, np.array([0]))  # one character: fine
        errors = []
        for call in (
            lambda: engine.read(s, np.array([0, 1])),
            lambda: read_all(engine.submit(s, np.array([0, 1, 0]), Sampling(temperature=0, max_tokens=3))),
            lambda: engine.step(np.array([0, 0]), np.zeros((1, 1, 3), np.float32), np.zeros((1, 1, 3), np.float32)),
        ):
            try:
                await call()
            except ServiceError as error:
                errors.append(error)
        s.busy = True
        text = await read_all(engine.submit(s, np.array([1]), Sampling(temperature=0, max_tokens=3)))
        await engine.stop()
        return s, engine, errors, text

    s, engine, errors, text = asyncio.run(scenario())
    assert [e.code for e in errors] == [grpc.StatusCode.FAILED_PRECONDITION] * 3
    assert "the prompt was not read" in errors[0].message and "after 1 characters" in errors[1].message
    assert "nothing was kept" in errors[2].message
    assert text == "bbb" and s.tokens_seen == 1 + 1 + 3 and engine.slots.h[0, s.slot, 0] == 5


def test_sampling_positions_past_2_to_the_64_wrap_instead_of_failing_the_batch() -> None:
    async def scenario():
        engine, _ = make_engine(buffer=1000)
        engine.start()
        huge, normal = session(engine, "huge"), session(engine, "normal")
        huge.tokens_seen = 2**64 - 2
        turns = [
            engine.submit(s, np.array([0]), Sampling(temperature=1.0, seed=2**64 - 1, max_tokens=6))
            for s in (huge, normal)
        ]
        texts = await asyncio.gather(*(read_all(t) for t in turns))
        await engine.stop()
        return texts, huge

    texts, huge = asyncio.run(scenario())
    assert [len(t) for t in texts] == [6, 6] and huge.tokens_seen == 2**64 + 5


def test_closing_a_session_mid_turn_aborts_the_stream_and_frees_the_slot_once() -> None:
    async def scenario():
        engine, _ = make_engine(buffer=4)
        engine.start()
        closing = session(engine, "x")
        turn = engine.submit(closing, np.array([0]), Sampling(temperature=0, max_tokens=1000))
        await asyncio.sleep(0.05)
        engine.close(closing)
        engine.close(session(engine, "idle-one"))  # an idle session is freed at once
        try:
            await asyncio.wait_for(read_all(turn), 10)
            outcome = None
        except ServiceError as error:
            outcome = error
        await asyncio.sleep(0.05)
        await engine.stop()
        return engine, outcome

    engine, outcome = asyncio.run(scenario())
    assert (
        outcome is not None and outcome.code == grpc.StatusCode.ABORTED and "closed during the turn" in outcome.message
    )
    assert engine.slots.used == 0 and sorted(engine.slots._free) == list(range(16))  # each slot back exactly once
