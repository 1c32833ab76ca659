"""A session as the sessions layer holds it, its state as plain values, and its sampling defaults."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

import numpy as np

from ..config import ServerConfig
from ..engine.sampling import Sampling
from ..errors import ServiceError, invalid
from .turn import TurnStream

MAX_SEED = 2**64 - 1


def new_session_id() -> str:
    """128 random bits from the operating system's CSPRNG, as 32 hex digits."""
    return secrets.token_hex(16)


NO_OPTIONS: Mapping[str, Any] = MappingProxyType({})  # one read-only empty mapping for every session without any


def session_options(defaults: dict[str, Any]) -> Mapping[str, Any]:
    """What a Session keeps of its sampling defaults besides the seed (memory: most sessions set none)."""
    options = {k: v for k, v in defaults.items() if k != "seed"}
    return options or NO_OPTIONS


def new_seed() -> int:
    return secrets.randbits(63)


class Phase(Enum):
    """Where a session is in its life; the session manager alone moves it (``SessionManager._move``)."""

    IDLE = "idle"  # in the table, its slot at rest: any call may use it
    BUSY = "busy"  # a prompt read, a save or a fork's copy uses its state: no turn, no eviction
    RUNNING = "running"  # a turn runs on it, until the turn is settled
    CLOSING = "closing"  # out of the table; its turn still runs and frees the slot when it is settled
    CLOSED = "closed"  # out of the table, its slot freed (or freed once the work before it is done)


@dataclass(eq=False, slots=True)
class Session:
    """One conversation with a generation model; its (h, c) lives in the model engine's slot ``slot``.

    Written on the event loop only, by the sessions layer (``phase`` by the session manager only).
    ``revision`` is the session store's revision this copy was loaded or last saved at (0: never saved to a
    durable store). ``seq`` orders the sessions of this process (ListSessions pages through them by it).
    """

    id: str
    model: str
    slot: int
    seed: int
    options: Mapping[str, Any]  # the sampling defaults the client set, but the seed (shared and empty if none)
    tokens_seen: int = 0  # characters the state has read, as of the last turn's end
    has_logits: bool = False  # False until the session has read at least one character
    fresh: bool = False  # made by create and nothing read yet: its slot holds the initial state
    phase: Phase = Phase.IDLE
    turn: TurnStream | None = None  # the running turn, from its start until the session is saved and free
    revision: int = 0
    tenant: str = ""
    seq: int = 0
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)

    @property
    def defaults(self) -> dict[str, Any]:
        """The session's sampling defaults, seed included."""
        return {"seed": self.seed, **self.options}

    @property
    def busy(self) -> bool:
        """A read, a save, a copy or a turn uses its state."""
        return self.phase in (Phase.BUSY, Phase.RUNNING)

    @property
    def closed(self) -> bool:
        return self.phase in (Phase.CLOSING, Phase.CLOSED)

    def live_tokens_seen(self) -> int:
        """``tokens_seen``, counting the characters a running turn has counted so far."""
        return self.turn.tokens_seen() if self.turn is not None else self.tokens_seen

    def touch(self) -> None:
        self.last_used_at = time.time()


@dataclass(frozen=True)
class SessionState:
    """A session's state as plain values: what ExportSession returns, ImportSession takes and a store keeps
    (the api layer turns it into a signed ``SessionState`` message and back)."""

    model: str
    model_version: int
    tokens_seen: int
    h: np.ndarray  # [layers x directions, 1, hidden]
    c: np.ndarray  # [layers x directions, 1, hidden]
    next_logits: np.ndarray | None  # [vocab]; None before the session has read a character
    defaults: dict[str, Any]  # the sampling defaults, seed included
    tenant: str


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

    def refused(name: str, message: str) -> ServiceError:
        """INVALID_SAMPLING, naming the field where the value came from: the request's or the defaults'."""
        return invalid(
            message, reason="INVALID_SAMPLING", field=f"{'sampling' if name in request else 'defaults'}.{name}"
        )

    if not (math.isfinite(sampling.temperature) and sampling.temperature >= 0):
        raise refused(
            "temperature", f"temperature must be a finite number >= 0 (0 is greedy), got {sampling.temperature}"
        )
    if sampling.top_k < 0:
        raise refused("top_k", f"top_k must be >= 0 (0 means no limit), got {sampling.top_k}")
    if not 0 < sampling.top_p <= 1:
        raise refused("top_p", f"top_p must be in (0, 1] (1 means no limit), got {sampling.top_p}")
    if not 0 <= sampling.max_tokens <= config.max_tokens_limit:
        raise refused(
            "max_tokens",
            f"max_tokens must be in [0, {config.max_tokens_limit}] (max_tokens_limit), got {sampling.max_tokens}",
        )
    if len(sampling.stop) > config.max_stop_strings:
        raise refused(
            "stop", f"at most {config.max_stop_strings} stop strings (max_stop_strings), got {len(sampling.stop)}"
        )
    if any(not s or len(s) > 64 for s in sampling.stop):
        raise refused("stop", "stop strings must be 1 to 64 characters long")
    if not 0 <= sampling.seed <= MAX_SEED:
        raise refused("seed", f"seed must be in [0, 2^64 - 1], got {sampling.seed}")
    return sampling
