"""The served models as the Open Inference Protocol (KServe v2, Triton's ``inference`` package) describes them:
their tensors, metadata and configuration; reading a request's inputs and parameters; writing outputs.

A language model takes one text, ``TEXT`` BYTES [1], and answers ``TEXT_OUT`` BYTES [1], ``TOKENS_SEEN`` UINT64
[1] and ``FINISH_REASON`` BYTES [1]; a classifier takes ``TEXT`` BYTES [-1] (a batch of texts) and answers
``LABEL`` BYTES [-1] and ``PROBS`` FP32 [-1, labels]. Shapes are full shapes (``max_batch_size`` 0).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from lstm.v1 import lstm_pb2 as pb
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as ip

from ..config import ServerConfig
from ..engine.models import ServedModel, ServedModels
from ..errors import ServiceError, Status, invalid
from .messages import SAMPLING_FIELDS

BYTES, FP32, UINT64 = "BYTES", "FP32", "UINT64"
CONFIG_TYPES = {BYTES: mc.TYPE_STRING, FP32: mc.TYPE_FP32, UINT64: mc.TYPE_UINT64}
PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "onnxruntime"), "torchscript": ("pytorch_libtorch", "pytorch")}
LENGTH_PREFIX = struct.Struct("<I")
MAX_UINT64 = 2**64 - 1
SAMPLING_PARAMETERS = (*SAMPLING_FIELDS, "stop")
INTEGER_PARAMETERS = ("top_k", "seed", "max_tokens")
FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
MAX_STOP_CHARS = 65_536  # the stop parameter's JSON: far more than max_stop_strings of 64 characters need
JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
# reasons of this protocol's refusals (docs/observability.md)
INVALID_INPUT, INVALID_OUTPUT = "INVALID_INPUT", "INVALID_OUTPUT"
INVALID_PARAMETER, UNKNOWN_PARAMETER = "INVALID_PARAMETER", "UNKNOWN_PARAMETER"
# lstm.v1's fields, as a request of this protocol names them
V2_FIELDS = {"sampling.": "parameters.", "texts": "inputs[0]", "prompt": "inputs[0]"}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, protocol datatype and shape (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def shown(self) -> str:
        return f"{self.name} ({self.datatype}, shape {list(self.shape)})"


def signature(model: ServedModel) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The model's inputs and outputs over the protocol."""
    if model.task == "generation":
        return [TensorSpec("TEXT", BYTES, (1,))], [
            TensorSpec("TEXT_OUT", BYTES, (1,)),
            TensorSpec("TOKENS_SEEN", UINT64, (1,)),
            TensorSpec("FINISH_REASON", BYTES, (1,)),
        ]
    return [TensorSpec("TEXT", BYTES, (-1,))], [
        TensorSpec("LABEL", BYTES, (-1,)),
        TensorSpec("PROBS", FP32, (-1, len(model.entry.labels))),
    ]


def served(models: ServedModels, name: str, version: str, field: str = "name") -> ServedModel:
    """The model asked for; NOT_FOUND for a model or version this server does not serve ("" is the served one).
    ``field``: the request field naming the model (``name``, or ``model_name`` in inference requests)."""
    model = models.get(name, field)
    if version not in ("", str(model.version)):
        raise ServiceError(
            Status.NOT_FOUND,
            f"model {name!r} version {version!r} is not served; this server serves version {model.version}: ask for "
            "it, or leave model_version empty",
            reason="MODEL_NOT_FOUND",
            field=field.replace("name", "version"),
        )
    return model


def v2_field(field: str | None) -> str | None:
    """An error's field as this protocol names it: ``sampling.top_p`` is ``parameters.top_p``, lstm.v1's texts
    and prompt are the ``TEXT`` input, ``inputs[0]``."""
    for lstm_name, name in V2_FIELDS.items():
        if field and field.startswith(lstm_name):
            return name + field[len(lstm_name) :] if lstm_name.endswith(".") else name
    return field


