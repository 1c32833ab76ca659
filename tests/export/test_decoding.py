"""A language model's sampler (sample.onnx) and decode graph (decode.onnx): their contract, the sampling rule,
their bitwise agreement with the step graph, batch invariance, and the export refusing graphs that break them."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import lstm_export.decode_graph as decode_graph
import lstm_export.pipeline as pipeline
from lstm_export.decode_graph import build_decode_model, build_sampler_model
from lstm_export.invariance import (
    ModelShape,
    cdf_points,
    check_decoding_invariance,
    check_sampler_invariance,
    random_sampling,
)
from lstm_export.pipeline import ExportError, export_checkpoint
from lstm_export.verify import VerificationError, named_runner, onnx_runner, verify_decoding
from lstm_server.runtime.model_repository import list_entries, load_entry
from lstm_training.checkpoint import load_checkpoint, model_from_checkpoint

SHIPPED = Path(__file__).resolve().parents[2] / "models"
SAMPLER_IN = ["logits", "draws", "temperature", "top_k", "top_p"]
DECODE_IN = ["tokens", "h0", "c0", "draws", "temperature", "top_k", "top_p", "steps"]
DECODE_OUT = ["sampled", "logits", "hn", "cn"]


def session(path: Path | onnx.ModelProto) -> ort.InferenceSession:
    source = path.SerializeToString() if isinstance(path, onnx.ModelProto) else str(path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def runners(entry_dir: Path):
    """(step, sample, decode) runners of an entry, in signature order."""
    step = onnx_runner(session(entry_dir / "model.onnx"), "generation")
    sample = named_runner(session(entry_dir / "sample.onnx"), SAMPLER_IN, ["token"])
    decode = named_runner(session(entry_dir / "decode.onnx"), DECODE_IN, DECODE_OUT)
    return step, sample, decode


def assert_refused(checkpoints, tmp_path: Path, match: str) -> None:
    """Exporting the tiny language model fails with an ExportError matching ``match``, and writes nothing."""
    with pytest.raises(ExportError, match=match):
        export_checkpoint(checkpoints["charlm"], tmp_path / "charlm" / "1")
    assert not (tmp_path / "charlm").exists()


def signature(sess: ort.InferenceSession) -> tuple[list, list]:
    return (
        [(a.name, a.type, list(a.shape)) for a in sess.get_inputs()],
        [(a.name, a.type, list(a.shape)) for a in sess.get_outputs()],
    )


# -- the entry and its manifest ----------------------------------------------------------------------------------


def test_a_language_model_entry_ships_both_graphs_with_the_documented_signature(exported) -> None:
    entry = load_entry(exported / "charlm" / "1")
    assert {"sample.onnx", "decode.onnx"} <= set(entry.manifest["files"]) and entry.has_decode_graph
    vocab, state = len(entry.vocab), [2, "batch", 12]
    rows = ["batch"]
    assert signature(session(entry.file("sample.onnx"))) == (
        [
            ("logits", "tensor(float)", ["batch", vocab]),
            ("draws", "tensor(double)", rows),
            ("temperature", "tensor(double)", rows),
            ("top_k", "tensor(int64)", rows),
            ("top_p", "tensor(double)", rows),
        ],
        [("token", "tensor(int64)", rows)],
    )
    assert signature(session(entry.file("decode.onnx"))) == (
        [
            ("tokens", "tensor(int64)", rows),
            ("h0", "tensor(float)", state),
            ("c0", "tensor(float)", state),
            ("draws", "tensor(double)", ["batch", "steps_per_call"]),
            ("temperature", "tensor(double)", rows),
            ("top_k", "tensor(int64)", rows),
            ("top_p", "tensor(double)", rows),
            ("steps", "tensor(int64)", rows),
        ],
        [
            ("sampled", "tensor(int64)", ["batch", "steps_per_call"]),
            ("logits", "tensor(float)", ["batch", vocab]),
            ("hn", "tensor(float)", state),
            ("cn", "tensor(float)", state),
        ],
    )
    for name in ("sample.onnx", "decode.onnx"):
        onnx.checker.check_model(onnx.load(str(entry.file(name))), full_check=True)
    block = entry.manifest["decoding"]
    assert [t["name"] for t in block["sampler"]["inputs"]] == SAMPLER_IN and block["sampler"]["file"] == "sample.onnx"
    assert [t["name"] for t in block["decode"]["inputs"]] == DECODE_IN and block["decode"]["file"] == "decode.onnx"
    assert [t["name"] for t in block["decode"]["outputs"]] == DECODE_OUT
    assert block["decode"]["inputs"][3] == {"name": "draws", "dtype": "float64", "shape": ["batch", "steps_per_call"]}
    assert "exclusive cumulative probability is below top_p" in block["sampling_rule"]
    assert len(block["verified"]) == 5 and all("1 and" in v or "1 intra-op" in v for v in block["verified"])
    record = block["batch_invariance"]["onnxruntime"]
    assert record["invariant"] is True and record["first_failure"] is None
    assert record["checked"].startswith("batch sizes 1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 23, 32, 47, 64")
    assert "intra-op threads" in record["checked"]
    # the decoding record is not a backend: the entry's backends and their records are unchanged
    assert set(entry.manifest["batch_invariance"]) == set(entry.manifest["backends"]) == {"onnxruntime", "torchscript"}
    classifier = load_entry(exported / "sentiment" / "1")
    assert "decoding" not in classifier.manifest and not classifier.has_decode_graph
    assert not {"sample.onnx", "decode.onnx"} & set(classifier.manifest["files"])


def test_the_int8_entry_decodes_with_the_int8_graph(checkpoints, tmp_path) -> None:
    out = tmp_path / "charlm" / "2"
    manifest = export_checkpoint(checkpoints["charlm"], out, eval_data=checkpoints["corpus"], quantize=True)
    assert set(manifest["files"]) == {"model.onnx", "sample.onnx", "decode.onnx"}
    assert manifest["decoding"]["decode"]["weights"].startswith("per-row int8")
    graph = onnx.load(str(out / "decode.onnx")).graph
    (scan,) = [node for node in graph.node if node.op_type == "Scan"]
    body = {node.op_type for node in scan.attribute[0].g.node}
    assert {"MatMulInteger", "CumSum", "If"} <= body  # TopK is in the If
    step, sample, decode = runners(out)
    shape = ModelShape.from_manifest(manifest)
    assert len(verify_decoding(step, sample, decode, shape, seed=11)) == 5
    fp32 = model_from_checkpoint(load_checkpoint(checkpoints["charlm"]))
    fp32_decode = named_runner(session(build_decode_model(fp32)), DECODE_IN, DECODE_OUT)
    with pytest.raises(VerificationError, match=r"decode\.onnx vs model\.onnx \+ sample\.onnx, K 1, row \d of 7"):
        verify_decoding(step, sample, fp32_decode, shape)  # the fp32 decode graph is not the int8 step graph's


# -- what the graphs compute ---------------------------------------------------------------------------------------


def test_decode_rows_follow_their_steps_and_greedy_rows_follow_the_argmax(exported) -> None:
    step, _, decode = runners(exported / "charlm" / "1")
    rng = np.random.default_rng(5)
    vocab, batch, k = len(load_entry(exported / "charlm" / "1").vocab), 4, 6
    tokens = rng.integers(0, vocab, batch)
    h0, c0 = (rng.standard_normal((2, batch, 12)).astype(np.float32) for _ in range(2))
    temperature, top_k, top_p = np.array([0.0, 0.0, 0.8, 1.0]), np.array([0, 3, 0, 2]), np.array([1.0, 0.5, 0.9, 1])
    steps = np.array([k, 2, 0, k])
    sampled, logits, hn, cn = decode([tokens, h0, c0, rng.random((batch, k)), temperature, top_k, top_p, steps])
    for row in (0, 1):  # greedy (limits ignored): model.onnx's argmax, fed back, for its steps, then -1
        token, h, c = tokens[row : row + 1, None], h0[:, row : row + 1], c0[:, row : row + 1]
        for i in range(steps[row]):
            out, h, c = step([token, h, c])
            assert sampled[row, i] == int(np.argmax(out[0, -1]))
            token = sampled[row : row + 1, i : i + 1]
        assert (sampled[row, steps[row] :] == -1).all()
        assert np.array_equal(logits[row], out[0, -1]) and np.array_equal(hn[:, row], h[:, 0])
    assert (sampled[2] == -1).all() and not logits[2].any()  # no steps: the row comes back as it went in
    assert np.array_equal(hn[:, 2], h0[:, 2]) and np.array_equal(cn[:, 2], c0[:, 2])
    assert ((sampled[3] >= 0) & (sampled[3] < vocab)).all()


VOCAB = 40
DRAWS = 40_000


@pytest.fixture(scope="module")
def sampler():
    sess = session(build_sampler_model(VOCAB))

    def draw(logits: np.ndarray, draws: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0):
        n = draws.size
        inputs = [np.repeat(logits[None], n, 0), draws, np.full(n, temperature), np.full(n, top_k), np.full(n, top_p)]
        (tokens,) = sess.run(["token"], dict(zip(SAMPLER_IN, inputs, strict=True)))
        return tokens

    return draw


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def chi_square(tokens: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the tokens expected at least 5 times (the rest pooled), and its degrees of freedom."""
    counts = np.bincount(tokens, minlength=probs.size).astype(np.float64)
    expected = probs * tokens.size
    big = expected >= 5
    observed_cells = [*counts[big], counts[~big].sum()]
    expected_cells = [*expected[big], expected[~big].sum()]
    stat = sum((o - e) ** 2 / e for o, e in zip(observed_cells, expected_cells, strict=True) if e > 0)
    return stat, sum(e > 0 for e in expected_cells) - 1


