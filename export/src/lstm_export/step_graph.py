"""ONNX graphs written op by op from a checkpoint's weights, so that each row of a batch is computed on its own.

The fused ONNX ``LSTM`` operator and ``quantize_dynamic`` both let a row's
result depend on the rest of its batch (the fused kernel's blocking and its
handling of ``sequence_lens``; one activation scale for the whole batch).
These graphs use only operators whose result for one row is a function of
that row alone in onnxruntime's CPU kernels: ``Gather``, ``MatMul`` against a
2-D constant weight (prepacked, one kernel for every batch size), per-row
int8 ``MatMulInteger`` (exact integer sums), element-wise operators,
``ReverseSequence`` with each row's own length, and ``Scan`` over time. The
claim is not taken on trust: ``invariance.py`` checks every export.

Layout (gate order inside the graph is i, f, o, g, so one ``Sigmoid`` covers three gates):

- language model: one ``Scan`` over time steps all layers, so a one-token
  call (the hot path of serving) is one iteration of one loop; the first
  layer's input projection is folded into a [vocab, 4 * hidden] table
  (computed in float64) read with ``Gather`` for all time steps at once; a
  deeper layer multiplies ``[x, h] @ [W_ih; W_hh]`` in one product;
- classifier: each layer's input projection for all time steps is one matrix
  multiply hoisted out of the recurrence; both directions of a layer share
  one ``Scan`` (a [2, batch, hidden] state, one 2-D matrix multiply per
  direction); the backward direction reads each row reversed within its own
  length; a row past its length keeps its state, sum and max through
  ``Where``, so padding, whatever it holds, changes nothing; max and mean
  pooling are running values carried in the ``Scan`` state, summed in the
  row's own order.

The same operators see the same rows whatever the call's length, so stepping
a text one token at a time and reading it at once give identical bits.

Nested subgraphs are avoided on purpose: in onnxruntime 1.31 a ``MatMul`` two
subgraph levels below its constant weight is not prepacked, and its one-row
kernel then rounds differently from the many-row one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

IR_VERSION = 8  # onnx.helper's default IR version is newer than onnxruntime 1.31 reads
QUANT_ZERO = 128  # the uint8 zero point of quantized activations
QUANT_LEVELS = 127.0  # symmetric int8 range of weights and activations
FLOAT = TensorProto.FLOAT

GRAPH_DESCRIPTION = (
    "lstm_export.step_graph: Gather, MatMul / MatMulInteger against 2-D constant weights, element-wise ops, "
    "ReverseSequence and Scan over time (language model: one Scan for all layers; classifier: one per layer, both "
    "directions in it); no fused LSTM operator"
)
QUANTIZATION_METHOD = (
    "per-row int8 (lstm_export.step_graph): every activation row x of the LSTM's matrix multiplies gets its own "
    "scale max|x|/127 and is stored as uint8 round(x/scale)+128; weights int8 with one symmetric scale per output "
    "column; MatMulInteger (activation zero point 128) sums exactly in int32, then times the row and column scales "
    "(a language model layer past the first quantizes its [x, h] as one row). "
    "The classifier's embedding is int8 per token; the language model's first-layer gate table and both output "
    "heads stay float32. No scale is shared between rows, so the result of a row never depends on its batch."
)


@dataclass(frozen=True)
class Direction:
    """One direction of one LSTM layer, gates reordered to (i, f, o, g), transposed for ``x @ W``, in float64."""

    w_ih: np.ndarray  # [input, 4 * hidden]
    w_hh: np.ndarray  # [hidden, 4 * hidden]
    bias: np.ndarray  # [4 * hidden]: bias_ih + bias_hh


def lstm_directions(lstm: nn.LSTM) -> list[list[Direction]]:
    """The weights of ``lstm`` as ``[layer][direction]``."""
    hidden = lstm.hidden_size
    i_f, g, o = np.arange(0, 2 * hidden), np.arange(2 * hidden, 3 * hidden), np.arange(3 * hidden, 4 * hidden)
    order = np.concatenate([i_f, o, g])  # torch's (i, f, g, o) -> (i, f, o, g)
    layers = []
    for layer in range(lstm.num_layers):
        directions = []
        for direction in range(2 if lstm.bidirectional else 1):
            suffix = f"l{layer}" + ("_reverse" if direction else "")

            def weight(name: str, suffix: str = suffix) -> np.ndarray:
                return getattr(lstm, f"{name}_{suffix}").detach().cpu().double().numpy()

            bias = weight("bias_ih") + weight("bias_hh") if lstm.bias else np.zeros(4 * hidden)
            directions.append(Direction(weight("weight_ih")[order].T, weight("weight_hh")[order].T, bias[order]))
        layers.append(directions)
    return layers


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per output column (the last axis): (int8 weights, float32 factors).

    The factor is the column's scale divided by 127: the graph multiplies by each row's peak (max|x|) instead of
    its scale (peak / 127), which saves one operator per product."""
    peak = np.abs(weight).max(axis=-2, keepdims=True)
    scale = np.where(peak > 0, peak / QUANT_LEVELS, 1.0)
    quantized = np.clip(np.round(weight / scale), -QUANT_LEVELS, QUANT_LEVELS).astype(np.int8)
    return quantized, (scale / QUANT_LEVELS).astype(np.float32)


