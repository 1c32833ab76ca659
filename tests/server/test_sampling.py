"""Per-row random streams that ignore the batch, and the probabilities Step returns. (The sampler itself is the
entry's sampler graph: tests/export checks its rule and its distribution.)"""

from __future__ import annotations

import numpy as np

from lstm_server.engine.sampling import as_uint64, softmax, uniforms


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


def test_softmax_sums_to_one() -> None:
    p = softmax(np.array([[1000.0, 0.0, -1000.0]], np.float32))
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
    assert p[0, 0] > 0.999
