"""The sampler graph and the multi-step decode graph of a language model.

Sampling is defined once, as ONNX operators (``add_sampler``), and used in two
graphs written beside the step graph:

- ``sample.onnx``: one token per row from its logits, its parameters and its
  uniform draw. The server draws a turn's first character with it (right after
  the prompt), and a runtime without a decode graph samples with it after each
  step.
- ``decode.onnx``: K characters per row in one call. A ``Scan`` over K whose
  body feeds each row's pending token (the character already drawn and sent,
  not yet read), steps every layer, and samples the next token from the new
  logits with the same operators as ``sample.onnx``. A row runs ``steps[row]``
  iterations and keeps its state, logits and token through ``Where`` after
  that, so each row ends exactly after the characters it was asked to read.

The random draws are inputs: the server computes each row's uniforms from its
session's (seed, position) stream, so what a row draws never depends on its
batch or on K. Sampling runs in float64 on each row alone (element-wise ``Pow``,
``TopK`` over the vocabulary, ``CumSum`` along it; the only reductions are
``ReduceMax`` and integer sums, exact in any order), so ``invariance.py`` can
hold both graphs to the same bitwise standard as the step graph.

The sampling rule (every row, every call): temperature 0 is greedy (``ArgMax``
of the logits, the first maximum). Otherwise the weights
``e ** (l / T - max(l / T))`` (float64, ``Pow``: see ``sampling_weights``) are
ranked by ``TopK`` (ties: lower index first), divided by their sum (added in
vocabulary order), and truncated to the first ``top_k`` ranks (0: no limit)
and to the ranks whose exclusive cumulative probability is below ``top_p``
(1: no limit); the first rank is always kept. The token is the first kept rank
whose cumulative kept probability exceeds ``u`` times their total. A row that
neither ``top_k`` nor ``top_p`` limits walks its weights in vocabulary order
instead (the first token whose cumulative weight exceeds ``u`` times the total:
the same distribution, not the same token for a given ``u``), and a batch is
sorted only when one of its rows is limited (an ``If``); which branch runs never
changes a row's token, as ``invariance.py`` checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from lstm_server.runtime.model_repository import TensorSpec

from .step_graph import IR_VERSION, Graph, charlm_weights, split_layers, stack_layers, value_info

DOUBLE, INT64, BOOL, FLOAT = TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL, TensorProto.FLOAT
SAMPLE_FILE_DESCRIPTION = (
    "lstm_export.decode_graph: sampling as ONNX operators, float64, row by row (Pow, CumSum, TopK, If: no float "
    "reduction whose order could depend on the batch)"
)
DECODE_FILE_DESCRIPTION = (
    "lstm_export.decode_graph: one Scan over K whose body feeds each row's pending token, steps every layer with "
    "the step graph's operators and weights (per-row int8 for an int8 entry), computes the logits with the same "
    "head, and samples with the sampler's operators; a row past its steps keeps everything through Where"
)
SAMPLING_RULE = (
    "temperature 0 is greedy (ArgMax of the logits, the first maximum). Otherwise the weights e ** (l/T - max(l/T)) "
    "(float64, computed with Pow) are ranked by TopK (ties: lower index first), divided by their sum (added in "
    "vocabulary order), and truncated to the first "
    "top_k ranks (0: no limit) and to the ranks whose exclusive cumulative probability is below top_p (1: no "
    "limit); the first rank is always kept. The token is the first kept rank whose cumulative kept probability "
    "exceeds u times their total (u: the row's draw, uniform in [0, 1)). A row that neither top_k nor top_p limits "
    "walks the weights in vocabulary order instead of rank order (the same distribution; a batch is sorted only "
    "when some row is limited)"
)


def sampler_signature(vocab_size: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of ``sample.onnx``, in order."""
    inputs = (
        TensorSpec("logits", "float32", ("batch", vocab_size)),
        TensorSpec("draws", "float64", ("batch",)),
        *_sampling_specs(),
    )
    return inputs, (TensorSpec("token", "int64", ("batch",)),)