def chi_square_limit(df: int, z: float = 4.75) -> float:
    """The chi-square quantile at p ~ 1e-6 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def kept_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The distribution that top_k and top_p leave, written from their definitions: the k most likely tokens, and
    the smallest set of most likely tokens whose probability reaches p."""
    probs = softmax(logits, temperature)
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros(probs.size, bool)
    keep[order[: top_k or probs.size]] = True
    reach = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1  # the first prefix whose total is >= p
    by_p = np.zeros(probs.size, bool)
    by_p[order[:reach]] = True
    kept = np.where(keep & by_p, probs, 0.0)
    return kept / kept.sum()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.7, 0, 1.0), (1.0, 5, 1.0), (0.8, 1, 1.0), (1.0, 0, 0.6), (1.2, 8, 0.8)],
)
def test_the_sampler_draws_from_the_documented_distribution(sampler, temperature, top_k, top_p) -> None:
    rng = np.random.default_rng(int(temperature * 10) + top_k + int(top_p * 100))
    logits = (rng.standard_normal(VOCAB) * 2).astype(np.float32)
    expected = kept_distribution(logits, temperature, top_k, top_p)
    tokens = sampler(logits, rng.random(DRAWS), temperature, top_k, top_p)
    drawn = set(np.unique(tokens).tolist())
    assert drawn <= set(np.flatnonzero(expected).tolist())  # nothing top_k or top_p cut off, ever
    stat, df = chi_square(tokens, expected)
    assert df == 0 if top_k == 1 else stat < chi_square_limit(df), (stat, df)  # top_k 1: one token, always
    # evenly spread draws land on each token as often as its probability says, to within one draw
    even = (np.arange(DRAWS) + 0.5) / DRAWS
    counts = np.bincount(sampler(logits, even, temperature, top_k, top_p), minlength=VOCAB)
    assert np.abs(counts - expected * DRAWS).max() <= 1.0 + 1e-6
    # and the test can tell: the same draws are far from the untruncated or the untempered distribution
    if top_k or top_p < 1:
        assert set(np.flatnonzero(expected).tolist()) == drawn != set(range(VOCAB))
    else:
        assert chi_square(tokens, softmax(logits, 1.0 if temperature != 1.0 else 0.5))[0] > chi_square_limit(df)