def quantize_table_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8 of a table, stored as uint8 (+128): (uint8 [rows, k], float32 peaks [rows, 1]),
    a row being ``(q - 128) * peak / 127``, as ``quantize_rows`` makes them in the graph."""
    peak = np.abs(table).max(axis=1, keepdims=True)
    scale = np.where(peak > 0, peak / QUANT_LEVELS, 1.0)
    quantized = np.clip(np.round(table / scale), -QUANT_LEVELS, QUANT_LEVELS) + QUANT_ZERO
    return quantized.astype(np.uint8), (scale * QUANT_LEVELS).astype(np.float32)


class Graph:
    """The nodes of one graph (the main graph or a ``Scan`` body); every constant lives in the main graph."""

    def __init__(self, opset: int, shared: dict[str, Any] | None = None) -> None:
        self.opset = opset
        self.shared = shared or {"counter": itertools.count(), "initializers": {}, "small": {}}
        self.nodes: list[onnx.NodeProto] = []

    def child(self) -> Graph:
        return Graph(self.opset, self.shared)

    def name(self, hint: str) -> str:
        return f"{hint}_{next(self.shared['counter'])}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attributes: Any) -> Any:
        """Add a node; its output name, or a list of names when ``outputs`` > 1."""
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.name(op_type), **attributes))
        return names[0] if outputs == 1 else names

    def const(self, value: Any, hint: str, dtype: Any = None) -> str:
        """A constant: an initializer of the main graph (visible in every subgraph); small ones are shared."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 16 else None
        if key is not None and key in self.shared["small"]:
            return self.shared["small"][key]
        name = self.name(hint)
        self.shared["initializers"][name] = numpy_helper.from_array(array, name)
        if key is not None:
            self.shared["small"][key] = name
        return name

    def ints(self, values: list[int]) -> str:
        return self.const(np.array(values, np.int64), "ints")

    def scalar(self, value: float) -> str:
        return self.const(np.float32(value), "scalar")

    def reduce_max_last(self, x: str) -> str:
        if self.opset >= 18:
            return self.op("ReduceMax", x, self.ints([-1]), keepdims=1)
        return self.op("ReduceMax", x, axes=[-1], keepdims=1)

    def outputs(self, names: dict[str, str]) -> None:
        """Bind graph outputs to computed values."""
        for output, value in names.items():
            self.nodes.append(helper.make_node("Identity", [value], [output], name=self.name("output")))

    def graph(self, name: str, inputs: list, outputs: list) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, inputs, outputs)