def _tensor_metadata(spec: TensorSpec) -> ip.ModelMetadataResponse.TensorMetadata:
    return ip.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def model_metadata(model: ServedModel) -> ip.ModelMetadataResponse:
    inputs, outputs = signature(model)
    return ip.ModelMetadataResponse(
        name=model.name,
        versions=[str(model.version)],
        platform=PLATFORMS[model.backend.name][0],
        inputs=[_tensor_metadata(spec) for spec in inputs],
        outputs=[_tensor_metadata(spec) for spec in outputs],
    )


def model_config(model: ServedModel, config: ServerConfig) -> mc.ModelConfig:
    """A language model is a decoupled sequence model (its sequences are sessions, idle ones expire like them);
    a classifier a plain one. ``parameters`` name the task, and a classifier's labels in PROBS' order."""
    inputs, outputs = signature(model)
    platform, backend = PLATFORMS[model.backend.name]
    parameters = {"task": model.task}
    if model.task == "classification":
        parameters["labels"] = json.dumps(model.entry.labels)
    result = mc.ModelConfig(
        name=model.name,
        platform=platform,
        backend=backend,
        version_policy=mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[model.version])),
        max_batch_size=0,
        input=[mc.ModelInput(name=s.name, data_type=CONFIG_TYPES[s.datatype], dims=s.shape) for s in inputs],
        output=[mc.ModelOutput(name=s.name, data_type=CONFIG_TYPES[s.datatype], dims=s.shape) for s in outputs],
        parameters={key: mc.ModelParameter(string_value=value) for key, value in parameters.items()},
    )
    if model.task == "generation":
        idle_us = config.idle_timeout_s * 1e6  # may be infinite
        result.sequence_batching.max_sequence_idle_microseconds = (
            MAX_UINT64 if idle_us >= MAX_UINT64 else round(idle_us)
        )
        result.model_transaction_policy.decoupled = True
    return result


# -- inputs -----------------------------------------------------------------------------------------------------


def bad_input(message: str, field: str) -> ServiceError:
    return invalid(message, reason=INVALID_INPUT, field=field)


