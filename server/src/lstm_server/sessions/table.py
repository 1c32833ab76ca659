"""The session table: this process's sessions by id, an owner (tenant) each, global and per-tenant limits, idle
expiry, and the rule that a session runs one turn at a time."""

from __future__ import annotations

import collections
import heapq
import itertools
import time

from ..errors import RETRY_AFTER_S, ServiceError, Status, shown
from .session import Session


class SessionTable:
    """All sessions of a server, by id, and what each tenant holds and runs."""

    def __init__(
        self, max_sessions: int, idle_timeout_s: float, tenant_max_sessions: int = 2**62, tenant_max_turns: int = 2**62
    ) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.tenant_max_sessions = tenant_max_sessions
        self.tenant_max_turns = tenant_max_turns
        self._sessions: dict[str, Session] = {}
        self._per_model: collections.Counter[str] = collections.Counter()
        self._per_tenant: dict[str, dict[str, Session]] = {}  # in the order they were added (seq)
        self._turns: collections.Counter[str] = collections.Counter()
        self._seq = itertools.count(1)

    def __len__(self) -> int:
        return len(self._sessions)

    def check_capacity(self, tenant: str) -> None:
        if len(self._sessions) >= self.max_sessions:
            raise ServiceError(
                Status.RESOURCE_EXHAUSTED,
                f"session limit reached: max_sessions is {self.max_sessions}; close idle sessions or raise "
                "--max-sessions",
                reason="SESSION_LIMIT",
            )
        if len(self._per_tenant.get(tenant, ())) >= self.tenant_max_sessions:
            raise ServiceError(
                Status.RESOURCE_EXHAUSTED,
                f"tenant {tenant!r} holds {self.tenant_max_sessions} sessions, its limit (tenant_max_sessions); "
                "close some of them",
                reason="TENANT_SESSION_LIMIT",
            )

    def add(self, session: Session) -> None:
        self.check_capacity(session.tenant)
        session.seq = next(self._seq)
        self._sessions[session.id] = session
        self._per_model[session.model] += 1
        self._per_tenant.setdefault(session.tenant, {})[session.id] = session

    def count(self, model: str) -> int:
        """Sessions of ``model`` in the table."""
        return self._per_model[model]

    def not_found(self, session_id: str) -> ServiceError:
        return ServiceError(
            Status.NOT_FOUND,
            f"no session {shown(session_id)}: it was closed, expired after {self.idle_timeout_s:g} s idle, or "
            "never existed; create a new one (or import its exported state)",
            reason="SESSION_NOT_FOUND",
            field="session_id",
        )

    def page(self, tenant: str, model: str, after: int, size: int) -> tuple[list[Session], int]:
        """Up to ``size`` of the tenant's sessions (of ``model``, if given) added after ``seq`` ``after``, and
        the ``seq`` to continue after (0: this is the last page)."""
        found = (
            s for s in self._per_tenant.get(tenant, {}).values() if s.seq > after and (not model or s.model == model)
        )
        taken = list(itertools.islice(found, size + 1))
        if len(taken) > size:
            return taken[:size], taken[size - 1].seq
        return taken, 0

    def start_turn(self, tenant: str) -> None:
        """Count a turn against the tenant's concurrent-turn limit (RESOURCE_EXHAUSTED past it)."""
        if self._turns[tenant] >= self.tenant_max_turns:
            raise ServiceError(
                Status.RESOURCE_EXHAUSTED,
                f"tenant {tenant!r} runs {self.tenant_max_turns} turns at once, its limit (tenant_max_turns); "
                "wait for one to finish",
                reason="TENANT_TURN_LIMIT",
                retry_after_s=RETRY_AFTER_S,
            )
        self._turns[tenant] += 1

    def end_turn(self, tenant: str) -> None:
        self._turns[tenant] -= 1
        if not self._turns[tenant]:
            del self._turns[tenant]

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
                Status.ABORTED,
                f"session {session_id} is busy with another turn; wait for that turn to finish (or cancel it) "
                "and retry",
                reason="SESSION_BUSY",
                retry_after_s=RETRY_AFTER_S,
            )
        return session

    def remove(self, session_id: str) -> Session:
        """Take the session out of the table (the manager marks it closed and frees its slot)."""
        session = self.get(session_id)
        del self._sessions[session_id]
        self._per_model[session.model] -= 1
        owned = self._per_tenant[session.tenant]
        del owned[session_id]
        if not owned:
            del self._per_tenant[session.tenant]
        return session

    def sessions(self, model: str = "") -> list[Session]:
        return [s for s in self._sessions.values() if not model or s.model == model]

    def least_recently_used(self, n: int) -> list[Session]:
        """Up to ``n`` idle sessions, least recently used first."""
        return heapq.nsmallest(n, (s for s in self._sessions.values() if not s.busy), key=lambda s: s.last_used_at)

    def expired(self, idle_s: float) -> list[Session]:
        """Sessions idle longer than ``idle_s`` and not in a turn."""
        now = time.time()
        return [s for s in self._sessions.values() if not s.busy and now - s.last_used_at > idle_s]
