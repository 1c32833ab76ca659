"""Each row's random stream, and a turn's sampling parameters.

A row's random number depends only on its session's seed and position (the
number of characters the session has seen), never on the batch or on how many
characters a call draws: a counter-based generator (two rounds of the
splitmix64 finaliser) turns (seed, position) into a uniform in [0, 1). The
entry's sampler graph (``sample.onnx``, alone or inside ``decode.onnx``) draws
the token from it by inverting the row's cumulative distribution after
temperature, top-k and top-p. The same session therefore samples the same
text alone, in any batch, with any K, across turns, and after an export and
import of its state. Seeds and positions are
taken modulo 2**64 (``as_uint64``): any integer a session holds gives a
stream, none raises.
"""

from __future__ import annotations

from collections.abc import Iterable
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


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling parameters of one turn."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 200
    stop: tuple[str, ...] = ()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities along the last axis, computed in float64, returned as float32."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
