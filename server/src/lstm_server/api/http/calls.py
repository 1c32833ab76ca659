"""What every HTTP request gets, as the gRPC interceptor gives every call: a request id (``x-request-id``, echoed),
the replica's name (``x-replica``), a server span, the request counted and timed by route, code and model, a log
line, a bounded body that must arrive in time, and its tenant."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.requests import Request

from ... import tracing
from ...errors import ServiceError, Status
from ...logs import bind
from ...metrics import Metrics
from ..auth import Authenticator
from ..interceptors import request_id

log = logging.getLogger("lstm_server.http")
JSON_TYPES = ("application/json", "application/octet-stream")  # octet-stream: the binary tensor extension


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """An endpoint's OpenAPI description of a required JSON body (for routes that read their body themselves)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class HttpRefusal(ServiceError):
    """A refusal that only HTTP has (a body too large or too slow, a content type): its own status."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(Status.INVALID_ARGUMENT, message, reason=reason)
        self.http_status = status


def outcome(request: Request, code: str, reason: str = "") -> None:
    """Record how the request ended (for its count and log line)."""
    request.state.outcome = (code, reason)


def set_model(request: Request, model: str) -> None:
    request.state.model = model


class Calls:
    """ASGI middleware around every HTTP request (the event loop runs it; each request's state lives in its
    scope)."""

    def __init__(self, app: Any, metrics: Metrics, replica: str) -> None:
        self.app = app
        self.metrics = metrics
        self.replica = replica.encode("latin-1", "replace")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", ())]
        rid = request_id(headers)
        state = scope.setdefault("state", {})
        state.update(request_id=rid, outcome=("OK", ""), model="")
        bind(request_id=rid, method=f"{scope['method']} {scope['path'][:100]}")
        span = tracing.start_call(f"HTTP {scope['method']}", headers, rid)
        status = [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                extra = [(b"x-request-id", rid.encode()), (b"x-replica", self.replica)]
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self._finish(scope, state, status[0], started, span)

    def _finish(self, scope: dict, state: dict, status: int, started: float, span: Any) -> None:
        route = scope.get("route")
        method = f"HTTP {getattr(route, 'name', None) or 'unrouted'}"
        code, reason = state["outcome"]
        if code == "OK" and status >= 400:
            code = "INTERNAL" if status >= 500 else "INVALID_ARGUMENT"
        seconds = time.perf_counter() - started
        self.metrics.count_request(method, code, state["model"], seconds, reason)
        level = logging.DEBUG if code in ("OK", "CANCELLED") else logging.WARNING
        extra = {"method": method, "code": code, "status": status, "ms": round(1e3 * seconds, 2)}
        log.log(level, "http", extra=extra)
        if span is not None:
            span.set_attribute("http.response.status_code", status)
            span.set_attribute("http.route", getattr(route, "path", ""))
            span.end()


async def read_body(request: Request, limit: int, timeout_s: float, types: tuple[str, ...] = JSON_TYPES) -> bytes:
    """The request's body: of a content type in ``types`` (or none), at most ``limit`` bytes (413), all of it
    within ``timeout_s`` (408)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind not in types:
        raise HttpRefusal(
            415, f"content type {kind[:100]!r} is not accepted here: send {types[0]}", "UNSUPPORTED_MEDIA"
        )
    declared = request.headers.get("content-length", "")
    too_large = HttpRefusal(
        413,
        f"the request body is larger than {limit} bytes (--max-message-bytes): send less in one request",
        "BODY_TOO_LARGE",
    )
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise HttpRefusal(
            408, f"the request body did not arrive within {timeout_s:g} s (--http-body-timeout-s)", "BODY_TIMEOUT"
        ) from None
    return b"".join(chunks)


def tenant(request: Request, authenticator: Authenticator) -> str:
    """The request's tenant (UNAUTHENTICATED without valid credentials)."""
    who = authenticator.tenant_of(request.headers.items(), [], "header")
    bind(tenant=who)
    return who
