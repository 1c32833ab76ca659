"""Vectorised next-token sampling where every row has its own parameters and its own random stream.

A row's random number depends only on its session's seed and position (the
number of characters the session has seen), never on the batch: a
counter-based generator (two rounds of the splitmix64 finaliser) turns
(seed, position) into a uniform in [0, 1), and the token is drawn by inverting
the row's cumulative distribution after temperature, top-k and top-p. The
same session therefore samples the same text alone, in any batch, across
turns, and after an export and import of its state. Seeds and positions are
taken modulo 2**64 (``as_uint64``): any integer a session holds gives a
stream, none raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def as_uint64(values: Iterable[int]) -> np.ndarray:
    """Integers as uint64, modulo 2**64 (negative or huge ones wrap instead of raising)."""
    values = list(values)
    try:
        return np.array(values, np.uint64)
    except OverflowError:
        return np.array([int(v) & _MASK64 for v in values], np.uint64)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniforms(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One uniform in [0, 1) per row, a pure function of (seed, position)."""
    with np.errstate(over="ignore"):
        key = _mix(seeds.astype(np.uint64) + _GOLDEN)
        z = _mix(key + (positions.astype(np.uint64) + np.uint64(1)) * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# (logits [batch, vocab], temperature, top_k, top_p, seeds, positions) -> token ids [batch]: ``sample``'s signature
Sampler = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling parameters of one turn."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 200
    stop: tuple[str, ...] = ()


def sample(
    logits: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    seeds: np.ndarray,
    positions: np.ndarray,
) -> np.ndarray:
    """Token ids [batch] from logits [batch, vocab]; temperature 0 is greedy.

    Rows with top-k or top-p draw from their sorted, truncated distribution;
    the others straight from the distribution in vocabulary order (no sort).
    Which way a row goes depends only on its own parameters.
    """
    vocab = logits.shape[1]
    greedy = temperature <= 0
    scaled = logits.astype(np.float64) / np.where(greedy, 1.0, temperature)[:, None]
    weights = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    u = uniforms(seeds, positions)
    tokens = logits.argmax(axis=1)
    truncated = ~greedy & ((top_k > 0) | (top_p < 1))
    plain = ~greedy & ~truncated
    if plain.any():
        rows = np.flatnonzero(plain)
        tokens[rows] = _inverse_cdf(weights[rows], u[rows])
    if truncated.any():
        rows = np.flatnonzero(truncated)
        probs = weights[rows] / weights[rows].sum(axis=1, keepdims=True)
        order = np.argsort(-probs, axis=1, kind="stable")
        ranked = np.take_along_axis(probs, order, axis=1)
        limit = np.where(top_k[rows] > 0, top_k[rows], vocab)[:, None]
        before = np.cumsum(ranked, axis=1) - ranked
        keep = (np.arange(vocab)[None, :] < limit) & (before < top_p[rows][:, None])
        keep[:, 0] = True
        index = _inverse_cdf(np.where(keep, ranked, 0.0), u[rows])
        tokens[rows] = order[np.arange(len(rows)), index]
    return tokens


def _inverse_cdf(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row, the first index whose cumulative weight exceeds u times the total."""
    cumulative = np.cumsum(weights, axis=1)
    index = (cumulative <= (u * cumulative[:, -1])[:, None]).sum(axis=1)
    return np.minimum(index, weights.shape[1] - 1)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities along the last axis, computed in float64, returned as float32."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
