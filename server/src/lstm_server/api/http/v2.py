"""The Open Inference Protocol's HTTP/REST binding (KServe v2, as Triton serves it): health, metadata,
configuration, statistics, the repository index and inference. Every route translates its request into the gRPC
service's message and calls the same code (``open_inference.py``): the same checks, sequences, statistics and
errors (field paths in v2 terms).

Health is open to anyone, like gRPC's ServerLive and ServerReady; everything else is authenticated. Not ready (and
not live) is status 400 with an empty body, as the protocol asks (a 4xx, the body empty).
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request, Response
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as ip

from ..open_inference import EXTENSIONS
from .calls import json_body, read_body, set_model
from .front import Front
from .v2_json import HEADER_LENGTH, binary_outputs, infer_request, response_body, split_body

INFER_BODY = json_body(  # read by hand: binary data may follow the JSON
    {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "inputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "shape", "datatype"],
                    "properties": {
                        "name": {"type": "string"},
                        "shape": {"type": "array", "items": {"type": "integer"}},
                        "datatype": {"type": "string"},
                        "parameters": {"type": "object"},
                        "data": {"type": "array"},
                    },
                },
            },
            "outputs": {"type": "array", "items": {"type": "object"}},
        },
        "required": ["inputs"],
    }
)


VERSION_PARAMETER = {"parameters": [{"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}]}


def _json(message: Message) -> dict[str, Any]:
    """A message as JSON the way Triton's HTTP endpoints write it: proto field names, and 64-bit integers as
    numbers (not protobuf's JSON strings)."""
    return {field.name: _value(field, value) for field, value in message.ListFields()}


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        entry = field.message_type.fields_by_name["value"]
        return {key: _one(entry, item) for key, item in value.items()}
    if field.is_repeated:
        return [_one(field, item) for item in value]
    return _one(field, value)


def _one(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def _status(ok: bool) -> Response:
    return Response(status_code=200 if ok else 400)


def router(front: Front) -> APIRouter:
    routes = APIRouter(tags=["KServe v2"])
    inference = front.inference

    @routes.get("/v2/health/live", name="ServerLive", summary="The server is live (200; else 400)")
    async def live() -> Response:
        return _status(True)

    @routes.get("/v2/health/ready", name="ServerReady", summary="Ready: models loaded, not draining (200; else 400)")
    async def ready() -> Response:
        return _status(inference.ready())

    @routes.get("/v2", name="ServerMetadata", summary="The server's name, version and protocol extensions")
    async def server_metadata(request: Request) -> dict:
        front.tenant(request)
        response = await inference.ServerMetadata(ip.ServerMetadataRequest(), None)
        return {"name": response.name, "version": response.version, "extensions": list(EXTENSIONS)}

    @routes.post("/v2/repository/index", name="RepositoryIndex", summary="The served models, each READY")
    async def repository_index(request: Request) -> list[dict]:
        front.tenant(request)
        response = await inference.RepositoryIndex(ip.RepositoryIndexRequest(), None)
        return [_json(model) for model in response.models]

    @routes.get("/v2/models/stats", name="ModelStatistics", summary="Every served model's statistics, as you see them")
    async def all_statistics(request: Request) -> dict:
        return _json(inference.model_statistics(ip.ModelStatisticsRequest(), front.tenant(request)))

    _model_routes(routes, front, "", {})
    _model_routes(routes, front, "/versions/{version}", VERSION_PARAMETER)
    return routes


def version_of(request: Request) -> str:
    """The version a route names ("": the served one)."""
    return request.path_params.get("version", "")


def _model_routes(routes: APIRouter, front: Front, suffix: str, extra: dict) -> None:
    """A model's routes, under ``/v2/models/{model}`` and ``.../versions/{version}`` (``extra`` describes that
    parameter)."""
    inference = front.inference
    base = "/v2/models/{model}" + suffix
    tag = "Version" if extra else ""

    @routes.get(
        base,
        name=f"ModelMetadata{tag}",
        summary="The model's inputs, outputs, versions and platform",
        openapi_extra=extra,
    )
    async def metadata(request: Request, model: str) -> dict:
        front.tenant(request)
        set_model(request, model)
        return _json(
            await inference.ModelMetadata(ip.ModelMetadataRequest(name=model, version=version_of(request)), None)
        )

    @routes.get(
        base + "/ready",
        name=f"ModelReady{tag}",
        summary="The model is served and ready (200; else 400)",
        openapi_extra=extra,
    )
    async def model_ready(request: Request, model: str) -> Response:
        front.tenant(request)
        set_model(request, model)
        response = await inference.ModelReady(ip.ModelReadyRequest(name=model, version=version_of(request)), None)
        return _status(response.ready)

    @routes.get(
        base + "/config",
        name=f"ModelConfig{tag}",
        summary="The model's configuration, as Triton's",
        openapi_extra=extra,
    )
    async def config(request: Request, model: str) -> dict:
        front.tenant(request)
        set_model(request, model)
        return _json(
            (await inference.ModelConfig(ip.ModelConfigRequest(name=model, version=version_of(request)), None)).config
        )

    @routes.get(
        base + "/stats",
        name=f"ModelStatistics{tag}",
        summary="The model's statistics, as you see them",
        openapi_extra=extra,
    )
    async def statistics(request: Request, model: str) -> dict:
        set_model(request, model)
        message = ip.ModelStatisticsRequest(name=model, version=version_of(request))
        return _json(inference.model_statistics(message, front.tenant(request)))

    @routes.post(
        base + "/infer",
        name=f"ModelInfer{tag}",
        summary="One inference request: a batch of texts to classify, or a turn of a sequence",
        openapi_extra={**INFER_BODY, **extra},
    )
    async def infer(request: Request, model: str) -> Response:
        tenant = front.tenant(request)
        set_model(request, model)
        body = await read_body(request, front.config.max_message_bytes, front.config.http_body_timeout_s)
        document, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        response = await inference.infer(infer_request(model, version_of(request), document, binary), tenant)
        content, header_length = response_body(response, binary_outputs(document))
        if header_length is None:
            return Response(content, media_type="application/json")
        headers = {"Inference-Header-Content-Length": str(header_length)}
        return Response(content, media_type="application/octet-stream", headers=headers)
