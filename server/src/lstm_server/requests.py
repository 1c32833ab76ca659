"""Checking and converting request fields: sampling parameters, texts, tensors and session state."""

from __future__ import annotations

import math
from typing import Any

import grpc
import numpy as np
from lstm.v1 import lstm_pb2 as pb

from .codec import REJECT, REPLACE, SKIP
from .config import ServerConfig
from .errors import ServiceError
from .sampling import Sampling

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "seed", "max_tokens")
UNKNOWN_POLICY = {
    pb.UNKNOWN_CHARACTERS_UNSPECIFIED: REJECT,
    pb.UNKNOWN_CHARACTERS_REJECT: REJECT,
    pb.UNKNOWN_CHARACTERS_SKIP: SKIP,
    pb.UNKNOWN_CHARACTERS_REPLACE: REPLACE,
}
FINISH_REASON = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP}
MAX_TOKENS_SEEN = 2**53  # far beyond any real session; keeps counts exact in float64 and int64 everywhere
MAX_SEED = 2**64 - 1
SHOWN_ID_CHARS = 64
FLOAT32_LE = np.dtype("<f4")


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def shown(session_id: str) -> str:
    """A session id as messages and logs show it: cut short if it is longer than any real id."""
    if len(session_id) <= SHOWN_ID_CHARS:
        return repr(session_id)
    return f"{session_id[:SHOWN_ID_CHARS]!r}... ({len(session_id)} characters)"


def unknown_policy(value: int) -> str:
    """The rule for unknown characters; INVALID_ARGUMENT for a number outside the enum."""
    policy = UNKNOWN_POLICY.get(value)
    if policy is None:
        names = ", ".join(f"{pb.UnknownCharacters.Name(v)} ({v})" for v in UNKNOWN_POLICY)
        raise invalid(f"unknown_characters {value} is not one of {names}")
    return policy


def sampling_dict(params: pb.SamplingParams) -> dict[str, Any]:
    """The fields a client set (unset ones fall through to the next level of defaults)."""
    values: dict[str, Any] = {name: getattr(params, name) for name in SAMPLING_FIELDS if params.HasField(name)}
    if params.stop:
        values["stop"] = list(params.stop)
    return values


def sampling_proto(values: dict[str, Any]) -> pb.SamplingParams:
    return pb.SamplingParams(**values)


def resolve_sampling(request: dict[str, Any], defaults: dict[str, Any], config: ServerConfig) -> Sampling:
    """Request over session defaults over server defaults, checked against the limits."""
    merged = {"max_tokens": config.default_max_tokens, **defaults, **request}
    sampling = Sampling(
        temperature=float(merged.get("temperature", 1.0)),
        top_k=int(merged.get("top_k", 0)),
        top_p=float(merged.get("top_p", 1.0)),
        seed=int(merged["seed"]),
        max_tokens=int(merged["max_tokens"]),
        stop=tuple(merged.get("stop", ())),
    )
    if not (math.isfinite(sampling.temperature) and sampling.temperature >= 0):
        raise invalid(f"temperature must be a finite number >= 0 (0 is greedy), got {sampling.temperature}")
    if sampling.top_k < 0:
        raise invalid(f"top_k must be >= 0 (0 means no limit), got {sampling.top_k}")
    if not 0 < sampling.top_p <= 1:
        raise invalid(f"top_p must be in (0, 1] (1 means no limit), got {sampling.top_p}")
    if not 0 <= sampling.max_tokens <= config.max_tokens_limit:
        raise invalid(
            f"max_tokens must be in [0, {config.max_tokens_limit}] (max_tokens_limit), got {sampling.max_tokens}"
        )
    if len(sampling.stop) > config.max_stop_strings:
        raise invalid(f"at most {config.max_stop_strings} stop strings (max_stop_strings), got {len(sampling.stop)}")
    if any(not s or len(s) > 64 for s in sampling.stop):
        raise invalid("stop strings must be 1 to 64 characters long")
    if not 0 <= sampling.seed <= MAX_SEED:
        raise invalid(f"seed must be in [0, 2^64 - 1], got {sampling.seed}")
    return sampling


def check_prompt(text: str, config: ServerConfig, what: str = "prompt") -> None:
    if len(text) > config.max_prompt_chars:
        raise invalid(f"{what} has {len(text)} characters; the limit is {config.max_prompt_chars} (max_prompt_chars)")


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """float32 values as raw little-endian bytes, row-major."""
    return pb.Tensor(shape=list(array.shape), data=np.ascontiguousarray(array, FLOAT32_LE).tobytes())


def from_tensor(tensor: pb.Tensor, shape: tuple[int, ...], name: str, bound: float | None = None) -> np.ndarray:
    """The tensor as a float32 array of exactly ``shape``, finite and (if given) within [-bound, bound]."""
    size = math.prod(shape)
    if tuple(tensor.shape) != shape or len(tensor.data) != 4 * size:
        raise invalid(
            f"{name} must have shape {list(shape)} and {4 * size} bytes of data ({size} little-endian float32), "
            f"got shape {list(tensor.shape)[:8]} and {len(tensor.data)} bytes"
        )
    array = np.frombuffer(tensor.data, FLOAT32_LE).reshape(shape).astype(np.float32)
    if not np.isfinite(array).all():
        raise invalid(f"{name} holds NaN or infinite values")
    if bound is not None and np.abs(array).max(initial=0.0) > bound:
        raise invalid(f"{name} holds values beyond +-{bound:g}, which no run of the model can produce")
    return array
