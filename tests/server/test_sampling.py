"""The sampler: greedy, top-k, top-p, per-row random streams that ignore the batch, and the right distribution."""

from __future__ import annotations

import numpy as np

from lstm_server.engine.sampling import as_uint64, sample, softmax, uniforms

from ..reference import sample_one as one_row


def test_uniforms_depend_only_on_seed_and_position() -> None:
    seeds = np.array([1, 2, 1, 1], np.uint64)
    positions = np.array([5, 5, 5, 6], np.uint64)
    u = uniforms(seeds, positions)
    assert u[0] == u[2] and u[0] != u[1] and u[0] != u[3]
    assert uniforms(seeds[:1], positions[:1])[0] == u[0]
    many = uniforms(np.full(20000, 7, np.uint64), np.arange(20000, dtype=np.uint64))
    assert 0 <= many.min() and many.max() < 1 and abs(many.mean() - 0.5) < 0.01


def test_seeds_and_positions_wrap_modulo_2_to_the_64() -> None:
    assert as_uint64([2**64 + 3, -1, 2**63, 7]).tolist() == [3, 2**64 - 1, 2**63, 7]
    u = uniforms(as_uint64([2**64 + 9, 9]), as_uint64([2**64 + 4, 4]))
    assert u[0] == u[1]


def test_temperature_zero_is_argmax() -> None:
    logits = np.random.default_rng(0).standard_normal(30)
    assert one_row(logits, temperature=0.0, seed=3) == logits.argmax()


def test_top_k_one_is_argmax_and_top_k_limits_the_support() -> None:
    logits = np.random.default_rng(1).standard_normal(30).astype(np.float32)
    assert {one_row(logits, top_k=1, seed=s) for s in range(50)} == {int(logits.argmax())}
    top3 = set(np.argsort(-logits)[:3].tolist())
    assert {int(one_row(logits, top_k=3, seed=s, position=p)) for s in range(20) for p in range(20)} <= top3


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    drawn = {int(one_row(logits, top_p=0.7, seed=s, position=p)) for s in range(30) for p in range(30)}
    assert drawn == {0, 1}


def test_draws_follow_the_distribution() -> None:
    probs = np.array([0.6, 0.25, 0.1, 0.05])
    n = 20000
    tokens = sample(
        np.log(np.tile(probs, (n, 1))),
        np.ones(n),
        np.zeros(n, int),
        np.ones(n),
        np.full(n, 11, np.uint64),
        np.arange(n, dtype=np.uint64),
    )
    frequencies = np.bincount(tokens, minlength=4) / n
    np.testing.assert_allclose(frequencies, probs, atol=0.015)


def test_each_row_is_independent_of_the_batch() -> None:
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((16, 40)).astype(np.float32)
    temperature = rng.uniform(0, 2, 16)
    top_k = rng.integers(0, 10, 16)
    top_p = rng.uniform(0.3, 1, 16)
    seeds = rng.integers(0, 2**63, 16).astype(np.uint64)
    positions = rng.integers(0, 1000, 16).astype(np.uint64)
    batched = sample(logits, temperature, top_k, top_p, seeds, positions)
    alone = [
        sample(
            logits[i : i + 1],
            temperature[i : i + 1],
            top_k[i : i + 1],
            top_p[i : i + 1],
            seeds[i : i + 1],
            positions[i : i + 1],
        )[0]
        for i in range(16)
    ]
    assert batched.tolist() == alone


def test_softmax_sums_to_one() -> None:
    p = softmax(np.array([[1000.0, 0.0, -1000.0]], np.float32))
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
    assert p[0, 0] > 0.999