def value_info(name: str, elem_type: int = FLOAT, shape: list | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def quantize_rows(g: Graph, x: str) -> tuple[str, str]:
    """Per-row (last axis) symmetric quantization: (uint8 q, float32 peaks [..., 1]); x ~ (q - 128) * peak / 127."""
    peak = g.op("Max", g.reduce_max_last(g.op("Abs", x)), g.scalar(1e-30))  # an all-zero row gets q = 128
    inverse = g.op("Div", g.scalar(QUANT_LEVELS), peak)
    shifted = g.op("Add", g.op("Round", g.op("Mul", x, inverse)), g.scalar(QUANT_ZERO))
    return g.op("Cast", shifted, to=TensorProto.UINT8), peak


@dataclass(frozen=True)
class _Projection:
    """``x @ W (+ b)`` over the last axis of x: float32, or per-row int8 activations x per-column int8 weights."""

    weight: str  # float32 [k, n], or int8 [(d,) k, n]
    column_scale: str | None  # float32 [(d, 1,) n] when int8: the column's scale / 127
    bias: str | None

    def apply(self, g: Graph, x: str) -> str:
        if self.column_scale is None:
            y = g.op("MatMul", x, self.weight)
            return y if self.bias is None else g.op("Add", y, self.bias)
        return self.apply_quantized(g, *quantize_rows(g, x))

    def apply_quantized(self, g: Graph, quantized: str, row_peak: str) -> str:
        """The product for activations already quantized (uint8, zero point 128) against their rows' peaks."""
        summed = g.op("MatMulInteger", quantized, self.weight, g.const(np.uint8(QUANT_ZERO), "zero_point"))
        y = g.op("Mul", g.op("Mul", g.op("Cast", summed, to=FLOAT), row_peak), self.column_scale)
        return y if self.bias is None else g.op("Add", y, self.bias)


def _projection(g: Graph, weight: np.ndarray, bias: np.ndarray | None, quantize: bool, hint: str) -> _Projection:
    bias_name = None if bias is None else g.const(bias.astype(np.float32), f"{hint}_bias")
    if not quantize:
        return _Projection(g.const(weight.astype(np.float32), f"{hint}_weight"), None, bias_name)
    quantized, scale = quantize_columns(weight)
    return _Projection(g.const(quantized, f"{hint}_weight_int8"), g.const(scale, f"{hint}_scale"), bias_name)


def _head(g: Graph, linear: nn.Linear) -> _Projection:
    weight = linear.weight.detach().double().numpy().T
    return _projection(g, weight, linear.bias.detach().double().numpy(), False, "head")


def _cell(g: Graph, gates: str, c: str, hidden: int) -> tuple[str, str]:
    """(h, c) after one step, from the pre-activations ``gates`` (i, f, o, g) and the previous cell ``c``."""
    sigmoid_part, cell_part = g.op("Split", gates, g.ints([3 * hidden, hidden]), outputs=2, axis=-1)
    i, f, o = g.op("Split", g.op("Sigmoid", sigmoid_part), g.ints([hidden] * 3), outputs=3, axis=-1)
    c_new = g.op("Add", g.op("Mul", f, c), g.op("Mul", i, g.op("Tanh", cell_part)))
    return g.op("Mul", o, g.op("Tanh", c_new)), c_new


def _concat0(g: Graph, parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else g.op("Concat", *parts, axis=0)


@dataclass(frozen=True)
class CharLMWeights:
    """A language model's constants in a graph: the first layer's gate table, the layers' products, the head."""

    table: str  # [vocab, 4 * hidden]: embedding @ W_ih0 + bias0
    products: list[_Projection]  # layer 0: h @ W_hh0; deeper: [x, h] @ [W_ih; W_hh] + bias
    head: _Projection
    hidden: int

    @property
    def layers(self) -> int:
        return len(self.products)

    def step(self, body: Graph, x: str, hs: list[str], cs: list[str]) -> tuple[list[str], list[str]]:
        """Every layer's (h, c) after one time step whose first-layer gate input is ``x`` (a row of the table)."""
        new_h, new_c = [], []
        for index, product in enumerate(self.products):
            if index == 0:
                gates = body.op("Add", x, product.apply(body, hs[0]))
            else:
                gates = product.apply(body, body.op("Concat", new_h[-1], hs[index], axis=-1))
            h, c = _cell(body, gates, cs[index], self.hidden)
            new_h.append(h)
            new_c.append(c)
        return new_h, new_c


def charlm_weights(g: Graph, model: nn.Module, quantize: bool) -> CharLMWeights:
    """Add a language model's constants to the main graph ``g``. A deeper layer multiplies ``[x, h]`` by
    ``[W_ih; W_hh]`` at once (for int8, ``[x, h]`` is quantized as one row)."""
    layers = [directions[0] for directions in lstm_directions(model.lstm)]
    embedding = model.embedding.weight.detach().double().numpy()
    table = g.const((embedding @ layers[0].w_ih + layers[0].bias).astype(np.float32), "gate_table")
    head = _head(g, model.head)
    products = [_projection(g, layers[0].w_hh, None, quantize, "w_hh0")]
    for index, layer in enumerate(layers[1:], start=1):
        weight = np.concatenate([layer.w_ih, layer.w_hh], axis=0)  # [2 * hidden, 4 * hidden]
        products.append(_projection(g, weight, layer.bias, quantize, f"w{index}"))
    return CharLMWeights(table, products, head, model.config.hidden_size)


def split_layers(g: Graph, state: str, layers: int) -> list[str]:
    """``h0`` or ``c0`` [layers, batch, hidden] as one [batch, hidden] value per layer."""
    return [g.op("Gather", state, g.const(np.int64(i), "layer"), axis=0) for i in range(layers)]


def stack_layers(g: Graph, values: list[str]) -> str:
    """One [batch, hidden] value per layer as [layers, batch, hidden]."""
    return _concat0(g, [g.op("Unsqueeze", v, g.ints([0])) for v in values])


def _charlm_graph(model: nn.Module, quantize: bool, opset: int) -> Graph:
    """One ``Scan`` over time whose body steps every layer: a one-token call (the hot path of serving) is one
    iteration; layer 0 reads its input projection from the gate table for all time steps at once."""
    g = Graph(opset)
    lm = charlm_weights(g, model, quantize)
    body = g.child()
    hs, cs = [body.name(f"h{i}") for i in range(lm.layers)], [body.name(f"c{i}") for i in range(lm.layers)]
    xt = body.name("x")
    new_h, new_c = lm.step(body, xt, hs, cs)
    y = lm.head.apply(body, new_h[-1])  # in the loop, as in the decode graph: the same kernel, the same bits
    step = body.graph("step", [value_info(n) for n in [*hs, *cs, xt]], [value_info(n) for n in [*new_h, *new_c, y]])
    results = g.op(
        "Scan",
        *split_layers(g, "h0", lm.layers),
        *split_layers(g, "c0", lm.layers),
        g.op("Gather", lm.table, "tokens"),  # [batch, time, 4 * hidden]
        outputs=2 * lm.layers + 1,
        body=step,
        num_scan_inputs=1,
        scan_input_axes=[1],
        scan_output_axes=[1],
    )
    hn = stack_layers(g, results[: lm.layers])
    cn = stack_layers(g, results[lm.layers : 2 * lm.layers])
    g.outputs({"logits": results[-1], "hn": hn, "cn": cn})
    return g


def _classifier_graph(model: nn.Module, quantize: bool, opset: int) -> Graph:
    config = model.config
    hidden, d = config.hidden_size, 2 if config.bidirectional else 1
    g = Graph(opset)
    layers = lstm_directions(model.lstm)
    embedding = model.embedding.weight.detach().double().numpy()
    head = _head(g, model.head)
    time = g.op("Squeeze", g.op("Shape", "tokens", start=1, end=2), g.ints([0]))
    steps = g.op("Range", g.const(np.int64(0), "zero"), time, g.const(np.int64(1), "one"))
    lengths = g.op("Unsqueeze", "lengths", g.ints([1]))  # [batch, 1]
    valid = g.op("Less", g.op("Unsqueeze", steps, g.ints([0])), lengths)
    mask = g.op("Unsqueeze", valid, g.ints([2]))  # [batch, time, 1]: True on a row's own tokens
    hs, cs = [], []
    x = None
    for layer, directions in enumerate(layers):
        last = layer == len(layers) - 1
        w_ih = np.concatenate([r.w_ih for r in directions], axis=1)  # both directions side by side
        bias = np.concatenate([r.bias for r in directions])
        projection = _projection(g, w_ih, bias, quantize, f"w_ih{layer}")
        if layer == 0 and quantize:  # the stored int8 rows feed MatMulInteger as they are
            table, peaks = quantize_table_rows(embedding)
            tokens_q = g.op("Gather", g.const(table, "embedding_uint8"), "tokens")
            row_peak = g.op("Gather", g.const(peaks, "embedding_peak"), "tokens")
            projected = projection.apply_quantized(g, tokens_q, row_peak)
        else:
            if layer == 0:
                x = g.op("Gather", g.const(embedding.astype(np.float32), "embedding"), "tokens")
            projected = projection.apply(g, x)
        parts = g.op("Split", projected, g.ints([4 * hidden] * d), outputs=d, axis=-1) if d > 1 else [projected]
        if d > 1:
            parts[1] = g.op("ReverseSequence", parts[1], "lengths", batch_axis=0, time_axis=1)
        stacked = _concat0(g, [g.op("Unsqueeze", p, g.ints([0])) for p in parts])  # [d, batch, time, 4 * hidden]
        rows = (g.ints([layer * d]), g.ints([layer * d + d]), g.ints([0]))
        h0, c0 = g.op("Slice", "h0", *rows), g.op("Slice", "c0", *rows)
        states = [h0, c0]
        if last:  # the running sum starts at +0.0 and the running max at -inf
            shape = g.op("Shape", h0)
            for start in (0.0, -np.inf):
                value = numpy_helper.from_array(np.array([start], np.float32))
                states.append(g.op("ConstantOfShape", shape, value=value))
        results = g.op(
            "Scan",
            *states,
            stacked,
            mask,
            outputs=len(states) + (0 if last else 1),
            body=_classifier_step(g, directions, quantize, hidden, layer, last),
            num_scan_inputs=2,
            scan_input_axes=[2, 1],
            **({} if last else {"scan_output_axes": [2]}),
        )
        hs.append(results[0])
        cs.append(results[1])
        if not last:  # the next layer reads both directions at each original position
            outputs = g.op("Split", results[2], g.ints([1] * d), outputs=d, axis=0) if d > 1 else [results[2]]
            outputs = [g.op("Squeeze", o, g.ints([0])) for o in outputs]
            if d > 1:
                outputs[1] = g.op("ReverseSequence", outputs[1], "lengths", batch_axis=0, time_axis=1)
            x = _concat0(g, outputs) if d == 1 else g.op("Concat", *outputs, axis=-1)
    total, peak = results[2], results[3]  # [d, batch, hidden]
    mean = g.op("Div", total, g.op("Cast", lengths, to=FLOAT))
    features = [g.op("Reshape", g.op("Transpose", t, perm=[1, 0, 2]), g.ints([0, d * hidden])) for t in (peak, mean)]
    logits = head.apply(g, g.op("Concat", *features, axis=1))
    g.outputs({"logits": logits, "hn": _concat0(g, hs), "cn": _concat0(g, cs)})
    return g


def _classifier_step(
    g: Graph, directions: list[Direction], quantize: bool, hidden: int, layer: int, last: bool
) -> onnx.GraphProto:
    """One time step of every direction of ``layer``; a row whose mask is False keeps all its state."""
    if quantize:  # one batched integer product: exact sums, so no kernel choice can make rows differ
        w_hh = np.stack([r.w_hh for r in directions])  # [d, hidden, 4 * hidden]
        recurrent = [_projection(g, w_hh, None, True, f"w_hh{layer}")]
    else:  # a 2-D float product per direction: a batched 3-D one is not row-invariant in onnxruntime
        recurrent = [_projection(g, r.w_hh, None, False, f"w_hh{layer}_{i}") for i, r in enumerate(directions)]
    body = g.child()
    h, c, xt, mask = (body.name(n) for n in ("h", "c", "x", "mask"))
    states = [h, c]
    if last:
        total, peak = body.name("sum"), body.name("max")
        states += [total, peak]
    if len(recurrent) == 1:
        product = recurrent[0].apply(body, h)
    else:
        per_direction = body.op("Split", h, body.ints([1] * len(recurrent)), outputs=len(recurrent), axis=0)
        product = body.op("Concat", *(p.apply(body, s) for p, s in zip(recurrent, per_direction, strict=True)), axis=0)
    h_new, c_new = _cell(body, body.op("Add", xt, product), c, hidden)
    outputs = [body.op("Where", mask, h_new, h), body.op("Where", mask, c_new, c)]
    if last:
        outputs.append(body.op("Where", mask, body.op("Add", total, h_new), total))
        outputs.append(body.op("Where", mask, body.op("Max", peak, h_new), peak))
    else:
        outputs.append(body.op("Identity", h_new))
    inputs = [value_info(n) for n in [*states, xt]] + [value_info(mask, TensorProto.BOOL)]
    return body.graph(f"layer{layer}_step", inputs, [value_info(n) for n in outputs])


def build_step_model(model: nn.Module, task: str, quantize: bool = False, opset: int = 17) -> onnx.ModelProto:
    """The ONNX model of ``model`` (in eval mode: dropout is the identity) with the repository's signature."""
    model = model.eval()
    if task == "generation":
        g = _charlm_graph(model, quantize, opset)
        state = [model.config.num_layers, "batch", model.config.hidden_size]
        inputs = [value_info("tokens", TensorProto.INT64, ["batch", "time"])]
        logits = value_info("logits", FLOAT, ["batch", "time", model.config.vocab_size])
    elif task == "classification":
        g = _classifier_graph(model, quantize, opset)
        state = [model.config.num_layers * model.num_directions, "batch", model.config.hidden_size]
        inputs = [
            value_info("tokens", TensorProto.INT64, ["batch", "time"]),
            value_info("lengths", TensorProto.INT64, ["batch"]),
        ]
        logits = value_info("logits", FLOAT, ["batch", model.config.num_labels])
    else:
        raise ValueError(f"unknown task {task!r}: expected 'generation' or 'classification'")
    inputs += [value_info("h0", FLOAT, state), value_info("c0", FLOAT, state)]
    graph = g.graph(
        model.__class__.__name__, inputs, [logits, value_info("hn", FLOAT, state), value_info("cn", FLOAT, state)]
    )
    graph.initializer.extend(g.shared["initializers"].values())
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=IR_VERSION,
        producer_name="lstm_export.step_graph",
    )


def export_step_onnx(model: nn.Module, task: str, path: Path, quantize: bool = False, opset: int = 17) -> None:
    """Build the graph of ``model`` and save it to ``path`` (``exporter.check_onnx`` checks it)."""
    onnx.save(build_step_model(model, task, quantize, opset), str(path))
