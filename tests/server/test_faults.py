"""Fault containment end to end: one bad session (or text) fails alone, and the others never notice.

A wrapper around a language model's decoder (``engine.wrap_decoder``; the server draws one character per call
here, so a call starts from every state) or a classifier's backend poisons one row of a batched call (it raises,
or writes NaN into the new state); the model thread is held (``engine.paused()``) while every turn is submitted,
so all of them are admitted together and the poisoned row is stepped in one batch with the others. Nothing waits
on time. (tests/server/test_engine.py covers a failure inside a call of several characters.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lstm.v1 import lstm_pb2 as pb

from lstm_server.runtime.model_repository import batch_invariant

from ..serving import Stubs

# prompt, sampling, max_tokens: greedy and seeded sessions side by side
PLANS = [
    ("KING:\nthe ", dict(temperature=0.0), 30),
    ("QUEEN:\nsweet ", dict(temperature=0.0), 30),  # its row raises inside the model call
    ("LORD:\ngood ", dict(temperature=0.9, seed=11), 34),
    ("the king shall ", dict(temperature=1.0, seed=12, top_k=5), 28),
    ("fair day", dict(temperature=0.8, seed=13, top_p=0.9), 32),  # its new state turns NaN
    ("KING:\nhear me", dict(temperature=0.0), 26),
    ("QUEEN:\nlove ", dict(temperature=1.2, seed=14), 30),
]
RAISES, TURNS_NAN = 1, 4
RAISE_AT, NAN_AT = 8, 12  # generated characters read before the failing step


def array_of(tensor: pb.Tensor) -> np.ndarray:
    return np.frombuffer(tensor.data, "<f4").reshape(tuple(tensor.shape))


def same_state(h0: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per batch column of ``h0`` [layers, batch, hidden], whether it is the state ``target`` [layers, 1, hidden]."""
    return np.all(np.abs(h0 - target) <= 1e-5, axis=(0, 2))


class PoisonedCalls:
    """A decoder whose calls fail for the rows that start from one of two states: from ``raise_from`` the call
    raises, from ``nan_from`` that row's new h is NaN. Records what each poisoned row held."""

    def __init__(self, inner, raise_from: np.ndarray, nan_from: np.ndarray) -> None:
        self.inner, self.name, self.sample, self.inputs = inner, inner.name, inner.sample, inner.inputs
        self.raise_from, self.nan_from = raise_from, nan_from
        self.armed = True
        self.seen: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}  # kind -> (h0, c0, batch) at first hit

    def _record(self, kind: str, inputs, hit: np.ndarray) -> None:
        self.seen.setdefault(kind, (inputs.h0[:, hit].copy(), inputs.c0[:, hit].copy(), len(hit)))

    def decode(self, inputs):
        if not self.armed:
            return self.inner.decode(inputs)
        hit = same_state(inputs.h0, self.raise_from)
        if hit.any():
            self._record("raise", inputs, hit)
            raise RuntimeError("poisoned row")
        out = self.inner.decode(inputs)
        hit = same_state(inputs.h0, self.nan_from)
        if hit.any():
            self._record("nan", inputs, hit)
            out.h[:, hit] = np.nan
        return out


def generate(stubs: Stubs, session_id: str, prompt: str, max_tokens: int, sampling: dict):
    """(the text received, the RpcError that ended the call or None)."""
    request = pb.GenerateRequest(
        session_id=session_id, prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens, **sampling)
    )
    text = ""
    try:
        for message in stubs.generation.Generate(request):
            text += message.text
    except grpc.RpcError as error:
        return text, error
    return text, None


