"""The Open Inference Protocol's HTTP/REST bodies to and from its gRPC messages (``inference`` package), so that
a REST request is checked and served by exactly the code that serves the same gRPC request.

- JSON tensors: ``{"name", "datatype", "shape", "data"}``; BYTES elements are JSON strings (UTF-8), ``data`` may be
  nested row-major (it is flattened).
- The binary tensor data extension (what tritonclient.http sends by default): the body is the JSON header, its length
  in the ``Inference-Header-Content-Length`` header, then each binary input's bytes in order, each input saying its
  size in ``parameters.binary_data_size``. An output is sent binary when ``outputs[i].parameters.binary_data`` or
  the request's ``parameters.binary_data_output`` asks; its size goes in its ``parameters.binary_data_size``.
- Parameters: a JSON bool, integer, number or string is ``bool_param``, ``int64_param``, ``double_param`` or
  ``string_param``; a list (``stop``) is sent on as its JSON text, as over gRPC.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as ip

from ...errors import invalid
from ..open_inference_models import BYTES, LENGTH_PREFIX

HEADER_LENGTH = "inference-header-content-length"
BINARY_SIZE, BINARY_DATA, BINARY_OUTPUT = "binary_data_size", "binary_data", "binary_data_output"
INT64 = (-(2**63), 2**63 - 1)
NUMPY_TYPES = {"FP32": "<f4", "UINT64": "<u8"}


def parse_json(body: bytes, what: str = "the request body") -> Any:
    """``body`` as JSON; INVALID_ARGUMENT (never a crash) for anything else, nesting too deep included."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:  # RecursionError: arrays or objects nested thousands deep
        detail = "nested too deep" if isinstance(error, RecursionError) else str(error)[:200]
        raise invalid(f"{what} is not JSON ({detail}): send a JSON object", reason="INVALID_JSON") from None


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header of an infer request and the binary data after it."""
    if header_length is None:
        size = len(body)
    else:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(body):
            raise invalid(
                f"Inference-Header-Content-Length {header_length[:40]!r} must be the JSON header's length in bytes, "
                f"0 to the body's {len(body)}",
                reason="INVALID_HEADER",
                field="Inference-Header-Content-Length",
            )
    document = parse_json(body[:size])
    if not isinstance(document, dict):
        raise invalid("an infer request is a JSON object with inputs (and optional outputs, parameters, id)")
    return document, memoryview(body)[size:]


def set_parameter(target: Mapping[str, ip.InferParameter], name: Any, value: Any, where: str) -> None:
    """One JSON parameter as the InferParameter it means."""
    if not isinstance(name, str):
        raise invalid(f"{where} names must be strings", field=where)
    field = f"{where}.{name[:100]}"
    if isinstance(value, list):
        value = json.dumps(value)  # a list parameter (stop) travels as its JSON text, as over gRPC
    if isinstance(value, bool):
        target[name].bool_param = value
    elif isinstance(value, int):
        if not INT64[0] <= value <= INT64[1]:
            raise invalid(f"parameter {name[:100]} must fit a signed 64-bit integer", field=field)
        target[name].int64_param = value
    elif isinstance(value, float):
        target[name].double_param = value
    elif isinstance(value, str):
        target[name].string_param = value
    else:
        raise invalid(f"parameter {name[:100]} must be a bool, a number, a string or a list of strings", field=field)


def set_parameters(target: Mapping[str, ip.InferParameter], parameters: Any, where: str, skip=()) -> None:
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise invalid(f"{where} must be a JSON object", field=where)
    for name, value in parameters.items():
        if name not in skip:
            set_parameter(target, name, value, where)


def _flat(data: Any) -> Iterator[Any]:
    """A tensor's nested row-major ``data`` as its elements."""
    if isinstance(data, list):
        for item in data:
            yield from _flat(item)
    else:
        yield data


def _typed(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind):
        raise invalid(f"{where} must be a {kind.__name__}", field=where)
    return value


