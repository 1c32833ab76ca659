"""The server's loader: every damaged entry gives an error naming the file and the problem."""

from __future__ import annotations

import json
import shutil

import onnxruntime as ort
import pytest

from lstm_server.runtime.model_repository import (
    ModelRepositoryError,
    batch_invariant,
    check_onnx_session,
    list_entries,
    load_entry,
    load_latest,
    sha256_file,
)


def edit_manifest(entry_dir, change) -> None:
    path = entry_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_lists_and_loads_the_latest_version(repository) -> None:
    shutil.copytree(repository / "charlm" / "1", repository / "charlm" / "3")
    edit_manifest(repository / "charlm" / "3", lambda m: m.update(version=3))
    (repository / "notes").mkdir()
    assert list_entries(repository) == {"charlm": [1, 3], "sentiment": [1]}
    assert load_latest(repository, "charlm").version == 3
    with pytest.raises(ModelRepositoryError, match="no versions of model 'nope'"):
        load_latest(repository, "nope")


def test_a_corrupted_file_is_named(repository) -> None:
    onnx_file = repository / "charlm" / "1" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ModelRepositoryError, match=r"charlm/1/model\.onnx: corrupted, sha256 .* does not match"):
        load_entry(repository / "charlm" / "1")


def test_a_truncated_file_is_named(repository) -> None:
    model = repository / "sentiment" / "1" / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(ModelRepositoryError, match=r"sentiment/1/model\.pt: corrupted"):
        load_entry(repository / "sentiment" / "1")


def test_a_missing_file_is_named(repository) -> None:
    (repository / "sentiment" / "1" / "tokenizer.json").unlink()
    with pytest.raises(ModelRepositoryError, match=r"tokenizer\.json: missing"):
        load_entry(repository / "sentiment" / "1")


def test_a_manifest_checksum_that_does_not_match(repository) -> None:
    edit_manifest(repository / "charlm" / "1", lambda m: m["files"].update({"model.pt": "0" * 64}))
    with pytest.raises(ModelRepositoryError, match=r"model\.pt: corrupted, sha256 .* manifest's 0000"):
        load_entry(repository / "charlm" / "1")


def test_a_missing_or_broken_manifest(repository) -> None:
    (repository / "charlm" / "1" / "manifest.json").write_text("{not json")
    with pytest.raises(ModelRepositoryError, match=r"manifest\.json: corrupted, not valid JSON"):
        load_entry(repository / "charlm" / "1")
    (repository / "charlm" / "1" / "manifest.json").unlink()
    with pytest.raises(ModelRepositoryError, match=r"manifest\.json: missing"):
        load_entry(repository / "charlm" / "1")


def test_a_version_mismatch(repository) -> None:
    shutil.move(repository / "charlm" / "1", repository / "charlm" / "2")
    with pytest.raises(
        ModelRepositoryError, match="version mismatch, the manifest says charlm/1 but the directory is charlm/2"
    ):
        load_entry(repository / "charlm" / "2")
    edit_manifest(repository / "charlm" / "2", lambda m: m.update(version=2, format="lstm-model-repository/9"))
    with pytest.raises(ModelRepositoryError, match="version mismatch, format 'lstm-model-repository/9'"):
        load_entry(repository / "charlm" / "2")


def test_a_wrong_shape_in_the_signature(repository) -> None:
    edit_manifest(repository / "charlm" / "1", lambda m: m["signature"]["inputs"][1].update(shape=[2, "batch", 99]))
    with pytest.raises(ModelRepositoryError, match=r"wrong shape, signature .*h0:float32\[2, 'batch', 99\]"):
        load_entry(repository / "charlm" / "1")


def test_an_onnx_model_that_does_not_fit_its_manifest(repository) -> None:
    charlm = repository / "charlm" / "1"
    shutil.copy(repository / "sentiment" / "1" / "model.onnx", charlm / "model.onnx")
    edit_manifest(charlm, lambda m: m["files"].update({"model.onnx": sha256_file(charlm / "model.onnx")}))
    entry = load_entry(charlm)
    session = ort.InferenceSession(str(entry.file("model.onnx")), providers=["CPUExecutionProvider"])
    with pytest.raises(ModelRepositoryError, match=r"model\.onnx: wrong shape, the model's inputs"):
        check_onnx_session(entry, session)


def test_batch_invariance_is_read_and_a_damaged_record_is_named(repository) -> None:
    charlm = repository / "charlm" / "1"
    assert batch_invariant(load_entry(charlm), "onnxruntime")
    edit_manifest(charlm, lambda m: m["batch_invariance"].pop("torchscript"))
    assert not batch_invariant(load_entry(charlm), "torchscript")
    edit_manifest(charlm, lambda m: m.pop("batch_invariance"))
    assert not batch_invariant(load_entry(charlm), "onnxruntime")  # an entry exported before the check
    edit_manifest(charlm, lambda m: m.update(batch_invariance={"onnxruntime": {"invariant": "yes"}}))
    with pytest.raises(ModelRepositoryError, match=r"manifest\.json: corrupted batch_invariance"):
        load_entry(charlm)


def test_a_language_model_needs_its_sampler_and_may_lack_its_decode_graph(repository) -> None:
    charlm = repository / "charlm" / "1"
    assert load_entry(charlm).has_decode_graph
    (charlm / "decode.onnx").unlink()
    edit_manifest(charlm, lambda m: m["files"].pop("decode.onnx"))
    assert not load_entry(charlm).has_decode_graph  # a runtime then samples with sample.onnx after each step
    (charlm / "sample.onnx").unlink()
    with pytest.raises(ModelRepositoryError, match=r"sample\.onnx: missing"):
        load_entry(charlm)
    edit_manifest(charlm, lambda m: m["files"].pop("sample.onnx"))
    with pytest.raises(ModelRepositoryError, match=r"charlm/1 has no sample\.onnx"):
        load_entry(charlm)
