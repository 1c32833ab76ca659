"""Sequences of the Open Inference Protocol as sessions: the sequence parameters of a request, the session a
sequence is, and the order its requests run in.

A sequence is a session of the caller's tenant whose id is derived from (tenant, model, sequence id) with the
server's state-signing key: the same on every replica, so with the Redis store another replica finds it, and
different for every tenant, so one tenant's sequence id never reaches another's session. Requests of one
sequence run one after another, in the order they arrived (``SequenceQueue``), not refused as busy: clients
pipeline them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from tritonclient.grpc import service_pb2 as ip

from ..errors import shown
from .open_inference_models import bad_parameter, bool_parameter, parameter

SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


@dataclass(frozen=True)
class SequenceFlags:
    """A request's sequence id (None: the request is a sequence of its own) and its start and end flags."""

    id: int | str | None
    start: bool
    end: bool

    def shown(self) -> str:
        return f"sequence {shown(self.id) if isinstance(self.id, str) else self.id}"


def sequence_flags(parameters: Mapping[str, ip.InferParameter]) -> SequenceFlags:
    """The request's ``sequence_id`` (int64, uint64 or string; 0 and "" mean none), ``sequence_start`` and
    ``sequence_end``."""
    sequence_id = parameter(parameters, "sequence_id")
    if sequence_id is not None and (isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str)):
        raise bad_parameter("sequence_id", f"parameter sequence_id must be an integer or a string, got {sequence_id!r}")
    return SequenceFlags(
        sequence_id if sequence_id not in (None, 0, "") else None,
        bool_parameter(parameters, "sequence_start"),
        bool_parameter(parameters, "sequence_end"),
    )


def sequence_session_id(key: bytes, tenant: str, model: str, sequence_id: int | str) -> str:
    """The session a sequence is: 32 hex digits of HMAC-SHA256, with the server's state-signing key, over
    (tenant, model, sequence id). Replicas share the key, so they derive the same id; nobody without it can
    derive another tenant's, to take or probe it through lstm.v1. An integer id and its decimal string are
    different sequences."""
    return hmac.new(key, json.dumps([tenant, model, sequence_id]).encode(), hashlib.sha256).hexdigest()[:32]


@dataclass(eq=False)
class Place:
    """A request's place in its sequence's queue: ``wait`` until every earlier request has left, ``leave`` when
    done (the next one goes once this one and every earlier one have left)."""

    queue: SequenceQueue
    key: str
    previous: asyncio.Future | None
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    left: bool = False

    async def wait(self) -> None:
        if self.previous is not None:
            await asyncio.shield(self.previous)  # being cancelled must not cancel the earlier request's place

    def leave(self, after: asyncio.Future | None = None) -> None:
        """Let the next request go, once ``after`` (if given) and every earlier request are done; only the first
        call counts."""
        if self.left:
            return
        self.left = True
        waiting = [f for f in (self.previous, after) if f is not None and not f.done()]
        if waiting:
            asyncio.gather(*waiting, return_exceptions=True).add_done_callback(lambda _: self._finish())
        else:
            self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        self.queue.forget(self)


class SequenceQueue:
    """First come, first served per sequence (its session id), across every stream and call of the server."""

    def __init__(self) -> None:
        self._last: dict[str, asyncio.Future] = {}

    def join(self, key: str) -> Place:
        """A place behind every request of ``key`` that joined before (call it in arrival order)."""
        place = Place(self, key, self._last.get(key))
        self._last[key] = place.done
        return place

    def forget(self, place: Place) -> None:
        if self._last.get(place.key) is place.done:
            del self._last[place.key]