def infer_request(model: str, version: str, document: dict[str, Any], binary: memoryview) -> ip.ModelInferRequest:
    """The gRPC request a REST infer request means (binary inputs as ``raw_input_contents``)."""
    request = ip.ModelInferRequest(model_name=model, model_version=version)
    request.id = _typed(document.get("id", ""), str, "id")
    set_parameters(request.parameters, document.get("parameters"), "parameters", skip=(BINARY_OUTPUT,))
    offset = 0
    inputs = _typed(document.get("inputs", []), list, "inputs")
    for i, item in enumerate(inputs):
        where = f"inputs[{i}]"
        item = _typed(item, dict, where)
        tensor = request.inputs.add(
            name=_typed(item.get("name", ""), str, f"{where}.name"),
            datatype=_typed(item.get("datatype", ""), str, f"{where}.datatype"),
        )
        shape = _typed(item.get("shape", []), list, f"{where}.shape")
        if not all(isinstance(d, int) and not isinstance(d, bool) and INT64[0] <= d <= INT64[1] for d in shape):
            raise invalid(f"{where}.shape must be a list of integers", field=f"{where}.shape")
        tensor.shape.extend(shape)
        parameters = item.get("parameters") or {}
        set_parameters(tensor.parameters, parameters, f"{where}.parameters", skip=(BINARY_SIZE,))
        if isinstance(parameters, dict) and BINARY_SIZE in parameters:
            size = parameters[BINARY_SIZE]
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary) - offset:
                raise invalid(
                    f"{where}.parameters.binary_data_size must be the input's byte count within the {len(binary)} "
                    f"binary bytes after the JSON header ({len(binary) - offset} left), got {str(size)[:40]}",
                    field=f"{where}.parameters.binary_data_size",
                )
            request.raw_input_contents.append(bytes(binary[offset : offset + size]))
            offset += size
        elif "data" in item and tensor.datatype == BYTES:
            contents = tensor.contents.bytes_contents
            for value in _flat(item["data"]):
                contents.append(_typed(value, str, f"{where}.data").encode("utf-8", "surrogatepass"))
    if offset != len(binary):
        raise invalid(
            f"{len(binary) - offset} bytes after the JSON header belong to no input: each binary input says its size "
            "in parameters.binary_data_size",
            field="inputs",
        )
    outputs = _typed(document.get("outputs", []), list, "outputs")
    for i, item in enumerate(outputs):
        item = _typed(item, dict, f"outputs[{i}]")
        output = request.outputs.add(name=_typed(item.get("name", ""), str, f"outputs[{i}].name"))
        set_parameters(output.parameters, item.get("parameters"), f"outputs[{i}].parameters", skip=(BINARY_DATA,))
    return request


def binary_outputs(document: dict[str, Any]) -> set[str] | bool:
    """The outputs to send as binary data: True for all (``binary_data_output``), else those that ask."""
    parameters = document.get("parameters")
    if isinstance(parameters, dict) and parameters.get(BINARY_OUTPUT) is True:
        return True
    return {
        item.get("name")
        for item in document.get("outputs") or ()
        if isinstance(item, dict) and isinstance(item.get("parameters"), dict) and item["parameters"].get(BINARY_DATA)
    }


def output_values(datatype: str, raw: bytes) -> list[Any]:
    """An output's raw contents as JSON values (BYTES as text)."""
    if datatype != BYTES:
        return np.frombuffer(raw, NUMPY_TYPES[datatype]).tolist()
    values, offset = [], 0
    while offset < len(raw):
        (size,) = LENGTH_PREFIX.unpack_from(raw, offset)
        values.append(raw[offset + 4 : offset + 4 + size].decode("utf-8"))
        offset += 4 + size
    return values


def parameter_values(parameters: Mapping[str, ip.InferParameter]) -> dict[str, Any]:
    return {name: getattr(value, value.WhichOneof("parameter_choice")) for name, value in parameters.items()}


def response_body(response: ip.ModelInferResponse, binary: set[str] | bool) -> tuple[bytes, int | None]:
    """A REST infer response: the body, and the JSON header's length when binary outputs follow it (else None)."""
    outputs, tail = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary is True or tensor.name in binary:
            item["parameters"] = {BINARY_SIZE: len(raw)}
            tail.append(raw)
        else:
            item["data"] = output_values(tensor.datatype, raw)
        outputs.append(item)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = parameter_values(response.parameters)
    document["outputs"] = outputs
    header = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    if not tail:
        return header, None
    return header + b"".join(tail), len(header)


def named_outputs(response: ip.ModelInferResponse) -> Iterable[tuple[str, list[Any], list[int]]]:
    """Each output's name, values and shape."""
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        yield tensor.name, output_values(tensor.datatype, raw), list(tensor.shape)