def test_poisoned_neighbours_fail_alone_and_keep_their_state(start_server, reference) -> None:
    server = start_server(max_decode_steps=1)
    engine = server.server.models.get("charlm").engine
    expected = [reference.generate(prompt, n, **sampling) for prompt, sampling, n in PLANS]
    _, raise_from, _ = reference.generate(PLANS[RAISES][0], RAISE_AT, **PLANS[RAISES][1])
    _, nan_from, _ = reference.generate(PLANS[TURNS_NAN][0], NAN_AT, **PLANS[TURNS_NAN][1])
    poison = engine.wrap_decoder(lambda decoder: PoisonedCalls(decoder, raise_from, nan_from))
    stubs = Stubs(server.address)
    ids = [stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm")).session_id for _ in PLANS]

    with ThreadPoolExecutor(len(PLANS)) as pool:
        with engine.paused() as wait_for_queued:  # every turn is admitted in one go, then all step together
            futures = [
                pool.submit(generate, stubs, sid, prompt, n, sampling)
                for sid, (prompt, sampling, n) in zip(ids, PLANS, strict=True)
            ]
            assert wait_for_queued(len(PLANS))
        outcomes = [future.result(30) for future in futures]

    for i, ((text, error), (want, h_ref, c_ref)) in enumerate(zip(outcomes, expected, strict=True)):
        if i in (RAISES, TURNS_NAN):
            continue
        assert error is None and text == want, (i, error)
        state = stubs.sessions.ExportSession(pb.ExportSessionRequest(session_id=ids[i]))
        assert state.tokens_seen == len(PLANS[i][0]) + len(want)
        np.testing.assert_allclose(array_of(state.h), h_ref, atol=1e-5)
        np.testing.assert_allclose(array_of(state.c), c_ref, atol=1e-5)

    assert set(poison.seen) == {"raise", "nan"} and min(batch for _, _, batch in poison.seen.values()) >= 5
    for index, kind, at, code, words in (
        (RAISES, "raise", RAISE_AT, grpc.StatusCode.INTERNAL, f"model step failed for session {ids[RAISES]}"),
        (TURNS_NAN, "nan", NAN_AT, grpc.StatusCode.FAILED_PRECONDITION, "non-finite (NaN or infinity)"),
    ):
        text, error = outcomes[index]
        prompt = PLANS[index][0]
        assert error is not None and error.code() == code and words in error.details(), error
        assert f"keeps its state after {len(prompt) + at} characters" in error.details()
        assert expected[index][0][: at + 1].startswith(text)  # at most the character that was not read
        # the failed step was not applied: the exported state is the one that step started from
        state = stubs.sessions.ExportSession(pb.ExportSessionRequest(session_id=ids[index]))
        h0, c0, _ = poison.seen[kind]
        assert state.tokens_seen == len(prompt) + at
        assert np.array_equal(array_of(state.h), h0) and np.array_equal(array_of(state.c), c0)
        logits_ref, _, _ = reference.feed(prompt + expected[index][0][:at])
        np.testing.assert_allclose(array_of(state.next_logits), logits_ref, atol=1e-5)

    # the same continuation fails the same way; once the fault is gone the bad sessions go on as if it never was
    _, error = generate(stubs, ids[TURNS_NAN], "", 5, PLANS[TURNS_NAN][1])
    assert error is not None and error.code() == grpc.StatusCode.FAILED_PRECONDITION
    poison.armed = False
    for index, at in ((RAISES, RAISE_AT), (TURNS_NAN, NAN_AT)):
        prompt, sampling, _ = PLANS[index]
        text, error = generate(stubs, ids[index], "", 10, sampling)
        assert error is None and text == reference.generate(prompt, at + 10, **sampling)[0][at:]

    # and the server serves as before
    health = health_pb2_grpc.HealthStub(stubs.channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    fresh = stubs.sessions.CreateSession(pb.CreateSessionRequest(model="charlm")).session_id
    assert generate(stubs, fresh, PLANS[0][0], 30, PLANS[0][1]) == (expected[0][0], None)
    stubs.channel.close()


class BreaksOnTexts:
    """A classifier backend that raises when one text is in the call and gives NaN logits for another."""

    def __init__(self, inner, raise_on: list[int], nan_on: list[int]) -> None:
        self.inner, self.name, self.device = inner, inner.name, inner.device
        self.raise_on, self.nan_on = raise_on, nan_on
        self.armed = True
        self.calls: list[tuple[int, bool]] = []  # (texts, raised)

    def rows_of(self, inputs, ids: list[int]) -> np.ndarray:
        tokens, lengths = inputs["tokens"], inputs["lengths"]
        return np.array([tokens[r, : lengths[r]].tolist() == ids for r in range(len(tokens))])

    def run(self, inputs):
        raises = self.armed and self.rows_of(inputs, self.raise_on).any()
        self.calls.append((len(inputs["tokens"]), bool(raises)))
        if raises:
            raise RuntimeError("poisoned text")
        logits, h, c = self.inner.run(inputs)
        if self.armed:
            logits = logits.copy()
            logits[self.rows_of(inputs, self.nan_on)] = np.nan
        return logits, h, c


def test_a_text_that_breaks_the_classifier_fails_only_its_caller(start_server) -> None:
    texts = ["wonderful and funny", "dull and lifeless", "the best acting of the year", "a boring , ugly mess"]
    raising, nan = "sweet , smart and touching", "the worst script ever"
    server = start_server(classify_max_batch=6, classify_max_delay_ms=60_000)  # one call, once all six are queued
    model = server.server.models.get("sentiment")
    engine = model.engine
    callers = [[texts[0]], [texts[1], raising], [texts[2]], [nan], [texts[3]]]
    batch = sum(len(c) for c in callers)
    broken = engine.wrap_backend(lambda backend: BreaksOnTexts(backend, engine.encode(raising), engine.encode(nan)))
    stubs = Stubs(server.address)

    def classify(these: list[str]):
        try:
            return stubs.classification.Classify(pb.ClassifyRequest(model="sentiment", texts=these)), None
        except grpc.RpcError as error:
            return None, error

    with ThreadPoolExecutor(len(callers)) as pool:
        outcomes = list(pool.map(classify, callers))
    assert broken.calls[0] == (batch, True)  # all the texts were in the call that raised

    broken.armed = False
    engine.max_batch = 1  # from now on every text is a call of its own
    first_alone = len(broken.calls)

    def alone(text: str) -> dict[str, float]:
        result, error = classify([text])
        assert error is None
        return dict(result.results[0].probabilities)

    for these, (result, error) in zip(callers, outcomes, strict=True):
        if raising in these:
            assert error.code() == grpc.StatusCode.INTERNAL
            assert "texts[1]: the classifier failed on this text: poisoned text" in error.details()
        elif nan in these:
            assert error.code() == grpc.StatusCode.INTERNAL and "not finite (NaN or infinity)" in error.details()
        else:
            assert error is None
            got, expected = dict(result.results[0].probabilities), alone(these[0])
            if batch_invariant(model.entry, model.backend.name):
                assert got == expected  # bitwise what it gets alone
            else:  # an export from before the invariance check: equal up to rounding
                assert got.keys() == expected.keys()
                np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=1e-5, atol=1e-6)
    assert [size for size, _ in broken.calls[first_alone:]] == [1, 1, 1]
    for text in (raising, nan):  # the server serves them again once the fault is gone
        assert sum(alone(text).values()) > 0.99
    stubs.channel.close()
