"""Write a model as TorchScript, and the helpers shared by the ONNX exports.

Tensor names and dynamic axes follow the model repository contract
(``lstm_server.runtime.model_repository.expected_signature``). The shipped ONNX graph
is written by ``step_graph`` (batch invariant by construction, checked by
``invariance``). ``export_onnx`` keeps the previous route for comparisons
(``bench/step_graphs.py``, the tests): torch's TorchScript-based exporter
(``dynamo=False``), which maps ``nn.LSTM`` to the fused ONNX ``LSTM`` operator
and a packed sequence to its ``sequence_lens`` input; that graph is not batch
invariant (for the classifier with padding).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

DEFAULT_OPSET = 17


def input_names(task: str) -> list[str]:
    return ["tokens", "h0", "c0"] if task == "generation" else ["tokens", "lengths", "h0", "c0"]


OUTPUT_NAMES = ["logits", "hn", "cn"]


def dynamic_axes(task: str) -> dict[str, dict[int, str]]:
    axes = {
        "tokens": {0: "batch", 1: "time"},
        "h0": {1: "batch"},
        "c0": {1: "batch"},
        "hn": {1: "batch"},
        "cn": {1: "batch"},
        "logits": {0: "batch", 1: "time"} if task == "generation" else {0: "batch"},
    }
    if task == "classification":
        axes["lengths"] = {0: "batch"}
    return axes


def example_inputs(model: nn.Module, task: str, batch: int = 2, time: int = 5) -> tuple[torch.Tensor, ...]:
    """Inputs that trace every path: distinct lengths so the exporter cannot specialise on one."""
    tokens = torch.ones(batch, time, dtype=torch.long)
    h0, c0 = model.initial_state(batch)
    if task == "generation":
        return tokens, h0, c0
    lengths = torch.arange(time, time - batch, -1, dtype=torch.long).clamp(min=1)
    return tokens, lengths, h0, c0


def export_torchscript(model: nn.Module, path: Path) -> torch.jit.ScriptModule:
    """Script (not trace) the model, so batch, time and lengths stay dynamic; save and return it."""
    scripted = torch.jit.script(model.eval())
    scripted.save(str(path))
    return torch.jit.load(str(path))


def export_onnx(model: nn.Module, task: str, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Export to ONNX with the fused ``LSTM`` operator (the previous graph), then run ``check_onnx``."""
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset {opset} is too old: use {DEFAULT_OPSET} or newer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns about batch_first LSTMs and its own deprecation
        torch.onnx.export(
            model.eval(),
            example_inputs(model, task),
            str(path),
            input_names=input_names(task),
            output_names=OUTPUT_NAMES,
            dynamic_axes=dynamic_axes(task),
            opset_version=opset,
            dynamo=False,
        )
    check_onnx(path)


def check_onnx(path: Path) -> None:
    """``onnx.checker`` full check and strict shape inference; raises on any problem."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
