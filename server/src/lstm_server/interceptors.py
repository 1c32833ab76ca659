"""Cross-cutting concerns for every RPC of the lstm.v1 services: status mapping, metrics, logs, replica name."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from .errors import ServiceError
from .metrics import Metrics

log = logging.getLogger("lstm_server.rpc")
OWN_SERVICES = "/lstm.v1."


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Turns ``ServiceError`` into its status, counts calls by method and code, logs each call,
    and sends the replica's name as ``x-replica`` initial metadata."""

    def __init__(self, metrics: Metrics, replica: str) -> None:
        self.metrics = metrics
        self.replica = replica

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(OWN_SERVICES):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        streaming = handler.response_streaming
        behavior = (
            handler.unary_stream or handler.stream_stream if streaming else handler.unary_unary or handler.stream_unary
        )
        wrapped = self._wrap_stream(behavior, method) if streaming else self._wrap_unary(behavior, method)
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, streaming)]
        return factory(
            wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

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
                "error": message,
            },
        )

    def _wrap_unary(self, behavior, method: str):
        async def wrapped(request, context):
            started = time.perf_counter()
            await context.send_initial_metadata((("x-replica", self.replica),))
            try:
                response = await behavior(request, context)
            except asyncio.CancelledError:
                self._finish(method, _ended(context), started)
                raise
            except ServiceError as error:
                self._finish(method, error.code, started, error.message)
                await context.abort(error.code, error.message)
            except Exception as error:
                self._finish(method, grpc.StatusCode.INTERNAL, started, repr(error))
                log.exception("unexpected error in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {error}")
            self._finish(method, grpc.StatusCode.OK, started)
            return response

        return wrapped

    def _wrap_stream(self, behavior, method: str):
        async def wrapped(request, context):
            started = time.perf_counter()
            await context.send_initial_metadata((("x-replica", self.replica),))
            try:
                async for response in behavior(request, context):
                    yield response
            except ServiceError as error:
                self._finish(method, error.code, started, error.message)
                await context.abort(error.code, error.message)
            except (asyncio.CancelledError, GeneratorExit):
                self._finish(method, _ended(context), started)
                raise
            except Exception as error:
                self._finish(method, grpc.StatusCode.INTERNAL, started, repr(error))
                log.exception("unexpected error in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {error}")
            else:
                self._finish(method, grpc.StatusCode.OK, started)

        return wrapped


def _ended(context) -> grpc.StatusCode:
    """Why a call stopped early: its deadline passed, or the client cancelled it."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