def _elements(raw: bytes, name: str) -> list[bytes]:
    """BYTES elements from raw contents: each a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise bad_input(
                f"input {name}: the raw contents end inside a 4-byte length prefix (BYTES elements are a "
                "4-byte little-endian length, then the bytes)",
                "raw_input_contents[0]",
            )
        (size,) = LENGTH_PREFIX.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise bad_input(
                f"input {name}: element {len(elements)} says {size} bytes but {len(raw) - offset} remain (BYTES "
                "elements are a 4-byte little-endian length, then the bytes)",
                "raw_input_contents[0]",
            )
        elements.append(raw[offset : offset + size])
        offset += size
    return elements


def input_texts(request: ip.ModelInferRequest, model: ServedModel) -> list[str]:
    """The texts of the request's one input, checked against the model's: name, datatype, shape, contents in one
    place (``raw_input_contents`` or ``contents.bytes_contents``), element count, UTF-8."""
    (spec,), _ = signature(model)
    names = [tensor.name for tensor in request.inputs]
    if names != [spec.name]:
        field = "inputs[0].name" if len(names) == 1 else "inputs"
        raise bad_input(f"model {model.name!r} takes one input, {spec.shown()}; got inputs {names[:8]}", field)
    (tensor,) = request.inputs
    if tensor.datatype != spec.datatype:
        raise bad_input(
            f"input {spec.name} must have datatype {spec.datatype}, got {tensor.datatype!r}", "inputs[0].datatype"
        )
    shape = list(tensor.shape)
    if len(shape) != len(spec.shape) or any(d < 0 or d != s != -1 for d, s in zip(shape, spec.shape, strict=False)):
        raise bad_input(
            f"input {spec.name} must have shape {list(spec.shape)} (-1: any size), got {shape[:8]}", "inputs[0].shape"
        )
    if tensor.parameters:
        raise bad_input(
            f"input {spec.name}: parameters {sorted(tensor.parameters)[:8]} are not supported (shared memory "
            "is not): send the data in the request",
            "inputs[0].parameters",
        )
    contents = [field.name for field, _ in tensor.contents.ListFields()]
    if request.raw_input_contents:
        if contents:
            raise bad_input(
                f"input {spec.name} has both raw_input_contents and contents ({', '.join(contents)}): send one",
                "inputs[0].contents",
            )
        if len(request.raw_input_contents) != 1:
            raise bad_input(
                f"{len(request.raw_input_contents)} raw_input_contents for 1 input: send one per input",
                "raw_input_contents",
            )
        elements, field = _elements(request.raw_input_contents[0], spec.name), "raw_input_contents[0]"
    else:
        if set(contents) - {"bytes_contents"}:
            raise bad_input(
                f"input {spec.name} is BYTES: send its elements in contents.bytes_contents (or raw_input_contents), "
                f"not {', '.join(contents)}",
                "inputs[0].contents",
            )
        elements, field = list(tensor.contents.bytes_contents), "inputs[0].contents.bytes_contents"
    if len(elements) != math.prod(shape):
        raise bad_input(
            f"input {spec.name} has shape {shape} but {len(elements)} elements: send {math.prod(shape)}", field
        )
    try:
        return [element.decode("utf-8") for element in elements]
    except UnicodeDecodeError as error:
        raise bad_input(
            f"input {spec.name} holds bytes that are not UTF-8 ({error.reason}): send UTF-8 text", field
        ) from None


def requested_outputs(request: ip.ModelInferRequest, model: ServedModel) -> list[str]:
    """The outputs to send, in order: those the request names, or every output of the model."""
    _, outputs = signature(model)
    known = [spec.name for spec in outputs]
    names = [output.name for output in request.outputs]
    for i, output in enumerate(request.outputs):
        if output.name not in known:
            raise invalid(
                f"model {model.name!r} has no output {output.name!r}; its outputs are {', '.join(known)}",
                reason=INVALID_OUTPUT,
                field=f"outputs[{i}].name",
            )
        if output.parameters:
            raise invalid(
                f"output {output.name}: parameters {sorted(output.parameters)[:8]} are not supported",
                reason=INVALID_OUTPUT,
                field=f"outputs[{i}].parameters",
            )
    if len(set(names)) != len(names):
        raise invalid(f"outputs are named more than once: {names}", reason=INVALID_OUTPUT, field="outputs")
    return names or known


# -- parameters -------------------------------------------------------------------------------------------------


def bad_parameter(name: str, message: str) -> ServiceError:
    """INVALID_ARGUMENT about parameter ``name`` (its field: ``parameters.<name>``)."""
    return invalid(message, reason=INVALID_PARAMETER, field=f"parameters.{name}")


def parameter(parameters: Mapping[str, ip.InferParameter], name: str) -> bool | int | str | float | None:
    """A request parameter's value, or None if absent."""
    if name not in parameters:
        return None
    kind = parameters[name].WhichOneof("parameter_choice")
    if kind is None:
        raise bad_parameter(name, f"parameter {name} has no value")
    return getattr(parameters[name], kind)


def bool_parameter(parameters: Mapping[str, ip.InferParameter], name: str) -> bool:
    """A bool parameter's value (False if absent)."""
    value = parameter(parameters, name)
    if value is not None and not isinstance(value, bool):
        raise bad_parameter(name, f"parameter {name} must be a bool (bool_param), got {value!r:.100}")
    return bool(value)


def check_parameter_names(parameters: Iterable[str], model: ServedModel, accepted: Iterable[str]) -> None:
    accepted = sorted(accepted)
    unknown = sorted(set(parameters) - set(accepted))
    if unknown:
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
        raise invalid(
            f"model {model.name!r} takes no parameter {', '.join(repr(name[:100]) for name in unknown[:8])}: {takes}",
            reason=UNKNOWN_PARAMETER,
            field=f"parameters.{unknown[0]}",
        )