def test_top_p_keeps_the_smallest_prefix_that_reaches_p(sampler) -> None:
    logits = np.log(np.array([0.1, 0.4, 0.05, 0.3, 0.15] + [1e-9] * (VOCAB - 5))).astype(np.float32)
    even = (np.arange(DRAWS) + 0.5) / DRAWS
    for top_p, kept in [(0.35, {1}), (0.5, {1, 3}), (0.69, {1, 3}), (0.72, {1, 3, 4}), (0.9, {1, 3, 4, 0})]:
        assert set(np.unique(sampler(logits, even, 1.0, 0, top_p)).tolist()) == kept, top_p
    assert set(np.unique(sampler(logits, even, 1.0, 2, 0.9)).tolist()) == {1, 3}  # top_k and top_p: both apply


def test_temperature_zero_is_the_first_argmax_whatever_the_draw_and_limits(sampler) -> None:
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal(VOCAB) * 3).astype(np.float32)
    logits[[7, 19]] = logits.max() + 1.0  # a tie for the maximum: the first wins
    for top_k, top_p in [(0, 1.0), (3, 1.0), (0, 0.2), (1, 0.5)]:
        assert (sampler(logits, rng.random(500), 0.0, top_k, top_p) == 7).all()


def test_cdf_points_are_where_the_sampler_changes_its_token(sampler) -> None:
    """The checks place draws on ``cdf_points``; they must be the sampler's boundaries (within a few ulps)."""
    rng = np.random.default_rng(8)
    for temperature, top_k, top_p in [(0.9, 0, 1.0), (1.3, 6, 1.0), (0.7, 0, 0.8)]:
        logits = (rng.standard_normal(VOCAB) * 2).astype(np.float32)
        points = cdf_points(logits, temperature, top_k, top_p)
        below = sampler(logits, points * (1 - 1e-12), temperature, top_k, top_p)
        above = sampler(logits, points * (1 + 1e-12), temperature, top_k, top_p)
        assert (below != above).all()
        assert len(points) == np.count_nonzero(kept_distribution(logits, temperature, top_k, top_p)) - 1


