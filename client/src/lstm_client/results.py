"""Plain results of the client (no protobuf types needed to use them)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from lstm.v1 import lstm_pb2 as pb

from .tensors import TensorLike, as_tensor

FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop"}
UNKNOWN = {
    "reject": pb.UNKNOWN_CHARACTERS_REJECT,
    "skip": pb.UNKNOWN_CHARACTERS_SKIP,
    "replace": pb.UNKNOWN_CHARACTERS_REPLACE,
}


@dataclass(frozen=True)
class ClassifyResult:
    label: str
    probabilities: dict[str, float]


@dataclass(frozen=True)
class Chunk:
    """Part of a generated turn. ``finish_reason`` ('length' or 'stop') is set on the last chunk."""

    text: str
    tokens_seen: int
    finish_reason: str | None = None


@dataclass(frozen=True)
class StepResult:
    """The next-character distribution and the state (h, c) after the text; ``state`` goes into the next step.
    ``tensor_values(result.h)`` reads a state tensor's floats."""

    probabilities: list[float]
    h: pb.Tensor
    c: pb.Tensor

    @property
    def state(self) -> tuple[pb.Tensor, pb.Tensor]:
        return self.h, self.c


def sampling_params(
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    max_tokens: int | None = None,
    stop: list[str] | tuple[str, ...] | str | None = None,
) -> pb.SamplingParams:
    """Only the arguments given are set; the rest fall back to the session's and the server's defaults."""
    values = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed, "max_tokens": max_tokens}
    params = pb.SamplingParams(**{k: v for k, v in values.items() if v is not None})
    if stop:
        params.stop.extend([stop] if isinstance(stop, str) else stop)
    return params


def create_request(model: str, prompt: str, unknown_characters: str, defaults: dict) -> pb.CreateSessionRequest:
    return pb.CreateSessionRequest(
        model=model, prompt=prompt, defaults=sampling_params(**defaults), unknown_characters=UNKNOWN[unknown_characters]
    )


def generate_request(session_id: str, prompt: str, unknown_characters: str, sampling: dict) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        session_id=session_id,
        prompt=prompt,
        sampling=sampling_params(**sampling),
        unknown_characters=UNKNOWN[unknown_characters],
    )


def step_request(
    model: str,
    text: str | None,
    tokens: list[int] | None,
    state: tuple[TensorLike, TensorLike] | None,
    unknown_characters: str,
) -> pb.StepRequest:
    request = pb.StepRequest(model=model, unknown_characters=UNKNOWN[unknown_characters])
    if tokens is not None:
        request.tokens.ids.extend(tokens)
    else:
        request.text = text or ""
    if state is not None:
        request.h.CopyFrom(as_tensor(state[0]))
        request.c.CopyFrom(as_tensor(state[1]))
    return request


def step_result(response: pb.StepResponse) -> StepResult:
    return StepResult(list(response.probabilities), response.h, response.c)


def session_metadata(session_id: str = "") -> tuple[tuple[str, str], ...]:
    """Sent with every call of a session, so a gateway can route them all to one replica. Without an id (a
    session being created or imported) it proposes a new random one, so even that first call lands on the
    replica that will serve the session."""
    return (("x-session-id", session_id or secrets.token_hex(16)),)


def chunk_of(response: pb.GenerateResponse | pb.ChatResponse) -> Chunk:
    return Chunk(response.text, response.tokens_seen, FINISH.get(response.finish_reason))


def classify_results(response: pb.ClassifyResponse) -> list[ClassifyResult]:
    return [ClassifyResult(r.label, dict(r.probabilities)) for r in response.results]


def replica_of(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "x-replica":
            return value
    return None
