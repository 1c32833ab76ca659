"""The project's own status codes and the one exception every layer raises for a caller's mistake or a limit.

No layer below ``api/`` imports grpc: they raise ``ServiceError(Status.X, message)``, and the api layer's
interceptor answers it as the gRPC status of the same name (``api/interceptors.py``).
"""

from __future__ import annotations

import enum

SHOWN_ID_CHARS = 64


class Status(enum.Enum):
    """The status codes the server answers with, named as gRPC names them."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"


class ServiceError(Exception):
    """Answered to the client as ``code`` with ``message`` (what was wrong and how to fix it)."""

    def __init__(self, code: Status, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServiceError:
    """INVALID_ARGUMENT with ``message``."""
    return ServiceError(Status.INVALID_ARGUMENT, message)


def shown(session_id: str) -> str:
    """A caller-given session id as messages and logs show it: cut short if it is longer than any real id."""
    if len(session_id) <= SHOWN_ID_CHARS:
        return repr(session_id)
    return f"{session_id[:SHOWN_ID_CHARS]!r}... ({len(session_id)} characters)"
