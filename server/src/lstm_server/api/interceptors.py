"""Cross-cutting concerns for every RPC of the lstm.v1 services: authentication, requests that do not parse,
status mapping (the project's ``Status`` to the gRPC status code of the same name), metrics, logs, replica name.
Health and reflection pass untouched (load balancers call them without credentials)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from ..errors import ServiceError, Status
from ..metrics import Metrics
from .auth import Authenticator

log = logging.getLogger("lstm_server.rpc")
OWN_SERVICES = "/lstm.v1."
MAX_MESSAGE_CHARS = 2000  # status details travel in trailers, which a peer may cap at 8 KiB
_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")


def status_code(status: Status) -> grpc.StatusCode:
    """The gRPC status code of the same name."""
    return grpc.StatusCode[status.name]


def caller() -> str:
    """The tenant of the call being served (set by the interceptor before the servicer runs)."""
    return _tenant.get()


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
            "client uses this server's lstm.v1 protocol",
        )
    return request


async def _checked_stream(requests: AsyncIterator, method: str) -> AsyncIterator:
    async for request in requests:
        yield _check_parsed(request, method)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates each call (its tenant is ``caller()``), refuses requests that do not parse, turns
    ``ServiceError`` into its status, counts calls by method and code, logs each call, and sends the replica's
    name as ``x-replica`` initial metadata."""

    def __init__(self, metrics: Metrics, replica: str, authenticator: Authenticator) -> None:
        self.metrics = metrics
        self.replica = replica
        self.authenticator = authenticator

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(OWN_SERVICES):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        streaming = handler.response_streaming
        behavior = (
            handler.unary_stream or handler.stream_stream if streaming else handler.unary_unary or handler.stream_unary
        )
        requests = handler.request_streaming
        wrap = self._wrap_stream if streaming else self._wrap_unary
        wrapped = wrap(behavior, method, requests)
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

    def _admit(self, request, context, method: str, streaming_requests: bool):
        """Authenticate the call and check its request; returns the request (or request stream) to serve."""
        _tenant.set(self.authenticator.tenant(context))
        if streaming_requests:
            return _checked_stream(request, method)
        return _check_parsed(request, method)

    def _finish(self, method: str, code: grpc.StatusCode, started: float, message: str = "") -> None:
        self.metrics.requests.labels(method, code.name).inc()
        level = logging.INFO if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED) else logging.WARNING
        log.log(
            level,
            "rpc",
            extra={
                "method": method,
                "code": code.name,
                "ms": round(1e3 * (time.perf_counter() - started), 2),
                "error": message[:MAX_MESSAGE_CHARS],
            },
        )

    def _wrap_unary(self, behavior, method: str, streaming_requests: bool):
        async def wrapped(request, context):
            started = time.perf_counter()
            await context.send_initial_metadata((("x-replica", self.replica),))
            try:
                response = await behavior(self._admit(request, context, method, streaming_requests), context)
            except asyncio.CancelledError:
                self._finish(method, _ended(context), started)
                raise
            except ServiceError as error:
                code = status_code(error.code)
                self._finish(method, code, started, error.message)
                await context.abort(code, error.message[:MAX_MESSAGE_CHARS])
            except Exception as error:
                self._finish(method, grpc.StatusCode.INTERNAL, started, repr(error))
                log.exception("unexpected error in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {error}"[:2000])
            self._finish(method, grpc.StatusCode.OK, started)
            return response

        return wrapped

    def _wrap_stream(self, behavior, method: str, streaming_requests: bool):
        async def wrapped(request, context):
            started = time.perf_counter()
            await context.send_initial_metadata((("x-replica", self.replica),))
            try:
                async for response in behavior(self._admit(request, context, method, streaming_requests), context):
                    yield response
            except ServiceError as error:
                code = status_code(error.code)
                self._finish(method, code, started, error.message)
                await context.abort(code, error.message[:MAX_MESSAGE_CHARS])
            except (asyncio.CancelledError, GeneratorExit):
                self._finish(method, _ended(context), started)
                raise
            except Exception as error:
                self._finish(method, grpc.StatusCode.INTERNAL, started, repr(error))
                log.exception("unexpected error in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {error}"[:2000])
            else:
                self._finish(method, grpc.StatusCode.OK, started)

        return wrapped


def _ended(context) -> grpc.StatusCode:
    """Why a call stopped early: its deadline passed, or the client cancelled it."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
