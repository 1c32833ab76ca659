"""Conversions between protobuf messages and the plain values the layers below work with: tensors, sampling
parameters, finish reasons, Session messages and page tokens. (Session states: ``state.py``.)"""

from __future__ import annotations

import base64
import contextlib
import math
from typing import Any

import numpy as np
from lstm.v1 import lstm_pb2 as pb

from ..engine.turn import LENGTH, STOP, TurnEnd
from ..errors import invalid
from ..sessions.session import Session

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "seed", "max_tokens")
FINISH_REASONS = {LENGTH: pb.FINISH_REASON_LENGTH, STOP: pb.FINISH_REASON_STOP}
FLOAT32_LE = np.dtype("<f4")


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """float32 values as raw little-endian bytes, row-major."""
    return pb.Tensor(shape=list(array.shape), data=np.ascontiguousarray(array, FLOAT32_LE).tobytes())


def from_tensor(tensor: pb.Tensor, shape: tuple[int, ...], name: str, bound: float | None = None) -> np.ndarray:
    """The tensor as a float32 array of exactly ``shape``, finite and (if given) within [-bound, bound]."""
    size = math.prod(shape)
    if tuple(tensor.shape) != shape or len(tensor.data) != 4 * size:
        raise invalid(
            f"{name} must have shape {list(shape)} and {4 * size} bytes of data ({size} little-endian float32), "
            f"got shape {list(tensor.shape)[:8]} and {len(tensor.data)} bytes",
            reason="INVALID_TENSOR",
            field=name,
        )
    array = np.frombuffer(tensor.data, FLOAT32_LE).reshape(shape).astype(np.float32)
    if not np.isfinite(array).all():
        raise invalid(f"{name} holds NaN or infinite values", reason="INVALID_TENSOR", field=name)
    if bound is not None and np.abs(array).max(initial=0.0) > bound:
        raise invalid(
            f"{name} holds values beyond +-{bound:g}, which no run of the model can produce",
            reason="INVALID_TENSOR",
            field=name,
        )
    return array


def sampling_dict(params: pb.SamplingParams) -> dict[str, Any]:
    """The fields a client set (unset ones fall through to the next level of defaults)."""
    values: dict[str, Any] = {name: getattr(params, name) for name in SAMPLING_FIELDS if params.HasField(name)}
    if params.stop:
        values["stop"] = list(params.stop)
    return values


def sampling_params(values: dict[str, Any]) -> pb.SamplingParams:
    return pb.SamplingParams(**values)


def finish_reason(end: TurnEnd | None) -> int:
    """The FinishReason of a chunk's end (UNSPECIFIED before the last chunk)."""
    return FINISH_REASONS.get(end.finish_reason if end is not None else None, pb.FINISH_REASON_UNSPECIFIED)


def session_message(session: Session, model_version: int) -> pb.Session:
    return pb.Session(
        session_id=session.id,
        model=session.model,
        model_version=model_version,
        tokens_seen=session.live_tokens_seen(),
        defaults=sampling_params(session.defaults),
        busy=session.busy,
        created_at=session.created_at,
        last_used_at=session.last_used_at,
        tenant=session.tenant,
    )


def page_token(seq: int) -> str:
    """The token of the page after ``seq`` ("" when there is none)."""
    return base64.urlsafe_b64encode(f"after:{seq}".encode()).decode() if seq else ""


def page_after(token: str) -> int:
    """The position a page token continues after (0 for the first page)."""
    if not token:
        return 0
    with contextlib.suppress(ValueError):
        kind, _, seq = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind == "after" and seq.isdigit():
            return int(seq)
    raise invalid(
        "page_token is not one this server gave: pass the next_page_token of the previous page",
        reason="INVALID_PAGE",
        field="page_token",
    )
