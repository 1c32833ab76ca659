"""The project's own status codes and the one exception every layer raises for a caller's mistake or a limit.

No layer below ``api/`` imports grpc: they raise ``ServiceError(Status.X, message, reason=..., field=...,
retry_after_s=...)``, and the api layer's interceptor answers it as the gRPC status of the same name, with
``google.rpc`` details: an ``ErrorInfo`` with the reason, a ``BadRequest`` naming the field, a ``RetryInfo`` when a
retry later may succeed (``api/interceptors.py``; the reasons are listed in docs/observability.md).
"""

from __future__ import annotations

import enum

SHOWN_ID_CHARS = 64
ERROR_DOMAIN = "lstm.v1"  # ErrorInfo.domain: the reasons are this API's
RETRY_AFTER_S = 1.0  # RetryInfo's delay where the same call may succeed later: a load limit, a busy session, a store


class Status(enum.Enum):
    """The status codes the server answers with, named as gRPC names them."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"


class ServiceError(Exception):
    """Answered to the client as ``code`` with ``message`` (what was wrong and how to fix it).

    ``reason``: a stable UPPER_SNAKE name a program can act on (by default the code's name); ``field``: the request
    field at fault, as a path (``sampling.top_p``, ``texts[3]``); ``retry_after_s``: the same call may succeed
    after this long (a limit on load, a busy session, a store that is down)."""

    def __init__(
        self,
        code: Status,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or code.name
        self.field = field
        self.retry_after_s = retry_after_s


def invalid(message: str, *, reason: str | None = None, field: str | None = None) -> ServiceError:
    """INVALID_ARGUMENT with ``message`` (and the request ``field`` it is about, when there is one)."""
    return ServiceError(Status.INVALID_ARGUMENT, message, reason=reason, field=field)


def shown(session_id: str) -> str:
    """A caller-given session id as messages and logs show it: cut short if it is longer than any real id."""
    if len(session_id) <= SHOWN_ID_CHARS:
        return repr(session_id)
    return f"{session_id[:SHOWN_ID_CHARS]!r}... ({len(session_id)} characters)"
