"""Triton's generate extension: ``POST /v2/models/{model}[/versions/{version}]/generate`` answers one JSON object,
``.../generate_stream`` one server-sent event per piece of text.

The body is a JSON object: ``text_input`` is the model's ``TEXT`` input; every other key, at the top level or
under ``parameters``, is a request parameter (sampling, and the sequence parameters ``sequence_id``,
``sequence_start``, ``sequence_end``, exactly as over gRPC: one sequence is one session behind both). An
``x-session-id`` header instead continues that server-held lstm.v1 session (no sequence parameters then). The answer
names each output in lower case, ``TEXT_OUT`` as ``text_output``; an output of one element is that element.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from lstm.v1 import lstm_pb2 as pb
from starlette.responses import JSONResponse, StreamingResponse
from tritonclient.grpc import service_pb2 as ip

from ...errors import ServiceError, Status, invalid
from ..open_inference_models import BYTES, SAMPLING_PARAMETERS, check_parameter_names, sampling_params, v2_field
from ..requests import check_proposed_id
from .calls import json_body, read_body, set_model
from .errors import error_fields
from .front import Front
from .v2 import VERSION_PARAMETER, version_of
from .v2_json import named_outputs, parse_json, set_parameter

log = logging.getLogger(__name__)
TEXT_INPUT, TEXT_OUTPUT = "text_input", "text_output"
GENERATE_BODY = json_body(
    {
        "type": "object",
        "required": [TEXT_INPUT],
        "properties": {
            TEXT_INPUT: {"type": "string"},
            "parameters": {"type": "object"},
            "id": {"type": "string"},
            "max_tokens": {"type": "integer"},
            "temperature": {"type": "number"},
            "top_k": {"type": "integer"},
            "top_p": {"type": "number"},
            "seed": {"type": "integer"},
            "stop": {"type": "array", "items": {"type": "string"}},
        },
    }
)


def generate_request(model: str, version: str, document: Any) -> ip.ModelInferRequest:
    """The Open Inference request a generate body means."""
    if not isinstance(document, dict) or not isinstance(document.get(TEXT_INPUT), str):
        raise invalid(
            f'a generate request is a JSON object with "{TEXT_INPUT}": a string (and parameters)', field=TEXT_INPUT
        )
    request = ip.ModelInferRequest(model_name=model, model_version=version)
    if not isinstance(document.get("id", ""), str):
        raise invalid("id must be a string", field="id")
    request.id = document.get("id", "")
    tensor = request.inputs.add(name="TEXT", datatype=BYTES, shape=[1])
    tensor.contents.bytes_contents.append(document[TEXT_INPUT].encode("utf-8", "surrogatepass"))
    nested = document.get("parameters") or {}
    if not isinstance(nested, dict):
        raise invalid("parameters must be a JSON object", field="parameters")
    top = {k: v for k, v in document.items() if k not in (TEXT_INPUT, "parameters", "id")}
    for name in sorted(top.keys() & nested.keys()):
        raise invalid(f"parameter {name[:100]!r} is given both at the top level and under parameters: give it once")
    for name, value in {**top, **nested}.items():
        set_parameter(request.parameters, name, value, "parameters")
    return request


def piece(response: ip.ModelInferResponse) -> dict[str, Any]:
    """A response as the generate extension's JSON object."""
    body: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        body["id"] = response.id
    for name, values, shape in named_outputs(response):
        body[TEXT_OUTPUT if name == "TEXT_OUT" else name.lower()] = values[0] if shape == [1] else values
    return body


def event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def events(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Server-sent events: each piece, then (if the request fails after its first piece) an error event."""
    async with contextlib.aclosing(rest):
        yield event(first)
        try:
            async for body in rest:
                yield event(body)
        except ServiceError as error:
            yield event({"error": error.message, **error_fields(error)})
        except Exception as error:  # the headers are sent: the stream's last event says what happened
            log.error("unexpected error in generate_stream", exc_info=error)
            yield event({"error": f"internal error: {error}", "code": Status.INTERNAL.name})


def router(front: Front) -> APIRouter:
    routes = APIRouter(tags=["Triton generate extension"])
    for suffix, extra in (("", {}), ("/versions/{version}", VERSION_PARAMETER)):
        tag = "Version" if extra else ""
        for streaming in (False, True):
            path = "/v2/models/{model}" + suffix + ("/generate_stream" if streaming else "/generate")
            name = ("generate_stream" if streaming else "generate") + tag
            summary = "A turn as server-sent events, one per piece" if streaming else "A turn, answered whole"
            routes.add_api_route(
                path,
                _endpoint(front, streaming),
                methods=["POST"],
                name=name,
                summary=summary,
                openapi_extra={**GENERATE_BODY, **extra},
            )
    return routes


def _endpoint(front: Front, streaming: bool):
    async def generate(request: Request, model: str) -> Response:
        tenant = front.tenant(request)
        set_model(request, model)
        body = await read_body(request, front.config.max_message_bytes, front.config.http_body_timeout_s)
        message = generate_request(model, version_of(request), parse_json(body))
        session_id = request.headers.get("x-session-id")
        if session_id is not None:
            pieces = _session_pieces(front, message, check_proposed_id(session_id), tenant, streaming)
        else:
            pieces = _pieces(front, message, tenant, streaming)
        first = await anext(pieces)
        if not streaming:
            await pieces.aclose()
            return JSONResponse(first)
        return StreamingResponse(events(first, pieces), media_type="text/event-stream")

    return generate


async def _pieces(front: Front, message: ip.ModelInferRequest, tenant: str, streaming: bool) -> AsyncIterator[dict]:
    async with contextlib.aclosing(front.inference.infer_pieces(message, tenant, streaming)) as responses:
        async for response in responses:
            yield piece(response)


async def _session_pieces(
    front: Front, message: ip.ModelInferRequest, session_id: str, tenant: str, streaming: bool
) -> AsyncIterator[dict]:
    """A turn of the server-held session ``session_id``, as generate pieces (one if not ``streaming``)."""
    api = front.api
    session = await api.sessions.resolve(session_id, tenant)
    model = api.models.get(session.model)
    if message.model_name != model.name or message.model_version not in ("", str(model.version)):
        raise ServiceError(
            Status.FAILED_PRECONDITION,
            f"session {session_id} is of model {model.name!r} version {model.version}, not {message.model_name!r}: "
            "send the request to its model",
            reason="MODEL_MISMATCH",
        )
    try:
        check_parameter_names(message.parameters, model, SAMPLING_PARAMETERS)
        sampling = sampling_params(message.parameters, api.config.max_stop_strings)
        text = message.inputs[0].contents.bytes_contents[0].decode("utf-8")
    except ServiceError as error:
        error.field = v2_field(error.field)
        raise
    except UnicodeDecodeError:
        raise invalid(f"{TEXT_INPUT} holds text that is not UTF-8", field=TEXT_INPUT) from None
    turn = await api.start_turn(session_id, tenant, text, sampling, pb.UNKNOWN_CHARACTERS_REJECT)
    head = {"model_name": model.name, "model_version": str(model.version)}
    parts: list[str] = []
    async with contextlib.aclosing(api.stream(turn)) as chunks:
        async for chunk in chunks:
            if chunk.end is None:
                if streaming:
                    yield {**head, TEXT_OUTPUT: chunk.text}
                else:
                    parts.append(chunk.text)
                continue
            yield {
                **head,
                TEXT_OUTPUT: chunk.text if streaming else "".join([*parts, chunk.text]),
                "tokens_seen": chunk.tokens_seen,
                "finish_reason": chunk.end.finish_reason or "",
            }
