"""When a ``generate`` turn is sent again (``Session.generate``, ``AsyncSession.generate``; docs/client.md).

A turn is resent only when all of these hold: no message of its stream arrived (not even one character); it failed
with UNAVAILABLE (a replica that refused or lost the call, directly or through the gateway: ``errors.RESET_BY_PEER``);
fewer than ``retries`` resends were made; time is left before the turn's deadline; and, after a random wait of up to
``backoff * 2**n`` seconds, GetSession shows the session idle with the count it had before the turn. The server
saves a turn's state only when the turn ends (a cancelled one included), so an unchanged count means no state of
that turn was saved: a replica that died with it lost it, and a save it might still attempt fails the store's
revision check once the resent turn has saved.

The idempotent unary calls (``transport.IDEMPOTENT``) are also resent by the client when they were lost mid-call
(``lost_mid_call``), up to ``retries`` times after the same waits; gRPC's policy resends the rest of their failures.
"""

from __future__ import annotations

import random
import time

import grpc
from lstm.v1 import lstm_pb2 as pb

from .errors import RESET_BY_PEER, LstmError


class Deadline:
    """A turn's deadline over all its attempts (``None``: none)."""

    def __init__(self, timeout: float | None) -> None:
        self._at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self._at is None else self._at - time.monotonic()

    def passed(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0


def lost_mid_call(failure: LstmError) -> bool:
    """The call reached a server and the connection was lost during it (``errors.RESET_BY_PEER``): what gRPC's own
    retry policy never resends, since the server's headers had arrived."""
    return failure.code == grpc.StatusCode.UNAVAILABLE and RESET_BY_PEER in failure.details


def worth_resending(failure: LstmError, received: bool, attempt: int, retries: int, deadline: Deadline) -> bool:
    """Whether a turn that failed with ``failure`` (``received``: a message of it arrived) may be resent, once the
    session is checked (``unchanged``)."""
    return not received and failure.code == grpc.StatusCode.UNAVAILABLE and attempt < retries and not deadline.passed()


def wait_before(attempt: int, backoff: float) -> float:
    """Seconds to wait before the ``attempt``-th resend (from 0): random, up to ``backoff * 2**attempt``."""
    return random.uniform(0, backoff * 2**attempt)


def unchanged(info: pb.Session, tokens_seen: int) -> bool:
    """The session is idle and has read exactly what it had before the turn."""
    return not info.busy and info.tokens_seen == tokens_seen
