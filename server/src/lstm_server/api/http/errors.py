"""Errors over HTTP: the status that answers each code, and the two error bodies.

The statuses are those grpc-gateway gives the same gRPC codes (its ``HTTPStatusFromCode``), so a client sees the
same failure over either transport. The Open Inference Protocol's body is KServe's ``{"error": message}`` (what
tritonclient.http reads) with the lstm.v1 ErrorInfo beside it; the OpenAI-compatible routes answer OpenAI's
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.responses import JSONResponse

from ...errors import ERROR_DOMAIN, ServiceError, Status
from ..interceptors import MAX_FIELD_CHARS, MAX_MESSAGE_CHARS

HTTP_STATUS = {
    Status.INVALID_ARGUMENT: 400,
    Status.FAILED_PRECONDITION: 400,
    Status.UNAUTHENTICATED: 401,
    Status.PERMISSION_DENIED: 403,
    Status.NOT_FOUND: 404,
    Status.ALREADY_EXISTS: 409,
    Status.ABORTED: 409,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.UNIMPLEMENTED: 501,
    Status.UNAVAILABLE: 503,
    Status.INTERNAL: 500,
    Status.DATA_LOSS: 500,
}
OPENAI_TYPES = {  # OpenAI's error types by status
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def http_status(error: ServiceError) -> int:
    """The status for ``error``: its own where it has one (a refusal only HTTP has), else its code's."""
    return getattr(error, "http_status", None) or HTTP_STATUS.get(error.code, 500)


def _headers(error: ServiceError, request_id: str) -> dict[str, str]:
    headers = {"x-request-id": request_id}
    if error.retry_after_s is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after_s)))
    if error.code is Status.UNAUTHENTICATED:
        headers["www-authenticate"] = "Bearer"
    return headers


def error_fields(error: ServiceError) -> dict[str, Any]:
    """The lstm.v1 ErrorInfo of ``error`` as JSON fields."""
    fields: dict[str, Any] = {"code": error.code.name, "reason": error.reason, "domain": ERROR_DOMAIN}
    if error.field:
        fields["field"] = error.field[:MAX_FIELD_CHARS]
    if error.retry_after_s is not None:
        fields["retry_after_s"] = error.retry_after_s
    return fields


def v2_error(error: ServiceError, request_id: str) -> JSONResponse:
    """KServe v2's error body: ``error`` is the message, the other fields are lstm.v1's ErrorInfo."""
    body = {"error": error.message[:MAX_MESSAGE_CHARS], **error_fields(error)}
    return JSONResponse(body, http_status(error), _headers(error, request_id))


def openai_error(error: ServiceError, request_id: str) -> JSONResponse:
    """OpenAI's error body: ``type`` from the status, ``code`` the lstm.v1 reason, ``param`` the field."""
    status = http_status(error)
    body = {
        "error": {
            "message": error.message[:MAX_MESSAGE_CHARS],
            "type": OPENAI_TYPES.get(status, "server_error"),
            "param": (error.field or "")[:MAX_FIELD_CHARS] or None,
            "code": error.reason,
        }
    }
    return JSONResponse(body, status, _headers(error, request_id))