# -- verification and batch invariance on the exported entry ---------------------------------------------------------


def test_the_exported_graphs_pass_the_checks_again_with_other_seeds(exported) -> None:
    step, sample, decode = runners(exported / "charlm" / "1")
    shape = ModelShape.from_manifest(load_entry(exported / "charlm" / "1").manifest)
    checks = verify_decoding(step, sample, decode, shape, seed=21)
    assert [c.split(":")[1].split(",")[0] for c in checks[:3]] == [" K 1", " K 3", " K 8"]
    assert checks[3].startswith("decode.onnx, K 8 in one call == 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1")
    assert checks[4].startswith("decode.onnx, K 8 in one call == 3 + 5")
    result = check_decoding_invariance(decode, sample, shape, seed=9)
    assert result.invariant, result.first_failure


def mixing(decode, amount: float = 1e-6):
    """A decode runner whose rows feel their batch: hn moves by ``amount`` times the batch size."""

    def mixed(inputs):
        sampled, logits, hn, cn = decode(inputs)
        return [sampled, logits, hn + np.float32(amount * inputs[0].shape[0]), cn]

    return mixed


def test_the_checks_catch_a_decode_graph_whose_rows_feel_their_batch(exported) -> None:
    step, sample, decode = runners(exported / "charlm" / "1")
    shape = ModelShape.from_manifest(load_entry(exported / "charlm" / "1").manifest)
    result = check_decoding_invariance(mixing(decode), sample, shape, batch_sizes=[1, 3])
    assert not result.invariant
    assert result.first_failure.startswith("decode.onnx: batch 3, the temperature row at position")
    assert "hn differs in" in result.first_failure and "sample.onnx" not in result.first_failure
    with pytest.raises(VerificationError, match=r"decode\.onnx vs model\.onnx \+ sample\.onnx, K 1, row 0 .*: hn"):
        verify_decoding(step, sample, mixing(decode), shape)


def test_the_k_check_catches_a_decode_graph_that_feels_its_k(exported) -> None:
    step, sample, decode = runners(exported / "charlm" / "1")
    shape = ModelShape.from_manifest(load_entry(exported / "charlm" / "1").manifest)

    def by_k(inputs):  # wrong only in a call of 5 steps, which the comparison with stepping never makes
        sampled, logits, hn, cn = decode(inputs)
        return [sampled, logits + np.float32(1e-6 * (inputs[3].shape[1] == 5)), hn, cn]

    with pytest.raises(VerificationError, match=r"decode\.onnx, K 8 in one call == 3 \+ 5: logits differs in"):
        verify_decoding(step, sample, by_k, shape)


