"""A session's running turn as the sessions layer holds it: the engine's turn, and the outcome its lifecycle
settles once the session is saved and free again (``SessionManager._run_turn``)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..engine.generation import Chunk, Turn
from ..errors import ServiceError
from ..metrics import Metrics


@dataclass(frozen=True)
class TurnOutcome:
    """What the turn's last message says: its finish reason, or the error that ends the call instead."""

    finish_reason: str
    error: ServiceError | None = None


class SessionTurn:
    """The text of one turn for its reader; the last message waits until the session is saved and free."""

    def __init__(self, turn: Turn, metrics: Metrics, model: str) -> None:
        self.turn = turn
        self.settled: asyncio.Future[TurnOutcome] = asyncio.get_running_loop().create_future()
        self._first_token = metrics.time_to_first_token.labels(model)
        self._between_tokens = metrics.inter_token_latency.labels(model)
        self._handed_at: float | None = None  # when the last text went to the reader

    def cancel(self) -> None:
        """Stop generating (safe to call at any time, also after the end)."""
        self.turn.cancel()

    def tokens_seen(self) -> int:
        """The characters the session's state has read or counted so far."""
        return self.turn.progress().tokens_seen

    def settle(self, outcome: TurnOutcome) -> None:
        if not self.settled.done():
            self.settled.set_result(outcome)

    def _hand(self, chunk: Chunk) -> Chunk:
        """Time a chunk with text as the reader gets it: the first since the turn's start, the others since the
        one before."""
        if chunk.text:
            now = time.perf_counter()
            if self._handed_at is None:
                self._first_token.observe(now - self.turn.submitted_at)
            else:
                self._between_tokens.observe(now - self._handed_at)
            self._handed_at = now
        return chunk

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The turn's text, coalesced; the last chunk carries the finish reason, or the turn's error is raised."""
        async for chunk in self.turn.chunks():
            if not chunk.last:
                yield self._hand(chunk)
                continue
            outcome = await asyncio.shield(self.settled)  # the session is saved and free
            if outcome.error is not None:
                raise outcome.error
            yield self._hand(dataclasses.replace(chunk, finish_reason=outcome.finish_reason, last=True))
