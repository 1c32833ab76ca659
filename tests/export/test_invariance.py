"""Batch invariance: the checker, the export's use of it, and the claim of every shipped entry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

import lstm_export.pipeline as pipeline
from lstm_export.exporter import export_onnx
from lstm_export.invariance import DEFAULT_BATCH_SIZES, ModelShape, check_batch_invariance
from lstm_export.pipeline import ExportError, export_checkpoint
from lstm_export.verify import onnx_runner, torch_runner
from lstm_server.runtime.model_repository import ModelEntry, batch_invariant, list_entries, load_entry
from lstm_training.checkpoint import load_checkpoint, model_from_checkpoint

SHIPPED = Path(__file__).resolve().parents[2] / "models"
KINDS = {"charlm": "generation", "sentiment": "classification"}


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def runner(entry: ModelEntry, backend: str):
    if backend == "onnxruntime":
        return onnx_runner(session(entry.file("model.onnx")), entry.task)
    return torch_runner(torch.jit.load(str(entry.file("model.pt"))).eval())


def shipped_backends() -> list[tuple[str, str]]:
    found = []
    for name, versions in list_entries(SHIPPED).items():
        for version in versions:
            manifest = json.loads((SHIPPED / name / str(version) / "manifest.json").read_text())
            found += [(f"{name}/{version}", backend) for backend in manifest["backends"]]
    return found


@pytest.mark.parametrize(("entry_name", "backend"), shipped_backends())
def test_every_shipped_entry_is_as_invariant_as_its_manifest_says(entry_name, backend) -> None:
    entry = load_entry(SHIPPED / entry_name)
    claim = entry.manifest["batch_invariance"][backend]
    assert set(claim) == {"invariant", "checked", "first_failure"}
    if backend == "onnxruntime":
        assert claim["invariant"] is True and claim["first_failure"] is None
    result = check_batch_invariance(runner(entry, backend), ModelShape.from_manifest(entry.manifest), seed=7)
    assert result.invariant == claim["invariant"], result.first_failure
    assert batch_invariant(entry, backend) is claim["invariant"]


def test_every_shipped_entry_records_every_backend_it_ships() -> None:
    listed = list_entries(SHIPPED)
    entries = [load_entry(SHIPPED / name / str(version)) for name, versions in listed.items() for version in versions]
    assert {f"{e.name}/{e.version}" for e in entries} >= {"charlm/1", "charlm/2", "sentiment/1", "sentiment/2"}
    for entry in entries:
        assert set(entry.manifest["batch_invariance"]) == set(entry.manifest["backends"])


# -- the tiny models the suite trains -------------------------------------------------------------------------------


def shape_of(model, task: str) -> ModelShape:
    state = model.initial_state(1)[0].shape[0]
    pad_id = getattr(model.config, "pad_id", 0)
    return ModelShape(task, model.config.vocab_size, state, model.config.hidden_size, pad_id)


@pytest.mark.parametrize("name", list(KINDS))
def test_fp32_export_is_invariant_and_the_manifest_says_so(exported, name) -> None:
    entry = load_entry(exported / name / "1")
    record = entry.manifest["batch_invariance"]
    assert set(record) == {"onnxruntime", "torchscript"}
    assert set(record["onnxruntime"]) == {"invariant", "checked", "first_failure"}
    assert record["onnxruntime"]["invariant"] is True and record["onnxruntime"]["first_failure"] is None
    assert "batch sizes 1, 2, 3, 4, 5, 6, 7, 8" in record["onnxruntime"]["checked"]
    assert "intra-op threads" in record["onnxruntime"]["checked"]
    assert batch_invariant(entry, "onnxruntime")
    result = check_batch_invariance(runner(entry, "onnxruntime"), ModelShape.from_manifest(entry.manifest), seed=3)
    assert result.invariant, result.first_failure
    torchscript = record["torchscript"]  # measured, whatever it is
    assert isinstance(torchscript["invariant"], bool) and torchscript["checked"].startswith("batch sizes")
    assert (torchscript["first_failure"] is None) == torchscript["invariant"]
    assert batch_invariant(entry, "torchscript") is torchscript["invariant"]


@pytest.mark.parametrize("name", list(KINDS))
def test_quantized_export_is_invariant_and_records_quality_and_speed(checkpoints, tmp_path, name) -> None:
    data = checkpoints["corpus" if name == "charlm" else "dev"]
    manifest = export_checkpoint(checkpoints[name], tmp_path / name / "2", eval_data=data, quantize=True)
    entry = load_entry(tmp_path / name / "2")
    assert manifest["backends"] == ["onnxruntime"] and set(manifest["batch_invariance"]) == {"onnxruntime"}
    assert manifest["batch_invariance"]["onnxruntime"]["invariant"] is True
    assert not batch_invariant(entry, "torchscript")
    block = manifest["quantization"]
    assert block["method"].startswith("per-row int8")
    assert set(block["quality"]) == {"fp32", "int8"} and set(block["step_ms"]) == {"batch_1", "batch_64"}
    assert any("onnxruntime int8" in check for check in manifest["export"]["verified"])
    result = check_batch_invariance(runner(entry, "onnxruntime"), ModelShape.from_manifest(manifest), seed=5)
    assert result.invariant, result.first_failure


@pytest.mark.parametrize("name", list(KINDS))
def test_the_checker_catches_dynamic_quantization(checkpoints, tmp_path, name) -> None:
    task = KINDS[name]
    model = model_from_checkpoint(load_checkpoint(checkpoints[name]))
    export_onnx(model, task, tmp_path / "fused.onnx")
    quantize_dynamic(str(tmp_path / "fused.onnx"), str(tmp_path / "dynamic.onnx"), weight_type=QuantType.QInt8)
    result = check_batch_invariance(onnx_runner(session(tmp_path / "dynamic.onnx"), task), shape_of(model, task))
    assert not result.invariant
    assert result.first_failure.startswith("batch ") and "differs in" in result.first_failure


def mixing(run, amount: float = 1e-6):
    """A runner whose rows feel their batch: every output moves by ``amount`` times the batch size."""

    def mixed(inputs):
        logits, hn, cn = run(inputs)
        batch = inputs[0].shape[0]
        return [logits + np.float32(amount * batch), hn, cn]

    return mixed


def padding_sensitive(run):
    """A runner whose rows feel the padded width of the batch (in cn only)."""

    def sensitive(inputs):
        logits, hn, cn = run(inputs)
        return [logits, hn, cn + np.float32(1e-6 * inputs[0].shape[1])]

    return sensitive


@pytest.mark.parametrize("name", list(KINDS))
def test_the_checker_catches_rows_that_feel_their_batch(exported, name) -> None:
    entry = load_entry(exported / name / "1")
    run, shape = runner(entry, "onnxruntime"), ModelShape.from_manifest(entry.manifest)
    result = check_batch_invariance(mixing(run), shape, batch_sizes=[1, 3])
    assert not result.invariant
    assert result.first_failure.startswith("batch 3, ") and "logits differs in" in result.first_failure
    if name == "sentiment":
        result = check_batch_invariance(padding_sensitive(run), shape, batch_sizes=[2, 5, 9])
        assert not result.invariant and "cn differs" in result.first_failure and "padded to" in result.first_failure


def test_the_checker_catches_a_prompt_read_differently_from_its_steps(exported) -> None:
    entry = load_entry(exported / "charlm" / "1")
    run = runner(entry, "onnxruntime")

    def by_length(inputs):  # same for every batch, but depends on the call's length
        logits, hn, cn = run(inputs)
        return [logits, hn + np.float32(1e-6 * inputs[0].shape[1]), cn]

    result = check_batch_invariance(by_length, ModelShape.from_manifest(entry.manifest), batch_sizes=[1, 2])
    assert not result.invariant and result.first_failure.startswith("alone, a 24-token prompt one token at a time")


def test_an_export_whose_onnx_graph_is_not_invariant_is_refused(checkpoints, tmp_path, monkeypatch) -> None:
    real = pipeline.onnx_runner
    monkeypatch.setattr(pipeline, "onnx_runner", lambda s, task: mixing(real(s, task)))  # within verify's tolerance
    with pytest.raises(ExportError, match=r"onnxruntime graph is not batch invariant: with 1 intra-op threads: batch"):
        export_checkpoint(checkpoints["sentiment"], tmp_path / "sentiment" / "1")
    assert not (tmp_path / "sentiment").exists()


def test_batch_invariant_reads_the_manifest(exported) -> None:
    entry = load_entry(exported / "charlm" / "1")
    assert batch_invariant(entry, "onnxruntime")
    assert not batch_invariant(entry, "tensorrt")
    old = ModelEntry(entry.path, {k: v for k, v in entry.manifest.items() if k != "batch_invariance"})
    assert not batch_invariant(old, "onnxruntime")


def test_the_default_batch_sizes_cover_one_to_eight_and_up_to_64() -> None:
    assert list(DEFAULT_BATCH_SIZES[:8]) == list(range(1, 9)) and max(DEFAULT_BATCH_SIZES) == 64