def ranking_every_row(g, logits, draws, params):
    """``add_sampler`` with a bug: when any row of the batch is truncated, every row draws in rank order (a plain
    row's token then depends on its neighbours' top_k and top_p, though its distribution does not)."""
    column = g.ints([1])
    u = g.op("Unsqueeze", draws, column)
    weights, cumulative = decode_graph.sampling_weights(g, logits, params)
    plain = decode_graph._first_above(g, cumulative, u)
    ranked = g.child()
    total = ranked.op("Gather", cumulative, ranked.ints([-1]), axis=1)
    chosen = ranked.op("Identity", decode_graph._ranked_draw(ranked, weights, total, u, params))
    ranked_branch = ranked.graph("ranked", [], [helper.make_tensor_value_info(chosen, onnx.TensorProto.INT64, None)])
    unranked = g.child()
    kept = unranked.op("Identity", plain)
    plain_branch = unranked.graph("plain", [], [helper.make_tensor_value_info(kept, onnx.TensorProto.INT64, None)])
    drawn = g.op("If", params.any_truncated, then_branch=ranked_branch, else_branch=plain_branch)
    return g.op("Where", params.greedy, g.op("ArgMax", logits, axis=-1, keepdims=0), g.op("Squeeze", drawn, column))


def test_the_invariance_check_catches_a_sampler_whose_plain_rows_feel_truncating_neighbours(
    checkpoints, monkeypatch
) -> None:
    monkeypatch.setattr(decode_graph, "add_sampler", ranking_every_row)
    model = model_from_checkpoint(load_checkpoint(checkpoints["charlm"]))
    sample = named_runner(session(build_sampler_model(36)), SAMPLER_IN, ["token"])
    decode = named_runner(session(build_decode_model(model)), DECODE_IN, DECODE_OUT)
    shape = ModelShape("generation", 36, 2, 12)
    result = check_decoding_invariance(decode, sample, shape)
    assert not result.invariant
    failures = result.first_failure.split("; ")
    assert [f.split(":")[0] for f in failures] == ["decode.onnx", "sample.onnx"]
    for failure in failures:  # a row that does not truncate, beside rows that do
        assert re.search(r"(a|the) temperature (row|neighbour) at position .*beside [1-9]\d* of", failure), failure
    assert "sampled differs" in failures[0] and "token differs" in failures[1]


@pytest.mark.parametrize("vocab", [37, 65, 101])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_sampler_is_batch_invariant_whatever_the_vocabulary_size(vocab, threads) -> None:
    """Rows of an odd length start anywhere in memory and end inside a vectorized kernel's blocks: the sampler must
    not care (the suite's model has 36 characters, a multiple of every vector width)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(build_sampler_model(vocab).SerializeToString(), options, ["CPUExecutionProvider"])
    result = check_sampler_invariance(named_runner(sess, SAMPLER_IN, ["token"]), ModelShape("generation", vocab, 1, 1))
    assert result.invariant, result.first_failure


def test_the_sampler_check_sees_one_bit(exported) -> None:
    """A sampler whose batched rows are one bit off (here: their draw) is caught, because the check's draws sit
    exactly on the edges between tokens; uniform draws alone would almost never see it."""
    _, sample, _ = runners(exported / "charlm" / "1")

    def one_bit_off(inputs):
        logits, draws, *params = inputs
        if logits.shape[0] > 1:
            draws = np.nextafter(draws, 1.0)
        return sample([logits, draws, *params])

    shape = ModelShape("generation", 36, 2, 12)
    result = check_sampler_invariance(one_bit_off, shape, batch_sizes=[1, 2, 3, 4])
    assert not result.invariant and "with a draw on a boundary of its distribution" in result.first_failure
    assert check_sampler_invariance(sample, shape, batch_sizes=[1, 2, 3, 4]).invariant


def broken_hn(model: onnx.ModelProto) -> onnx.ModelProto:
    """The decode graph with ``hn`` nudged by the batch's mean state: each row depends on its neighbours."""
    graph = model.graph
    (node,) = [n for n in graph.node if list(n.output) == ["hn"]]
    node.output[0] = "hn_own"
    graph.node.extend(
        [
            helper.make_node("ReduceMean", ["hn_own"], ["hn_mean"], axes=[1], keepdims=1),
            helper.make_node("Mul", ["hn_mean", "tiny"], ["hn_nudge"]),
            helper.make_node("Add", ["hn_own", "hn_nudge"], ["hn"]),
        ]
    )
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(1e-3, np.float32), "tiny"))
    return model


