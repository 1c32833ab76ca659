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


def test_a_failed_model_step_ends_its_turns_with_an_error_and_the_engine_keeps_serving() -> None:
    async def scenario():
        model = FailingOnce()
        engine = GenerationEngine("m", model, CharCodec(["a", "b"]), StateSlots(1, 3, 2, 16), 8, 1000, 0.0, Metrics())
        engine.start()
        turns = [
            engine.submit(session(engine, str(i)), np.array([0]), Sampling(temperature=0, max_tokens=50))
            for i in range(3)
        ]
        outcomes = await asyncio.gather(*(read_all(t) for t in turns), return_exceptions=True)
        after = engine.submit(session(engine, "later"), np.array([0]), Sampling(temperature=0, max_tokens=5))
        text = await asyncio.wait_for(read_all(after), 10)
        await engine.stop()
        return outcomes, turns, text

    outcomes, turns, text = asyncio.run(scenario())
    failed = [o for o in outcomes if isinstance(o, ServiceError)]
    assert failed and all(o.code == grpc.StatusCode.INTERNAL and "device lost" in o.message for o in failed)
    assert all(not t.session.busy for t in turns) and text == "bbbbb"


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
