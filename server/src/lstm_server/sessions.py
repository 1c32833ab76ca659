"""Sessions: unguessable ids, a global limit, idle expiry, and the rule that a session runs one turn at a time."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from .errors import ServiceError


def new_session_id() -> str:
    """128 random bits from the operating system's CSPRNG, as 32 hex digits."""
    return secrets.token_hex(16)


def new_seed() -> int:
    return secrets.randbits(63)


@dataclass(eq=False, slots=True)
class Session:
    """One conversation with a generation model; its (h, c) lives in the model's StateSlots at ``slot``.

    ``revision`` is the session store's revision this copy was loaded or last saved at (0: not in a store).
    """

    id: str
    model: str
    slot: int
    defaults: dict[str, Any]  # sampling defaults; always holds a seed
    tokens_seen: int = 0
    has_logits: bool = False  # False until the session has read at least one character
    busy: bool = False
    closed: bool = False
    turn: Any = None  # the running turn, if any
    revision: int = 0
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)

    def touch(self) -> None:
        self.last_used_at = time.time()


class SessionTable:
    """All sessions of a server, by id."""

    def __init__(self, max_sessions: int, idle_timeout_s: float) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def check_capacity(self) -> None:
        if len(self._sessions) >= self.max_sessions:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"session limit reached: max_sessions is {self.max_sessions}; close idle sessions or raise "
                "--max-sessions",
            )

    def add(self, session: Session) -> None:
        self.check_capacity()
        self._sessions[session.id] = session

    def not_found(self, session_id: str) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.NOT_FOUND,
            f"no session {session_id!r}: it was closed, expired after {self.idle_timeout_s:g} s idle, or never "
            "existed; create a new one (or import its exported state)",
        )

    def find(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise self.not_found(session_id)
        return session

    def idle(self, session_id: str) -> Session:
        """The session, if no turn is using it (ABORTED otherwise): fork and export need its state still."""
        session = self.get(session_id)
        if session.busy:
            raise ServiceError(
                grpc.StatusCode.ABORTED,
                f"session {session_id} is busy with another turn; wait for that turn to finish (or cancel it) "
                "and retry",
            )
        return session

    def acquire(self, session_id: str) -> Session:
        """The idle session, marked busy for one turn."""
        session = self.idle(session_id)
        session.busy = True
        session.touch()
        return session

    def remove(self, session_id: str) -> Session:
        """Take the session out of the table (its engine marks it closed and frees its slot)."""
        session = self.get(session_id)
        del self._sessions[session_id]
        return session

    def sessions(self, model: str = "") -> list[Session]:
        return [s for s in self._sessions.values() if not model or s.model == model]

    def expired(self, now: float | None = None, idle_s: float | None = None) -> list[Session]:
        """Sessions idle longer than ``idle_s`` (default: the idle timeout) and not in a turn."""
        now = time.time() if now is None else now
        idle_s = self.idle_timeout_s if idle_s is None else idle_s
        return [s for s in self._sessions.values() if not s.busy and now - s.last_used_at > idle_s]
