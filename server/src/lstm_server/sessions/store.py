"""Where a session's state lives between turns: the store protocol, and the memory store.

Every store answers the same calls, so the session manager has one path: it
asks the store for a session's revision before using its cached copy, saves
the state at the end of every turn, and deletes it on close. Two stores:

- ``MemoryStore`` (``session_store = "memory"``, the default): the session
  table is the only copy. A session is "in the store" while it is in the table
  and not idle past the idle timeout; saves keep nothing and never encode the
  state; nothing can be loaded back. It is not ``durable``: a session that
  leaves memory is gone, so the manager never evicts one to save memory.
- ``RedisSessionStore`` (``redis_store.py``): shared by replicas, survives
  restarts, ``durable``: the table is a cache of it.

The state a store keeps is bytes the sessions layer cannot read (a signed
``SessionState`` message): the api layer encodes and decodes it, through the
``StateCodec`` the manager is given when the server is assembled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .session import SessionState
from .table import SessionTable


@dataclass
class StoredSession:
    revision: int
    state: bytes  # a serialized SessionState
    created_at: float
    tenant: str


@dataclass
class SessionSummary:
    """What a save writes besides the state itself."""

    model: str
    model_version: int
    tokens_seen: int
    created_at: float
    tenant: str


class SessionStore(Protocol):
    """A home for session states (see the module docstring for the rules)."""

    durable: bool  # a session evicted from memory can be loaded back

    async def connect(self, timeout_s: float) -> None:
        """Wait until the store answers, retrying for up to ``timeout_s``; raise if it never does."""

    async def revision(self, session_id: str, tenant: str) -> int | None:
        """The stored revision if ``tenant`` owns the session, else None (no such session, or another tenant's);
        it keeps the owner's session alive, and nobody else's."""

    async def load(self, session_id: str) -> StoredSession | None: ...

    async def tenant(self, session_id: str) -> str | None:
        """The owner of a stored session (None: no such session), read without its state."""

    async def save(
        self, session_id: str, state: Callable[[], bytes], summary: SessionSummary, expected_revision: int
    ) -> int:
        """Write ``state()`` over ``expected_revision`` (0: the session must be new) and return the new revision;
        ALREADY_EXISTS, ABORTED (another writer got there first) or NOT_FOUND (the session is gone) otherwise.
        ``state`` is called at most once, only by a store that keeps the bytes."""

    async def delete(self, session_id: str) -> None: ...

    async def close(self) -> None: ...


class StateCodec(Protocol):
    """Session states as the bytes a store keeps (implemented by the api layer: ``api/state.py``)."""

    def encode(self, state: SessionState) -> bytes: ...

    def decode(self, data: bytes, tenant: str, session_id: str) -> SessionState:
        """The state ``tenant``'s session ``session_id`` stored: DATA_LOSS if it is damaged or not signed by this
        deployment, and the checks of an imported state."""


class MemoryStore:
    """No store beyond this process: the table's copy is the only one (see the module docstring)."""

    durable = False

    def __init__(self, table: SessionTable, idle_timeout_s: float) -> None:
        self.table = table
        self.idle_timeout_s = idle_timeout_s

    async def connect(self, timeout_s: float) -> None:
        return None

    async def revision(self, session_id: str, tenant: str) -> int | None:
        """The table's revision of the tenant's session; None if it has none, or one idle past the timeout."""
        session = self.table.find(session_id)
        if session is None or session.tenant != tenant or time.time() - session.last_used_at > self.idle_timeout_s:
            return None
        return session.revision

    async def load(self, session_id: str) -> StoredSession | None:
        return None

    async def tenant(self, session_id: str) -> str | None:
        return None  # only asked about sessions the table does not hold: there are none

    async def save(
        self, session_id: str, state: Callable[[], bytes], summary: SessionSummary, expected_revision: int
    ) -> int:
        return expected_revision

    async def delete(self, session_id: str) -> None:
        return None

    async def close(self) -> None:
        return None
