"""A session's running turn as the sessions layer holds it: the engine's turn, and the outcome its lifecycle
settles once the session is saved and free again (``SessionManager._run_turn``)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..engine.generation import Chunk, Turn
from ..errors import ServiceError


@dataclass(frozen=True)
class TurnOutcome:
    """What the turn's last message says: its finish reason, or the error that ends the call instead."""

    finish_reason: str
    error: ServiceError | None = None


class SessionTurn:
    """The text of one turn for its reader; the last message waits until the session is saved and free."""

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.settled: asyncio.Future[TurnOutcome] = asyncio.get_running_loop().create_future()

    def cancel(self) -> None:
        """Stop generating (safe to call at any time, also after the end)."""
        self.turn.cancel()

    def tokens_seen(self) -> int:
        """The characters the session's state has read or counted so far."""
        return self.turn.progress().tokens_seen

    def settle(self, outcome: TurnOutcome) -> None:
        if not self.settled.done():
            self.settled.set_result(outcome)

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The turn's text, coalesced; the last chunk carries the finish reason, or the turn's error is raised."""
        async for chunk in self.turn.chunks():
            if not chunk.last:
                yield chunk
                continue
            outcome = await asyncio.shield(self.settled)  # the session is saved and free
            if outcome.error is not None:
                raise outcome.error
            yield dataclasses.replace(chunk, finish_reason=outcome.finish_reason, last=True)
