"""The one exception the engine raises for a caller's mistake or a limit: a gRPC status code and a message."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Answered to the client as ``code`` with ``message`` (what was wrong and how to fix it)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
