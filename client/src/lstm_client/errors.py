"""Typed exceptions: every failed call raises a subclass of ``LstmError`` carrying the gRPC status code, and the
rich details (``google.rpc.Status`` in ``grpc-status-details-bin``) when the server attached them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request (``google.rpc.BadRequest.FieldViolation``)."""

    field: str
    description: str
    reason: str = ""  # the violation's own stable reason, where the server gives one (this server: the error's)


class LstmError(Exception):
    """A call failed; ``code`` is the gRPC status code and ``details`` the server's message.

    From the status's rich details, when present: ``reason`` (``ErrorInfo.reason``, e.g. a machine-readable
    cause), ``field_violations`` (``BadRequest``: which request fields were wrong and why) and ``retry_delay``
    (``RetryInfo``: seconds to wait before trying again); ``None``, ``()`` and ``None`` when absent."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str,
        code: grpc.StatusCode | None = None,
        *,
        reason: str | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(f"{(code or self.code).name}: {details}")
        self.details = details
        if code is not None:
            self.code = code
        self.reason = reason
        self.field_violations = field_violations
        self.retry_delay = retry_delay


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


def rich_details(trailing_metadata: Iterable[tuple[str, Any]] | None) -> dict[str, Any]:
    """``reason``, ``field_violations`` and ``retry_delay`` from a ``google.rpc.Status`` in the trailers (only
    the ones present; nothing from details that do not parse, so they never hide the status itself)."""
    found: dict[str, Any] = {}
    for key, value in trailing_metadata or ():
        if key != DETAILS_KEY:
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return found
        for detail in status.details:
            info, bad, retry = (
                error_details_pb2.ErrorInfo(),
                error_details_pb2.BadRequest(),
                error_details_pb2.RetryInfo(),
            )
            if detail.Unpack(info):
                found["reason"] = info.reason
            elif detail.Unpack(bad):
                found["field_violations"] = tuple(
                    FieldViolation(v.field, v.description, v.reason) for v in bad.field_violations
                )
            elif detail.Unpack(retry):
                found["retry_delay"] = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return found


#: What gRPC says when the peer ends a stream with RST_STREAM INTERNAL_ERROR (HTTP/2 error code 2) instead of a
#: status: what nginx does when the replica behind it is lost after the call's headers went out.
RESET_BY_PEER = "Received RST_STREAM with error code 2"


def from_rpc_error(error: grpc.RpcError) -> LstmError:
    """The typed error for a failed call (sync or asyncio), with its rich details. A stream reset by the peer
    (``RESET_BY_PEER``, which gRPC reports as INTERNAL) is ``Unavailable``: no server answers with a reset, a
    gateway does when it loses the replica serving the call."""
    code, details = error.code(), error.details() or ""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    if code == grpc.StatusCode.INTERNAL and RESET_BY_PEER in details:
        code, details = grpc.StatusCode.UNAVAILABLE, f"the connection to the server was lost mid-call ({details})"
    return _BY_CODE.get(code, LstmError)(details, code, **rich_details(trailers))
