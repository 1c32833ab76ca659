"""The HTTP port's application: the KServe v2 REST routes, Triton's generate extension and the OpenAI-compatible
routes over the same Api as the gRPC services, every request through ``Calls``; errors as JSON bodies (OpenAI's
shape under ``/v1``, KServe's elsewhere), never a bare 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from ...errors import ServiceError, Status, invalid
from ...metrics import Metrics, build_versions
from . import generate, openai, v2
from .calls import Calls, HttpRefusal, outcome
from .errors import openai_error, v2_error
from .front import Front

log = logging.getLogger(__name__)


def build_app(front: Front, metrics: Metrics, replica: str) -> Calls:
    app = FastAPI(
        title="lstm-serving HTTP",
        version=build_versions()["version"],
        description="KServe v2 REST, Triton's generate extension and OpenAI-compatible completions (docs/http.md)",
        docs_url=None,
        redoc_url=None,
    )
    for routes in (v2.router(front), generate.router(front), openai.router(front)):
        app.include_router(routes)
    app.add_exception_handler(ServiceError, _answer)
    app.add_exception_handler(HTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(Exception, _unexpected)
    return Calls(app, metrics, replica)


async def _answer(request: Request, error: ServiceError) -> JSONResponse:
    outcome(request, error.code.name, error.reason)
    shape = openai_error if request.url.path.startswith("/v1/") else v2_error
    return shape(error, request.state.request_id)


async def _http_exception(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, a method the route does not take) in this server's shape."""
    if error.status_code == 404:
        refusal = ServiceError(
            Status.NOT_FOUND,
            f"no endpoint {request.url.path[:200]!r}: docs/http.md lists them (GET /openapi.json describes them)",
            reason="NO_ROUTE",
        )
    else:
        refusal = HttpRefusal(
            error.status_code, f"{request.method} {request.url.path[:200]}: {error.detail}", "HTTP_REFUSED"
        )
    response = await _answer(request, refusal)
    response.headers.update(error.headers or {})
    return response


async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
    field = ".".join(str(part) for part in first.get("loc", ())) or None
    return await _answer(request, invalid(f"{field}: {first.get('msg')}"[:500], field=field))


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.error("unexpected error in %s %s", request.method, request.url.path[:200], exc_info=error)
    return await _answer(request, ServiceError(Status.INTERNAL, f"internal error: {error}"))