def decode_signature(
    num_layers: int, hidden_size: int, vocab_size: int
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of ``decode.onnx``, in order; ``steps_per_call`` is K."""
    state = (num_layers, "batch", hidden_size)
    inputs = (
        TensorSpec("tokens", "int64", ("batch",)),
        TensorSpec("h0", "float32", state),
        TensorSpec("c0", "float32", state),
        TensorSpec("draws", "float64", ("batch", "steps_per_call")),
        *_sampling_specs(),
        TensorSpec("steps", "int64", ("batch",)),
    )
    outputs = (
        TensorSpec("sampled", "int64", ("batch", "steps_per_call")),
        TensorSpec("logits", "float32", ("batch", vocab_size)),
        TensorSpec("hn", "float32", state),
        TensorSpec("cn", "float32", state),
    )
    return inputs, outputs


def _sampling_specs() -> tuple[TensorSpec, ...]:
    return (
        TensorSpec("temperature", "float64", ("batch",)),
        TensorSpec("top_k", "int64", ("batch",)),
        TensorSpec("top_p", "float64", ("batch",)),
    )


@dataclass(frozen=True)
class SamplerParams:
    """The per-row sampling parameters as graph values, computed once per call (outside any loop)."""

    greedy: str  # bool [batch]: temperature 0
    divisor: str  # float64 [batch, 1]: the temperature (1 for greedy rows)
    truncated: str  # bool [batch]: top_k or top_p limits the row (sampled from its ranked distribution)
    any_truncated: str  # bool scalar: whether any row needs the ranked distribution
    within_k: str  # bool [batch, vocab]: the ranks a row's top_k keeps, the first always
    top_p: str  # float64 [batch, 1]


def sampler_params(g: Graph, temperature: str, top_k: str, top_p: str, vocab: int) -> SamplerParams:
    """``temperature`` [batch] (0: greedy), ``top_p`` [batch] in (0, 1] (float64) and ``top_k`` [batch] (int64, 0:
    all) as the values ``add_sampler`` uses."""
    column = g.ints([1])
    zero, one = g.const(np.float64(0.0), "zero_f64"), g.const(np.float64(1.0), "one_f64")
    greedy = g.op("LessOrEqual", temperature, zero)
    limited = g.op("Or", g.op("Greater", top_k, g.const(np.int64(0), "zero")), g.op("Less", top_p, one))
    truncated = g.op("And", g.op("Not", greedy), limited)
    limit = g.op(
        "Where", g.op("Greater", top_k, g.const(np.int64(0), "zero")), top_k, g.const(np.int64(vocab), "vocab")
    )
    ranks = g.const(np.arange(vocab, dtype=np.int64)[None, :], "ranks")
    within_k = g.op(
        "Or", g.op("Less", ranks, g.op("Unsqueeze", limit, column)), g.const(np.arange(vocab)[None, :] == 0, "first")
    )
    return SamplerParams(
        greedy=greedy,
        divisor=g.op("Unsqueeze", g.op("Where", greedy, one, temperature), column),
        truncated=truncated,
        any_truncated=g.op("Cast", g.op("ReduceMax", g.op("Cast", truncated, to=INT64), keepdims=0), to=BOOL),
        within_k=within_k,
        top_p=g.op("Unsqueeze", top_p, column),
    )


def _first_above(g: Graph, cumulative: str, u: str) -> str:
    """Per row, the first index [batch, 1] whose ``cumulative`` [batch, n] weight exceeds ``u`` [batch, 1] times the
    row's total (its last cumulative value)."""
    total = g.op("Gather", cumulative, g.const(np.array([-1], np.int64), "last_column"), axis=1)  # [batch, 1]
    below = g.op("LessOrEqual", cumulative, g.op("Mul", u, total))
    index = g.op("ReduceSum", g.op("Cast", below, to=INT64), g.ints([-1]), keepdims=1)  # integers: exact
    return g.op("Min", index, g.op("Sub", g.op("Shape", cumulative, start=1, end=2), g.const(np.int64(1), "one")))


def sampling_weights(g: Graph, logits: str, params: SamplerParams) -> tuple[str, str]:
    """(weights, cumulative) [batch, vocab], float64: ``e ** (l / T - max(l / T))`` and its running sum in vocabulary
    order. ``Pow`` and ``CumSum``, not ``Exp`` and ``ReduceSum``: onnxruntime's float64 ``Exp`` computes the elements
    at the end of a vectorized block (which ones depends on the batch) with its scalar code, which rounds some
    differently, and its float64 ``ReduceSum`` adds a row in an order that depends on where the row starts in memory;
    either would make a row's token depend on its batch. ``Pow`` calls the C library's ``pow`` element by element."""
    scaled = g.op("Div", g.op("Cast", logits, to=DOUBLE), params.divisor)
    shifted = g.op("Sub", scaled, g.reduce_max_last(scaled))  # <= 0; ReduceMax is exact in any order
    weights = g.op("Pow", g.const(np.float64(np.e), "e"), shifted)
    return weights, g.op("CumSum", weights, g.const(np.int64(-1), "last_axis"))


def _ranked_draw(g: Graph, weights: str, total: str, u: str, params: SamplerParams) -> str:
    """Tokens [batch, 1] drawn from each row's ranked distribution truncated by its top_k and top_p; ``total``
    [batch, 1] is the sum of the row's weights."""
    ranked, order = g.op(
        "TopK", weights, g.op("Shape", weights, start=1, end=2), outputs=2, axis=-1, largest=1, sorted=1
    )
    probs = g.op("Div", ranked, total)
    before = g.op("CumSum", probs, g.const(np.int64(-1), "last_axis"), exclusive=1)
    keep = g.op("And", params.within_k, g.op("Less", before, params.top_p))
    kept = g.op("Where", keep, probs, g.const(np.float64(0.0), "zero_f64"))
    chosen = _first_above(g, g.op("CumSum", kept, g.const(np.int64(-1), "last_axis")), u)
    return g.op("GatherElements", order, chosen, axis=1)


def add_sampler(g: Graph, logits: str, draws: str, params: SamplerParams) -> str:
    """Nodes that draw one token [batch] (int64) per row of ``logits`` [batch, vocab] (float32) with its uniform
    ``draws`` [batch] (float64, in [0, 1)); the rule is in the module docstring."""
    column = g.ints([1])
    u = g.op("Unsqueeze", draws, column)
    weights, cumulative = sampling_weights(g, logits, params)
    plain = _first_above(g, cumulative, u)  # [batch, 1]: vocabulary order
    ranked = g.child()
    total = ranked.op("Gather", cumulative, ranked.const(np.array([-1], np.int64), "last_column"), axis=1)
    chosen = ranked.op(
        "Where",
        ranked.op("Unsqueeze", params.truncated, column),
        _ranked_draw(ranked, weights, total, u, params),
        plain,
    )
    ranked_branch = ranked.graph("ranked", [], [value_info(chosen, INT64)])
    unranked = g.child()
    kept_plain = unranked.op("Identity", plain)
    plain_branch = unranked.graph("plain", [], [value_info(kept_plain, INT64)])
    drawn = g.op("If", params.any_truncated, then_branch=ranked_branch, else_branch=plain_branch)
    return g.op("Where", params.greedy, g.op("ArgMax", logits, axis=-1, keepdims=0), g.op("Squeeze", drawn, column))


def _sampling_inputs(batch: str = "batch") -> list[onnx.ValueInfoProto]:
    return [
        value_info("temperature", DOUBLE, [batch]),
        value_info("top_k", INT64, [batch]),
        value_info("top_p", DOUBLE, [batch]),
    ]


def _model(g: Graph, name: str, inputs: list, outputs: list, producer: str) -> onnx.ModelProto:
    graph = g.graph(name, inputs, outputs)
    graph.initializer.extend(g.shared["initializers"].values())
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", g.opset)], ir_version=IR_VERSION, producer_name=producer
    )


