"""A session's running turn as its caller reads it: the one reader of the engine's channel (``engine/turn.py``).

While the caller reads, ``chunks`` takes the channel's chunks for it; if the caller leaves first (``close``), a
task of its own reads the channel to the end. Either way, at the end the session manager's ``settle`` (count what
the state read, save it, free the session) runs exactly once, in a task the caller's cancellation cannot stop, and
only then does the last chunk go out. One reader at a time: ``close`` starts its task only once the caller's
reading has stopped.

A turn whose caller left (cancelled or closed) settles at the engine's next model call and one save; a new turn on
its session waits for that (``settled_after_caller_left``) rather than being refused as busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from ..engine.turn import Chunk, Turn, TurnEnd
from ..errors import ServiceError
from ..metrics import Metrics

# The longest a new turn waits for the turn its caller left to settle: the next model call and one store save (a
# Redis call times out after 2 s).
LEFT_TURN_WAIT_S = 5.0


@dataclass(frozen=True)
class TurnOutcome:
    """What the turn's last chunk says: its finish reason, or the error that ends the call instead."""

    finish_reason: str
    error: ServiceError | None = None


class TurnStream:
    """The text of one turn for its caller; event loop only."""

    def __init__(
        self,
        turn: Turn,
        settle: Callable[[TurnEnd], Awaitable[TurnOutcome]],
        track: Callable[[asyncio.Task], None],
        metrics: Metrics,
        model: str,
    ) -> None:
        self.turn = turn
        self._settle = settle
        self._track = track  # the session manager keeps every settling task until it is done
        self._settling: asyncio.Task[TurnOutcome] | None = None  # created once, when the end is read
        self._settled = asyncio.Event()  # set once ``settle`` is done: the session is free
        self._left = False  # the caller left (``close``)
        self._reading = False  # the caller is waiting in ``take``
        self._first_token = metrics.time_to_first_token.labels(model)
        self._between_tokens = metrics.inter_token_latency.labels(model)
        self._handed_at: float | None = None  # when the last text went to the reader

    def cancel(self) -> None:
        """Stop generating (safe to call at any time, also after the end)."""
        self.turn.cancel()

    def tokens_seen(self) -> int:
        """The characters the session's state has read or counted so far."""
        return self.turn.progress().tokens_seen

    def close(self) -> asyncio.Task[TurnOutcome] | None:
        """The caller leaves: stop generating, and read the rest of the channel in a task of its own (unless the
        end was read already). Returns the task that settles the turn (None while the caller is still waiting for
        a chunk: it settles the turn itself, or calls this again as it leaves)."""
        self._left = True
        self.turn.cancel()
        if self._settling is None and not self._reading:
            self._begin_settling(self._drain())
        return self._settling

    async def settled_after_caller_left(self, timeout_s: float = LEFT_TURN_WAIT_S) -> bool:
        """If the caller left (the turn was cancelled or closed), wait until the turn is settled, at most
        ``timeout_s``; whether it is. A turn whose caller still reads is not waited for."""
        if not (self._left or self.turn.cancelled):
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout_s)
        return self._settled.is_set()

    def _begin_settling(self, work: Awaitable[TurnOutcome]) -> asyncio.Task[TurnOutcome]:
        self._settling = asyncio.ensure_future(work)
        self._settling.add_done_callback(lambda _: self._settled.set())
        self._track(self._settling)
        return self._settling

    async def _drain(self) -> TurnOutcome:
        while (chunk := await self.turn.take()).end is None:
            pass
        return await self._settle(chunk.end)

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
        """The turn's text, coalesced; the last chunk has ``end`` with the finish reason the caller sees, or the
        turn's error is raised."""
        try:
            while self._settling is None:
                self._reading = True
                try:
                    chunk = await self.turn.take()
                finally:
                    self._reading = False
                if chunk.end is None:
                    yield self._hand(chunk)
                    continue
                outcome = await asyncio.shield(self._begin_settling(self._settle(chunk.end)))
                if outcome.error is not None:
                    raise outcome.error
                yield self._hand(
                    dataclasses.replace(chunk, end=dataclasses.replace(chunk.end, finish_reason=outcome.finish_reason))
                )
        finally:
            self.close()
