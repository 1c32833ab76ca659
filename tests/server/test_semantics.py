"""DESIGN.md section 5, each semantic its own test, end to end over loopback."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from lstm_client import AsyncClient, Client, SessionBusy

from ..serving import array_of

PROMPT = "KING:\nthe good "
FREED_WITHIN_S = 30  # a cancelled turn frees its session at the next model call: at once, unless the machine is swamped


def collect(session, prompt: str = "", **sampling) -> str:
    return "".join(chunk.text for chunk in session.generate(prompt, **sampling))


def state_of(session):
    state = session.export()
    return array_of(state.h).ravel(), array_of(state.c).ravel()


def test_32_concurrent_seeded_sessions_equal_alone_and_the_in_process_model(server, reference) -> None:
    settings = [
        dict(
            temperature=[0.0, 0.7, 1.0, 1.3][i % 4],
            top_k=[0, 5][i % 2],
            top_p=[1.0, 0.9][i // 16],
            seed=1000 + i,
            max_tokens=40 + i,
        )
        for i in range(32)
    ]

    async def run_all() -> list[str]:
        async with AsyncClient(server.address) as client:

            async def one(params) -> str:
                async with client.session(model="charlm", prompt=PROMPT) as session:
                    return "".join([chunk.text async for chunk in session.generate(**params)])

            return await asyncio.gather(*(one(p) for p in settings))

    registry = server.server.metrics.registry
    steps_before = registry.get_sample_value("lstm_batch_size_count", {"model": "charlm"}) or 0
    rows_before = registry.get_sample_value("lstm_batch_size_sum", {"model": "charlm"}) or 0
    together = asyncio.run(run_all())
    steps = registry.get_sample_value("lstm_batch_size_count", {"model": "charlm"}) - steps_before
    rows = registry.get_sample_value("lstm_batch_size_sum", {"model": "charlm"}) - rows_before
    assert rows / steps > 4, f"sessions were not batched: {rows} rows in {steps} steps"
    with Client(server.address) as client:
        for params, text in zip(settings, together, strict=True):
            with client.session(model="charlm", prompt=PROMPT) as session:
                alone = collect(session, **params)
            expected, _, _ = reference.generate(
                PROMPT, params["max_tokens"], **{k: v for k, v in params.items() if k != "max_tokens"}
            )
            assert text == alone == expected, params


def test_turns_are_invisible(server, reference) -> None:
    with Client(server.address) as client:
        with client.session(model="charlm", prompt=PROMPT, seed=5, temperature=0.9) as two_turns:
            first = collect(two_turns, max_tokens=25)
            second = collect(two_turns, "\nQUEEN:\n", max_tokens=30)
            h2, c2 = state_of(two_turns)
        with client.session(model="charlm", prompt=PROMPT + first + "\nQUEEN:\n", seed=5, temperature=0.9) as one_go:
            assert collect(one_go, max_tokens=30) == second
            h1, c1 = state_of(one_go)
    np.testing.assert_allclose(h1, h2, atol=1e-5)
    np.testing.assert_allclose(c1, c2, atol=1e-5)
    _, h_ref, _ = reference.feed(PROMPT + first + "\nQUEEN:\n" + second)
    np.testing.assert_allclose(h2, h_ref.ravel(), atol=1e-5)


def test_state_is_exactly_the_text_seen(server, reference) -> None:
    with Client(server.address) as client, client.session(model="charlm", prompt=PROMPT, seed=2) as session:
        text = collect(session, max_tokens=17)
        assert session.refresh().tokens_seen == len(PROMPT) + 17
        h, c = state_of(session)
    _, h_ref, c_ref = reference.feed(PROMPT + text)
    np.testing.assert_allclose(h, h_ref.ravel(), atol=1e-5)
    np.testing.assert_allclose(c, c_ref.ravel(), atol=1e-5)


def test_fork_copies_the_state_and_then_diverges_independently(server) -> None:
    with Client(server.address) as client, client.session(model="charlm", prompt=PROMPT, seed=9) as original:
        collect(original, max_tokens=10)
        with original.fork() as fork:
            assert fork.id != original.id and fork.refresh().tokens_seen == original.refresh().tokens_seen
            from_fork = collect(fork, "the ", max_tokens=20, seed=3)
            collect(fork, max_tokens=50)  # the fork moves on; the original must not notice
            assert collect(original, "the ", max_tokens=20, seed=3) == from_fork


def test_export_import_round_trip(server) -> None:
    with Client(server.address) as client, client.session(model="charlm", prompt=PROMPT, seed=4) as session:
        collect(session, max_tokens=12)
        state = session.export()
        with session.fork() as twin:
            expected = collect(twin, max_tokens=30)
        restored = client.import_session(state)
        assert restored.refresh().tokens_seen == state.tokens_seen and restored.id != session.id
        assert collect(restored, max_tokens=30) == expected
        restored.close()


def test_cancellation_mid_stream_leaves_a_defined_state(server, reference) -> None:
    with Client(server.address) as client, client.session(model="charlm", prompt=PROMPT, seed=21) as session:
        received = ""
        stream = session.generate(max_tokens=3000, temperature=1.0)
        for chunk in stream:
            received += chunk.text
            if len(received) >= 20:
                break
        stream.close()  # cancels the call
        deadline = time.time() + FREED_WITHIN_S
        while session.refresh().busy and time.time() < deadline:
            time.sleep(0.01)
        info = session.refresh()
        assert not info.busy, "a cancelled turn must free its session"
        generated = info.tokens_seen - len(PROMPT)
        assert len(received) <= generated <= len(received) + server.config.stream_buffer_chars
        expected_text, h_ref, c_ref = reference.generate(PROMPT, generated, seed=21)
        assert expected_text.startswith(received)
        h, c = state_of(session)
        np.testing.assert_allclose(h, h_ref.ravel(), atol=1e-5)
        np.testing.assert_allclose(c, c_ref.ravel(), atol=1e-5)
        assert collect(session, max_tokens=5)  # and the session keeps working


def test_deadline_frees_the_session_and_others_keep_being_served(server) -> None:
    with Client(server.address) as client:
        slow = client.session(model="charlm", prompt=PROMPT)
        with pytest.raises(Exception) as raised:
            collect(slow, max_tokens=4000, timeout=0.05)
        assert raised.value.code.name == "DEADLINE_EXCEEDED"
        with client.session(model="charlm", prompt=PROMPT) as other:
            assert len(collect(other, max_tokens=10)) == 10
        deadline = time.time() + FREED_WITHIN_S
        while slow.refresh().busy and time.time() < deadline:
            time.sleep(0.01)
        assert not slow.refresh().busy
        slow.close()


def test_a_busy_session_refuses_a_second_turn(server) -> None:
    with Client(server.address) as client, client.session(model="charlm", prompt=PROMPT) as session:
        stream = session.generate(max_tokens=4000)
        next(stream)
        with pytest.raises(SessionBusy, match="busy with another turn"):
            collect(session, max_tokens=5)
        stream.close()


def test_padding_is_invisible_for_classification(server) -> None:
    texts = ["a gorgeous , moving film", "dull", "the worst script ever , a boring , ugly mess", "sweet"]
    with Client(server.address) as client:
        together = client.classify(texts)
        results: dict[int, object] = {}

        def alone(i: int) -> None:
            results[i] = client.classify([texts[i]])[0]

        threads = [threading.Thread(target=alone, args=(i,)) for i in range(len(texts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for i, result in enumerate(together):
        assert result.label == results[i].label
        for label, p in result.probabilities.items():
            assert p == pytest.approx(results[i].probabilities[label], abs=1e-6)
