"""Cross-cutting concerns for every RPC of this server's own services: request ids, authentication, requests that
do not parse, errors as gRPC statuses with ``google.rpc`` details, trace spans, metrics, logs, the replica's name.
Health, reflection and the Open Inference Protocol's liveness and readiness pass through without any of it (load
balancers call them without credentials), except that a request that does not parse is INVALID_ARGUMENT there
too."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import NoReturn

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry.trace import StatusCode

from .. import tracing
from ..errors import ERROR_DOMAIN, SHOWN_ID_CHARS, ServiceError, Status
from ..logs import bind, call_fields
from ..metrics import Metrics
from .auth import Authenticator

log = logging.getLogger("lstm_server.rpc")
# open to anyone, untouched but for requests that do not parse: health and reflection, and the Open Inference
# Protocol's liveness and readiness (which, like health, say nothing of models or sessions: probes need no token;
# ModelReady names models, so it is checked)
PASS_THROUGH = (
    "/grpc.health.",
    "/grpc.reflection.",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)
MAX_MESSAGE_CHARS = 2000  # status details travel in trailers, which a peer may cap at 8 KiB
MAX_DESCRIPTION_CHARS = 500  # a field violation's description: the message says the rest
MAX_FIELD_CHARS = 200  # a field's path (it may hold a caller's key, as parameters.<name>)
REQUEST_ID = "x-request-id"
REQUEST_ID_FORM = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces; anything else gets a new id
# request fields put on the call's log lines (lstm.v1; the Open Inference Protocol's model_name, and name in its
# metadata, config and readiness requests)
LOGGED_FIELDS = {"model": "model", "model_name": "model", "name": "model", "session_id": "session"}
# codes that are the server's fault: the server span is marked as an error (OpenTelemetry's gRPC conventions)
SERVER_FAULTS = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}
# counted per request, not per call: a stream's own failure is counted, its end otherwise not
COUNTED_PER_REQUEST = {"ModelStreamInfer"}
QUIET_CODES = {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}  # the rpc line at DEBUG; errors at WARNING
_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")
_call: contextvars.ContextVar[_Call] = contextvars.ContextVar("lstm_call")
# a made request id: this process's random 64 bits, then a counter (unique without a system call per request)
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count()


def status_code(status: Status) -> grpc.StatusCode:
    """The gRPC status code of the same name."""
    return grpc.StatusCode[status.name]


def caller() -> str:
    """The tenant of the call being served (set by the interceptor before the servicer runs)."""
    return _tenant.get()


def count_request(model: str, started: float, code: str = "OK", reason: str = "") -> None:
    """Count one request of the current call's stream (a method in ``COUNTED_PER_REQUEST``), which named
    ``model``, arrived at ``started`` (``time.perf_counter()``) and ended now with ``code`` (``reason``: its
    error's)."""
    call = _call.get(None)
    if call is not None:
        call.interceptor.metrics.count_request(call.method, code, model, time.perf_counter() - started, reason)


def request_id(metadata) -> str:
    """The caller's ``x-request-id`` if it is 1 to 128 printable ASCII characters without spaces, else a new one:
    32 hex digits, 16 random per process and 16 counting its requests."""
    for key, value in metadata or ():
        if key == REQUEST_ID and isinstance(value, str) and REQUEST_ID_FORM.fullmatch(value):
            return value
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def error_status(error: ServiceError) -> grpc.Status:
    """The status that answers ``error``: its code and message (cut to ``MAX_MESSAGE_CHARS``), with an
    ``ErrorInfo`` (its reason; its field in the metadata), a ``BadRequest`` naming the field of an
    INVALID_ARGUMENT, and a ``RetryInfo`` when a retry after a delay may succeed."""
    code = status_code(error.code)
    message = error.message[:MAX_MESSAGE_CHARS]
    field = (error.field or "")[:MAX_FIELD_CHARS]
    details = [
        error_details_pb2.ErrorInfo(
            reason=error.reason, domain=ERROR_DOMAIN, metadata={"field": field} if field else {}
        )
    ]
    if field and error.code is Status.INVALID_ARGUMENT:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=field, description=message[:MAX_DESCRIPTION_CHARS], reason=error.reason
        )
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if error.retry_after_s is not None:
        delay = Duration()
        delay.FromNanoseconds(round(error.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request message that could not be parsed (answered INVALID_ARGUMENT, not UNKNOWN)."""

    error: str


def _tolerant(deserialize: Callable | None) -> Callable | None:
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as error:  # protobuf's DecodeError, or anything a damaged message makes it raise
            return Malformed(str(error) or type(error).__name__)

    return parse


def _check_parsed(request, method: str):
    if isinstance(request, Malformed):
        raise ServiceError(
            Status.INVALID_ARGUMENT,
            f"the {method} request is not a valid message of its type ({request.error[:200]}): check that the "
            f"client's stubs match this server's {method.rsplit('/', 1)[0].lstrip('/')} service",
            reason="MALFORMED_REQUEST",
        )
    return request


async def _checked_stream(requests: AsyncIterator, method: str) -> AsyncIterator:
    async for request in requests:
        yield _check_parsed(request, method)


def _parsed_only(behavior: Callable, method: str, streaming_requests: bool) -> Callable:
    """``behavior`` (a coroutine or async generator function, as the aio server calls it) behind a check that its
    requests parsed: one that does not is INVALID_ARGUMENT, with nothing else of the interceptor's."""
    check = _checked_stream if streaming_requests else _check_parsed
    if inspect.isasyncgenfunction(behavior):

        async def streamed(request, context):
            try:
                async for response in behavior(check(request, method), context):
                    yield response
            except ServiceError as error:
                await context.abort_with_status(error_status(error))

        return streamed

    async def awaited(request, context):
        try:
            return await behavior(check(request, method), context)
        except ServiceError as error:
            await context.abort_with_status(error_status(error))

    return awaited


def _request_fields(request) -> dict[str, str]:
    """The model and session a request names, for the call's log lines."""
    fields = {}
    for name, key in LOGGED_FIELDS.items():
        value = getattr(request, name, None)
        if value and isinstance(value, str):
            fields[key] = value[:SHOWN_ID_CHARS]
    return fields


class _Call:
    """One call as the interceptor follows it: its request id, start, server span; how it ends."""

    def __init__(self, interceptor: ServiceInterceptor, full_method: str, context: grpc.aio.ServicerContext) -> None:
        self.started = time.perf_counter()
        self.interceptor = interceptor
        self.method = full_method.rsplit("/", 1)[-1]
        metadata = context.invocation_metadata() or ()
        self.request_id = request_id(metadata)
        bind(request_id=self.request_id, method=self.method)
        _call.set(self)
        self.span = tracing.start_call(full_method.lstrip("/"), metadata, self.request_id)

    def admit(self, request, context: grpc.aio.ServicerContext, streaming_requests: bool):
        """Authenticate the call and check its request; returns the request (or request stream) to serve."""
        tenant = self.interceptor.authenticator.tenant(context)
        _tenant.set(tenant)
        if streaming_requests:
            bind(tenant=tenant)
            return _checked_stream(request, self.method)
        bind(tenant=tenant, **_request_fields(request))  # a Malformed request names no fields
        return _check_parsed(request, self.method)

    def finish(self, code: grpc.StatusCode, message: str = "", reason: str = "") -> None:
        """Count, time, log and end the span of the call, which ends with ``code`` (``reason``: its error's)."""
        seconds = time.perf_counter() - self.started
        if self.method not in COUNTED_PER_REQUEST or code not in QUIET_CODES:
            model = call_fields().get("model", "")
            self.interceptor.metrics.count_request(self.method, code.name, model, seconds, reason)
        level = logging.DEBUG if code in QUIET_CODES else logging.WARNING
        extra = {"method": self.method, "code": code.name, "ms": round(1e3 * seconds, 2), "error": message}
        log.log(level, "rpc", extra=extra)
        if self.span is not None:
            self.span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in SERVER_FAULTS:
                self.span.set_status(StatusCode.ERROR, message or code.name)
            self.span.end()

    async def fail(self, context: grpc.aio.ServicerContext, error: Exception) -> NoReturn:
        """End the call with the status that answers ``error`` (INTERNAL for anything but a ``ServiceError``),
        the request id in its trailers too."""
        if not isinstance(error, ServiceError):
            log.error("unexpected error in %s", self.method, exc_info=error)
            error = ServiceError(Status.INTERNAL, f"internal error in {self.method}: {error}")
        status = error_status(error)
        self.finish(status.code, status.details, error.reason)
        trailers = (*status.trailing_metadata, (REQUEST_ID, self.request_id))
        await context.abort_with_status(status._replace(trailing_metadata=trailers))


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """For every call of this server's own services: a request id (``x-request-id``, echoed in the initial
    metadata and an error's trailers, on every log line), a server span, authentication (its tenant is
    ``caller()``), requests that do not parse refused, ``ServiceError`` answered as its status with details, the
    call counted and timed by method, code and model and logged, and the replica's name as ``x-replica``."""

    def __init__(self, metrics: Metrics, replica: str, authenticator: Authenticator) -> None:
        self.metrics = metrics
        self.replica = replica
        self.authenticator = authenticator

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return handler
        streaming = handler.response_streaming
        behavior = (
            handler.unary_stream or handler.stream_stream if streaming else handler.unary_unary or handler.stream_unary
        )
        if details.method.startswith(PASS_THROUGH):
            if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
                return handler  # not an aio behavior: nothing here can wrap it
            wrapped = _parsed_only(behavior, details.method, handler.request_streaming)
        else:
            wrap = self._wrap_stream if streaming else self._wrap_unary
            wrapped = wrap(behavior, details.method, handler.request_streaming)
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, streaming)]
        return factory(
            wrapped,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    async def _begin(self, full_method: str, context: grpc.aio.ServicerContext) -> _Call:
        call = _Call(self, full_method, context)
        await context.send_initial_metadata((("x-replica", self.replica), (REQUEST_ID, call.request_id)))
        return call

    def _wrap_unary(self, behavior, full_method: str, streaming_requests: bool):
        async def wrapped(request, context):
            call = await self._begin(full_method, context)
            try:
                response = await behavior(call.admit(request, context, streaming_requests), context)
            except asyncio.CancelledError:
                call.finish(_ended(context))
                raise
            except Exception as error:
                await call.fail(context, error)
            call.finish(grpc.StatusCode.OK)
            return response

        return wrapped

    def _wrap_stream(self, behavior, full_method: str, streaming_requests: bool):
        async def wrapped(request, context):
            call = await self._begin(full_method, context)
            try:
                async for response in behavior(call.admit(request, context, streaming_requests), context):
                    yield response
            except (asyncio.CancelledError, GeneratorExit):
                call.finish(_ended(context))
                raise
            except Exception as error:
                await call.fail(context, error)
            else:
                call.finish(grpc.StatusCode.OK)

        return wrapped


def _ended(context) -> grpc.StatusCode:
    """Why a call stopped early: its deadline passed, or the client cancelled it."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