def build_sampler_model(vocab_size: int, opset: int = 17) -> onnx.ModelProto:
    """``sample.onnx``: (logits [batch, vocab], draws [batch], temperature, top_k, top_p) -> token [batch]."""
    g = Graph(opset)
    params = sampler_params(g, "temperature", "top_k", "top_p", vocab_size)
    token = add_sampler(g, "logits", "draws", params)
    g.outputs({"token": token})
    inputs = [value_info("logits", FLOAT, ["batch", vocab_size]), value_info("draws", DOUBLE, ["batch"])]
    return _model(
        g, "sampler", inputs + _sampling_inputs(), [value_info("token", INT64, ["batch"])], "lstm_export.decode_graph"
    )


def build_decode_model(model: nn.Module, quantize: bool = False, opset: int = 17) -> onnx.ModelProto:
    """``decode.onnx``: (tokens [batch], h0, c0, draws [batch, K], temperature, top_k, top_p, steps [batch]) ->
    (sampled [batch, K], logits [batch, vocab], hn, cn).

    Row r feeds ``tokens[r]``, then for each of its ``steps[r]`` iterations k samples ``sampled[r, k]`` from the
    new logits with ``draws[r, k]`` and feeds it next; ``logits``, ``hn`` and ``cn`` are those after the last
    token it read (its last sampled token is drawn, not read). Past ``steps[r]`` a row changes nothing and its
    ``sampled`` is -1; a row with 0 steps returns its inputs (logits: zeros)."""
    model = model.eval()
    vocab, layers, hidden = model.config.vocab_size, model.config.num_layers, model.config.hidden_size
    g = Graph(opset)
    lm = charlm_weights(g, model, quantize)
    params = sampler_params(g, "temperature", "top_k", "top_p", vocab)
    body = g.child()
    hs = [body.name(f"h{i}") for i in range(layers)]
    cs = [body.name(f"c{i}") for i in range(layers)]
    token, logits, draw, active = (body.name(n) for n in ("token", "logits", "draw", "active"))
    new_h, new_c = lm.step(body, body.op("Gather", lm.table, token), hs, cs)
    new_logits = lm.head.apply(body, new_h[-1])
    new_token = add_sampler(body, new_logits, draw, params)
    row = body.op("Unsqueeze", active, body.ints([1]))  # [batch, 1]
    kept = [body.op("Where", row, new, old) for new, old in zip([*new_h, *new_c], [*hs, *cs], strict=True)]
    outputs = [*kept, body.op("Where", active, new_token, token), body.op("Where", row, new_logits, logits)]
    outputs.append(body.op("Where", active, new_token, body.const(np.int64(-1), "minus_one")))
    states = [*hs, *cs, token, logits]
    body_inputs = [value_info(n) for n in [*hs, *cs]] + [value_info(token, INT64), value_info(logits)]
    body_inputs += [value_info(draw, DOUBLE), value_info(active, BOOL)]
    step = body.graph(
        "decode_step",
        body_inputs,
        [value_info(n) for n in outputs[:-3]]
        + [value_info(outputs[-3], INT64), value_info(outputs[-2]), value_info(outputs[-1], INT64)],
    )
    iterations = g.op("Shape", "draws", start=1, end=2)  # [1]: K
    k = g.op(
        "Range", g.const(np.int64(0), "zero"), g.op("Squeeze", iterations, g.ints([0])), g.const(np.int64(1), "one")
    )
    active_steps = g.op(
        "Less", g.op("Unsqueeze", k, g.ints([0])), g.op("Unsqueeze", "steps", g.ints([1]))
    )  # [batch, K]
    shape = g.op("Concat", g.op("Shape", "tokens"), g.ints([vocab]), axis=0)
    no_logits = g.op("ConstantOfShape", shape, value=numpy_helper.from_array(np.zeros(1, np.float32)))
    results = g.op(
        "Scan",
        *split_layers(g, "h0", layers),
        *split_layers(g, "c0", layers),
        "tokens",
        no_logits,
        "draws",
        active_steps,
        outputs=len(states) + 1,
        body=step,
        num_scan_inputs=2,
        scan_input_axes=[1, 1],
        scan_output_axes=[1],
    )
    g.outputs(
        {
            "sampled": results[-1],
            "logits": results[2 * layers + 1],
            "hn": stack_layers(g, results[:layers]),
            "cn": stack_layers(g, results[layers : 2 * layers]),
        }
    )
    state = [layers, "batch", hidden]
    inputs = [value_info("tokens", INT64, ["batch"]), value_info("h0", FLOAT, state), value_info("c0", FLOAT, state)]
    inputs += [value_info("draws", DOUBLE, ["batch", "steps_per_call"]), *_sampling_inputs()]
    inputs.append(value_info("steps", INT64, ["batch"]))
    outputs_info = [
        value_info("sampled", INT64, ["batch", "steps_per_call"]),
        value_info("logits", FLOAT, ["batch", vocab]),
        value_info("hn", FLOAT, state),
        value_info("cn", FLOAT, state),
    ]
    return _model(g, model.__class__.__name__ + "Decode", inputs, outputs_info, "lstm_export.decode_graph")