def test_an_export_whose_decode_graph_mixes_rows_is_refused_and_writes_nothing(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "build_decode_model", lambda *args: broken_hn(build_decode_model(*args)))
    assert_refused(
        checkpoints,
        tmp_path,
        r"decode\.onnx does not draw what model\.onnx and sample\.onnx draw, with 1 "
        r"intra-op threads: .*K 1, row 0 of 7 .*: hn differs in",
    )
    # with the comparison against stepping skipped, the batch invariance check alone still refuses it
    monkeypatch.setattr(pipeline, "verify_decoding", lambda *args: [])
    assert_refused(
        checkpoints,
        tmp_path,
        r"the decode graph or the sampler is not batch invariant: with 1 intra-op "
        r"threads: decode\.onnx: batch 2, .*hn differs in",
    )


def test_an_export_whose_sampler_differs_from_the_decode_graphs_is_refused(checkpoints, tmp_path, monkeypatch):
    def hotter(vocab_size, opset):  # sample.onnx at twice the temperature the decode graph uses
        model = build_sampler_model(vocab_size, opset)
        for node in model.graph.node:
            node.input[:] = ["temperature_x2" if name == "temperature" else name for name in node.input]
        model.graph.node.insert(0, helper.make_node("Add", ["temperature", "temperature"], ["temperature_x2"]))
        return model

    monkeypatch.setattr(pipeline, "build_sampler_model", hotter)
    assert_refused(
        checkpoints,
        tmp_path,
        r"decode\.onnx does not draw what model\.onnx and sample\.onnx draw, .*: sampled differs",
    )


def test_an_export_whose_graph_signature_is_not_the_documented_one_is_refused(checkpoints, tmp_path, monkeypatch):
    def renamed(vocab_size, opset):
        model = build_sampler_model(vocab_size, opset)
        model.graph.output[0].name = "next_token"
        for node in model.graph.node:
            node.output[:] = ["next_token" if name == "token" else name for name in node.output]
        return model

    monkeypatch.setattr(pipeline, "build_sampler_model", renamed)
    assert_refused(checkpoints, tmp_path, r"sample\.onnx: its outputs \[\('next_token'.* are not the documented")


# -- the shipped entries ------------------------------------------------------------------------------------------


def shipped_language_models() -> list[str]:
    found = []
    for name, versions in list_entries(SHIPPED).items():
        for version in versions:
            manifest = json.loads((SHIPPED / name / str(version) / "manifest.json").read_text())
            if manifest["task"] == "generation":
                found.append(f"{name}/{version}")
    return found


@pytest.mark.parametrize("entry_name", shipped_language_models())
def test_every_shipped_language_model_decodes_as_its_manifest_says(entry_name) -> None:
    entry = load_entry(SHIPPED / entry_name)
    assert entry.has_decode_graph and entry.manifest["decoding"]["batch_invariance"]["onnxruntime"]["invariant"]
    step, sample, decode = runners(entry.path)
    shape = ModelShape.from_manifest(entry.manifest)
    assert len(verify_decoding(step, sample, decode, shape, seed=13)) == 5
    sizes = [1, 2, 3, 5, 8, 16, 64]
    result = check_decoding_invariance(decode, sample, shape, batch_sizes=sizes, seed=13)
    assert result.invariant, result.first_failure


def test_random_sampling_makes_every_kind() -> None:
    rng = np.random.default_rng(0)
    temperature, top_k, top_p = random_sampling(["greedy", "temperature", "top_k", "top_p", "top_k and top_p"], 30, rng)
    assert temperature[0] == 0 and (temperature[1:] > 0).all()
    assert top_k[1] == 0 and top_p[1] == 1 and top_k[2] > 0 and top_p[2] == 1 and top_k[3] == 0 and top_p[3] < 1
    assert top_k[4] > 0 and top_p[4] < 1