def sampling_params(parameters: Mapping[str, ip.InferParameter], max_stop_strings: int) -> pb.SamplingParams:
    """The request's sampling parameters as the lstm.v1 SamplingParams they mean (so the same checks, and the same
    float32 rounding, apply). A number may also come as a string (perf_analyzer sends no doubles); ``stop`` is a
    JSON list of at most ``max_stop_strings`` strings."""
    params = pb.SamplingParams()
    for name in SAMPLING_FIELDS:
        value = parameter(parameters, name)
        if value is None:
            continue
        integer = name in INTEGER_PARAMETERS
        number = _number(value, integer)
        if number is None:
            want = "an integer (int64_param)" if integer else "a number (double_param or int64_param)"
            raise bad_parameter(name, f"parameter {name} must be {want}, or a string of one; got {value!r:.100}")
        try:
            setattr(params, name, number)
        except (ValueError, TypeError):
            width = "an unsigned 64-bit" if name == "seed" else "a 32-bit"
            raise bad_parameter(name, f"parameter {name} must fit {width} integer, got {value!r:.100}") from None
    stop = parameter(parameters, "stop")
    if stop is not None:
        params.stop.extend(_stop_strings(stop, max_stop_strings))
    return params


def _number(value: Any, integer: bool) -> int | float | None:
    """The number a parameter holds (an integer if ``integer``), or None if it holds none."""
    if isinstance(value, str):
        try:
            return int(value) if integer else float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or (integer and not isinstance(value, int)):
        return None
    return value


def _json_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON ``text`` (brackets inside strings not counted)."""
    depth = deepest = 0
    for char in JSON_STRING.sub("", text):
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _stop_strings(value: Any, max_strings: int) -> list[str]:
    """The strings of a ``stop`` parameter: a flat JSON list of at most ``max_strings`` strings, at most
    ``MAX_STOP_CHARS`` characters of JSON (checked before it is parsed)."""
    hint = 'parameter stop must be a JSON list of strings (string_param), as in ["\\n\\n", "END"]'
    if not isinstance(value, str):
        raise bad_parameter("stop", f"{hint}; got {value!r:.100}")
    if len(value) > MAX_STOP_CHARS:
        raise bad_parameter("stop", f"{hint}, at most {MAX_STOP_CHARS} characters long; got {len(value)}")
    if (depth := _json_depth(value)) > 1:
        raise bad_parameter("stop", f"{hint}, not nested: got arrays or objects nested {depth} deep")
    try:
        strings = json.loads(value)
    except ValueError:  # not JSON, or a number of more digits than Python converts
        raise bad_parameter("stop", f"{hint}; got {value[:100]!r}") from None
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise bad_parameter("stop", f"{hint}; got {value[:100]!r}")
    if len(strings) > max_strings:
        raise bad_parameter(
            "stop", f"parameter stop may hold at most {max_strings} strings (max_stop_strings), got {len(strings)}"
        )
    return strings


# -- outputs ----------------------------------------------------------------------------------------------------


def bytes_contents(values: Iterable[str]) -> bytes:
    """Texts as raw BYTES contents (UTF-8, each after its 4-byte little-endian length)."""
    return b"".join(LENGTH_PREFIX.pack(len(data)) + data for data in (v.encode() for v in values))


@dataclass(frozen=True)
class Output:
    """An output's value: its shape and raw contents (the datatype is the model's)."""

    shape: tuple[int, ...]
    raw: bytes


def text_output(texts: list[str]) -> Output:
    return Output((len(texts),), bytes_contents(texts))


def probabilities_output(rows: list[np.ndarray]) -> Output:
    array = np.asarray(rows, dtype="<f4")
    return Output(array.shape, array.tobytes())


def count_output(value: int) -> Output:
    return Output((1,), np.asarray([value], "<u8").tobytes())


def infer_response(
    request: ip.ModelInferRequest,
    model: ServedModel,
    values: dict[str, Output],
    wanted: list[str],
    final: bool | None = None,
) -> ip.ModelInferResponse:
    """The response carrying the wanted outputs among ``values``, the request's id, and (in a stream) whether it
    is the request's last."""
    datatypes = {spec.name: spec.datatype for spec in signature(model)[1]}
    names = [name for name in wanted if name in values]
    response = ip.ModelInferResponse(
        model_name=model.name,
        model_version=str(model.version),
        id=request.id,
        outputs=[
            ip.ModelInferResponse.InferOutputTensor(name=name, datatype=datatypes[name], shape=values[name].shape)
            for name in names
        ],
        raw_output_contents=[values[name].raw for name in names],
    )
    if final is not None:
        response.parameters[FINAL].bool_param = final
    return response
