"""Checking and converting request fields: sampling parameters, texts, tensors and session state."""

from __future__ import annotations

import hashlib
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


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


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
    return sampling


def check_prompt(text: str, config: ServerConfig, what: str = "prompt") -> None:
    if len(text) > config.max_prompt_chars:
        raise invalid(f"{what} has {len(text)} characters; the limit is {config.max_prompt_chars} (max_prompt_chars)")


def to_tensor(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(shape=list(array.shape), values=array.ravel().tolist())


def from_tensor(tensor: pb.Tensor, shape: tuple[int, ...], name: str) -> np.ndarray:
    if tuple(tensor.shape) != shape or len(tensor.values) != math.prod(shape):
        raise invalid(
            f"{name} must have shape {list(shape)} with {math.prod(shape)} values, got shape {list(tensor.shape)} "
            f"with {len(tensor.values)} values"
        )
    array = np.asarray(tensor.values, dtype=np.float32).reshape(shape)
    if not np.isfinite(array).all():
        raise invalid(f"{name} holds NaN or infinite values")
    return array


def state_checksum(state: pb.SessionState) -> str:
    """sha256 over every field of an exported state but the checksum itself."""
    unsigned = pb.SessionState()
    unsigned.CopyFrom(state)
    unsigned.checksum = ""
    return hashlib.sha256(unsigned.SerializeToString(deterministic=True)).hexdigest()
