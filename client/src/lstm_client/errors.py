"""Typed exceptions: every failed call raises a subclass of ``LstmError`` carrying the gRPC status code."""

from __future__ import annotations

import grpc


class LstmError(Exception):
    """A call failed; ``code`` is the gRPC status code and ``details`` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(f"{(code or self.code).name}: {details}")
        self.details = details
        if code is not None:
            self.code = code


class InvalidArgument(LstmError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LstmError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(LstmError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class SessionBusy(LstmError):
    """Another turn is running on the session (ABORTED)."""

    code = grpc.StatusCode.ABORTED


class FailedPrecondition(LstmError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(LstmError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LstmError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LstmError):
    code = grpc.StatusCode.CANCELLED


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        SessionBusy,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
    )
}


def from_rpc_error(error: grpc.RpcError) -> LstmError:
    code = error.code()
    return _BY_CODE.get(code, LstmError)(error.details() or "", code)
