"""Export: files, contracts and the equivalences of eager PyTorch, TorchScript and onnxruntime."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lstm_export.cli import main as export_main
from lstm_export.pipeline import ExportError, export_checkpoint
from lstm_export.verify import VerificationError, random_inputs
from lstm_server.runtime.model_repository import ModelRepositoryError, check_onnx_session, load_entry
from lstm_training.checkpoint import load_checkpoint, model_from_checkpoint

CASES = [("charlm", "generation"), ("sentiment", "classification")]
OUTPUTS = ["logits", "hn", "cn"]


def backends(repo, name: str):
    entry = load_entry(repo / name / "1")
    session = ort.InferenceSession(str(entry.file("model.onnx")), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(entry.file("model.pt")))
    return entry, session, scripted


def run_onnx(session, entry, inputs):
    return session.run(OUTPUTS, dict(zip([t.name for t in entry.inputs], inputs, strict=True)))


def run_torch(module, inputs):
    with torch.no_grad():
        return [t.numpy() for t in module(*(torch.from_numpy(a) for a in inputs))]


def assert_close(actual, expected):
    for name, a, e in zip(OUTPUTS, actual, expected, strict=True):
        np.testing.assert_allclose(a, e, atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize(("name", "task"), CASES)
def test_entry_files_manifest_and_onnx_contract(exported, checkpoints, name, task) -> None:
    entry = load_entry(exported / name / "1")
    assert entry.task == task and entry.version == 1 and entry.name == name
    assert set(entry.manifest["files"]) == {"model.onnx", "model.pt"} | (
        {"tokenizer.json"} if name == "sentiment" else {"sample.onnx", "decode.onnx"}
    )
    payload = load_checkpoint(checkpoints[name])
    assert entry.manifest["training"]["data_sha256"] == payload["data_sha256"]
    assert entry.manifest["training"]["command"].startswith(f"lstm-train {name}")
    assert entry.manifest["quality"]["backend"] == "onnxruntime"
    if name == "charlm":
        assert entry.vocab == payload["vocab"]
        assert entry.manifest["quality"]["value"] == pytest.approx(payload["best"]["val_loss"], abs=1e-4)
    else:
        assert entry.manifest["quality"]["value"] == pytest.approx(payload["best"]["val_accuracy"], abs=1e-5)
        assert entry.tokenizer_json() == payload["tokenizer"]
    model = onnx.load(str(entry.file("model.onnx")))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    onnx.checker.check_model(model, full_check=True)
    tokens = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in tokens] == ["batch", "time"]
    session = ort.InferenceSession(str(entry.file("model.onnx")), providers=["CPUExecutionProvider"])
    check_onnx_session(entry, session)
    assert len(entry.manifest["export"]["verified"]) == 10


@pytest.mark.parametrize(("name", "task"), CASES)
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("time", [1, 37])
def test_eager_torchscript_and_onnxruntime_agree(exported, checkpoints, name, task, batch, time) -> None:
    entry, session, scripted = backends(exported, name)
    model = model_from_checkpoint(load_checkpoint(checkpoints[name]))
    inputs = random_inputs(model, task, batch, time, np.random.default_rng(batch * 100 + time))
    expected = run_torch(model, inputs)
    assert_close(run_onnx(session, entry, inputs), expected)
    assert_close(run_torch(scripted, inputs), expected)


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_language_model_token_by_token_equals_whole_sequence(exported, backend) -> None:
    entry, session, scripted = backends(exported, "charlm")

    def run(inputs):
        return run_onnx(session, entry, inputs) if backend == "onnxruntime" else run_torch(scripted, inputs)

    rng = np.random.default_rng(3)
    tokens = rng.integers(0, len(entry.vocab), (2, 30))
    h = rng.standard_normal((2, 2, 12)).astype(np.float32)
    c = rng.standard_normal((2, 2, 12)).astype(np.float32)
    whole = run([tokens, h, c])
    pieces = []
    for t in range(30):
        logits, h, c = run([tokens[:, t : t + 1], h, c])
        pieces.append(logits)
    assert_close([np.concatenate(pieces, axis=1), h, c], whole)


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_classifier_padded_batch_equals_each_text_alone(exported, backend) -> None:
    entry, session, scripted = backends(exported, "sentiment")

    def run(inputs):
        return run_onnx(session, entry, inputs) if backend == "onnxruntime" else run_torch(scripted, inputs)

    rng = np.random.default_rng(4)
    lengths = np.array([9, 1, 4, 17, 2])
    tokens = np.zeros((5, 20), np.int64)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(1, 50, n)
    h0, c0 = np.zeros((4, 5, 12), np.float32), np.zeros((4, 5, 12), np.float32)
    logits, hn, cn = run([tokens, lengths, h0, c0])
    for row, n in enumerate(lengths):
        alone = run([tokens[row : row + 1, :n], lengths[row : row + 1], h0[:, :1], c0[:, :1]])
        assert_close(alone, [logits[row : row + 1], hn[:, row : row + 1], cn[:, row : row + 1]])


def test_a_backend_mismatch_fails_the_export_and_writes_nothing(checkpoints, tmp_path, monkeypatch) -> None:
    import lstm_export.pipeline as pipeline

    real = pipeline.export_torchscript

    def perturbed(model, path):
        scripted = real(model, path)
        with torch.no_grad():
            scripted.head.bias.add_(1e-2)
        return scripted

    monkeypatch.setattr(pipeline, "export_torchscript", perturbed)
    with pytest.raises(VerificationError, match=r"TorchScript vs eager PyTorch, batch 1, time 1: logits differs by"):
        export_checkpoint(checkpoints["charlm"], tmp_path / "charlm" / "1")
    assert not (tmp_path / "charlm").exists()  # not even the folder this export created


def test_quantized_version_records_quality_and_speed(checkpoints, exported, tmp_path) -> None:
    out = tmp_path / "charlm" / "2"
    manifest = export_checkpoint(checkpoints["charlm"], out, eval_data=checkpoints["corpus"], quantize=True)
    entry = load_entry(out)
    assert set(entry.manifest["files"]) == {"model.onnx", "sample.onnx", "decode.onnx"}
    assert entry.manifest["backends"] == ["onnxruntime"]
    block = manifest["quantization"]
    fp32 = load_entry(exported / "charlm" / "1").manifest["quality"]["value"]
    assert block["quality"]["fp32"]["value"] == pytest.approx(fp32)
    assert abs(block["quality"]["int8"]["value"] - fp32) < 0.05
    assert manifest["quality"] == block["quality"]["int8"]
    assert set(block["step_ms"]) == {"batch_1", "batch_64"} and block["step_ms"]["batch_1"]["int8"] > 0
    assert block["size_bytes"]["int8"] < block["size_bytes"]["fp32"]


def test_export_refuses_a_checkpoint_of_another_kind_under_a_name(exported, checkpoints, tmp_path) -> None:
    repo = tmp_path / "models"
    export_checkpoint(checkpoints["charlm"], repo / "charlm" / "1")
    with pytest.raises(ExportError, match=r"holds generation models .* this checkpoint is a classification model"):
        export_checkpoint(checkpoints["sentiment"], repo / "charlm" / "2")
    with pytest.raises(ExportError, match="exists; pass --force"):
        export_checkpoint(checkpoints["charlm"], repo / "charlm" / "1")


def test_export_refuses_an_unknown_kind_and_a_non_checkpoint(checkpoints, tmp_path, capsys) -> None:
    payload = load_checkpoint(checkpoints["charlm"])
    payload["kind"] = "translation"
    torch.save(payload, tmp_path / "odd.pt")
    assert export_main([str(tmp_path / "odd.pt"), "--out", str(tmp_path / "m" / "odd" / "1")]) == 2
    assert "unknown model kind 'translation'" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert export_main([str(tmp_path / "junk.pt"), "--out", str(tmp_path / "m" / "x" / "1")]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert export_main([str(checkpoints["charlm"]), "--out", str(tmp_path / "m" / "x" / "latest")]) == 2
    assert "must be the version number" in capsys.readouterr().err


def test_quantize_needs_evaluation_data(checkpoints, tmp_path) -> None:
    with pytest.raises(ExportError, match="--quantize needs --eval-data"):
        export_checkpoint(checkpoints["charlm"], tmp_path / "charlm" / "2", quantize=True)


def test_manifest_is_valid_json_with_the_design_fields(exported) -> None:
    manifest = json.loads((exported / "charlm" / "1" / "manifest.json").read_text())
    for key in (
        "name",
        "version",
        "task",
        "vocab",
        "labels",
        "num_layers",
        "hidden_size",
        "num_directions",
        "signature",
        "files",
        "training",
        "quality",
    ):
        assert key in manifest, key
    assert manifest["training"]["command"] and manifest["training"]["data_sha256"]


def test_export_refuses_what_it_cannot_describe_honestly(checkpoints, tmp_path, capsys) -> None:
    last = checkpoints["charlm"].with_name("last.pt")
    assert export_main([str(last), "--out", str(tmp_path / "m" / "charlm" / "1")]) == 2
    assert "resumable last.pt; export the best.pt" in capsys.readouterr().err
    assert export_main([str(checkpoints["charlm"]), "--out", str(tmp_path / "m" / "charlm" / "01")]) == 2
    assert "must be the version number" in capsys.readouterr().err
    missing = tmp_path / "missing.txt"
    assert (
        export_main(
            [str(checkpoints["charlm"]), "--out", str(tmp_path / "m" / "charlm" / "1"), "--eval-data", str(missing)]
        )
        == 2
    )
    assert f"--eval-data {missing} is not a file" in capsys.readouterr().err
    from lstm_training.checkpoint import compact_checkpoint

    compact_checkpoint(checkpoints["charlm"], tmp_path / "small.pt")
    assert export_main([str(tmp_path / "small.pt"), "--out", str(tmp_path / "m" / "charlm" / "1")]) == 2
    assert "stores its weights as float16: give --eval-data" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_version_under_an_older_contract_does_not_block_re_exporting_its_sibling(exported, checkpoints, tmp_path):
    """Only the other versions' task is read: a language model exported before sample.onnx existed (which the
    loader now refuses) is no reason to refuse re-exporting the version beside it; a manifest without a task is."""
    repo = tmp_path / "models"
    shutil.copytree(exported / "charlm" / "1", repo / "charlm" / "1")
    manifest = json.loads((repo / "charlm" / "1" / "manifest.json").read_text())
    for name in ("sample.onnx", "decode.onnx"):
        manifest["files"].pop(name)
        (repo / "charlm" / "1" / name).unlink()
    (repo / "charlm" / "1" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelRepositoryError, match=r"has no sample\.onnx"):
        load_entry(repo / "charlm" / "1")
    export_checkpoint(checkpoints["charlm"], repo / "charlm" / "2")
    assert load_entry(repo / "charlm" / "2").has_decode_graph
    with pytest.raises(ExportError, match=r"holds generation models \(version 1\)"):
        export_checkpoint(checkpoints["sentiment"], repo / "charlm" / "3")
    (repo / "charlm" / "1" / "manifest.json").write_text("{}")
    with pytest.raises(ExportError, match=r"cannot check the existing versions: .*charlm/1/manifest\.json does not"):
        export_checkpoint(checkpoints["charlm"], repo / "charlm" / "2", force=True)
    assert load_entry(repo / "charlm" / "2").has_decode_graph  # the refused export left version 2 as it was
