"""Checkpoint in, verified model repository entry out: ``<root>/<name>/<version>/``.

Everything is written into a temporary directory beside the target, verified
against eager PyTorch, checked for batch invariance (``invariance.py``: the
onnxruntime graph must be invariant or nothing is written; TorchScript is
measured and recorded as it is), and only then moved into place: a failed
export leaves nothing behind. A language model also gets its sampler
(``sample.onnx``) and decode graph (``decode.onnx``, ``decode_graph.py``),
held bitwise to ``model.onnx`` and the sampler (``verify.verify_decoding``)
and checked for batch invariance, described by the manifest's ``decoding``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

from lstm_server.runtime.model_repository import (
    DECODE_FILE,
    FORMAT,
    MANIFEST,
    ONNX_FILE,
    SAMPLE_FILE,
    TOKENIZER_FILE,
    TORCHSCRIPT_FILE,
    TensorSpec,
    expected_signature,
    list_entries,
    load_entry,
    sha256_file,
)
from lstm_training.checkpoint import git_commit, load_checkpoint, model_from_checkpoint

from .decode_graph import (
    DECODE_FILE_DESCRIPTION,
    SAMPLE_FILE_DESCRIPTION,
    SAMPLING_RULE,
    build_decode_model,
    build_sampler_model,
    decode_signature,
    sampler_signature,
)
from .evaluate import measure_quality, step_seconds
from .exporter import DEFAULT_OPSET, check_onnx, export_torchscript
from .invariance import InvarianceResult, ModelShape, check_batch_invariance, check_decoding_invariance
from .step_graph import GRAPH_DESCRIPTION, QUANTIZATION_METHOD, export_step_onnx
from .verify import (
    VerificationError,
    named_runner,
    onnx_runner,
    torch_runner,
    verify_decoding,
    verify_export,
    verify_quantized,
)

TASK_OF_KIND = {"charlm": "generation", "sentiment": "classification"}


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked; the message says why."""


def _task_of(payload: dict[str, Any], checkpoint: Path) -> str:
    if payload["kind"] not in TASK_OF_KIND:
        raise ExportError(f"{checkpoint}: unknown model kind {payload['kind']!r}; expected one of {list(TASK_OF_KIND)}")
    return TASK_OF_KIND[payload["kind"]]


def _task_of_entry(path: Path) -> str:
    """The task another version of the name declares. Only its manifest is read: a version written under an
    older contract (one the loader now refuses, such as a language model without ``sample.onnx``) must not stop
    its siblings from being re-exported in place."""
    try:
        task = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["task"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ExportError(
            f"cannot check the existing versions: {path / MANIFEST} does not say its task ({error!r})"
        ) from error
    if not isinstance(task, str):
        raise ExportError(f"cannot check the existing versions: {path / MANIFEST} does not say its task")
    return task


def _check_target(out: Path, name: str, task: str, force: bool) -> int:
    if not out.name.isdigit() or str(int(out.name)) != out.name:
        raise ExportError(f"--out {out}: the last directory must be the version number, as in models/{name}/1")
    root = out.parent.parent
    for version in list_entries(root).get(name, []):
        if version == int(out.name):
            continue
        other = _task_of_entry(root / name / str(version))
        if other != task:
            raise ExportError(
                f"{root / name} holds {other} models (version {version}); this checkpoint is a {task} "
                "model: export it under another name"
            )
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    return int(out.name)


def _base_manifest(payload: dict[str, Any], task: str, name: str, version: int, opset: int) -> dict[str, Any]:
    config = payload["config"]
    directions = 2 if config.get("bidirectional") else 1
    labels = payload.get("labels", [])
    vocab = payload.get("vocab")
    inputs, outputs = expected_signature(
        task, config["num_layers"], directions, config["hidden_size"], len(vocab or []), len(labels)
    )
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "task": task,
        "labels": labels,
        "num_layers": config["num_layers"],
        "hidden_size": config["hidden_size"],
        "num_directions": directions,
        "vocab_size": config["vocab_size"],
        "signature": {"inputs": [t.to_json() for t in inputs], "outputs": [t.to_json() for t in outputs]},
    }
    if task == "generation":
        manifest["vocab"] = vocab
    else:
        manifest["tokenizer"] = TOKENIZER_FILE
        manifest["pad_id"] = config["pad_id"]
    manifest["model_config"] = config
    manifest["training"] = {
        "data_sha256": payload["data_sha256"],
        "command": payload["command"],
        "git_commit": payload["git_commit"],
        "best_epoch": payload["best"],
    }
    manifest["export"] = {
        "opset": opset,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "git_commit": git_commit(),
        "machine": platform.machine(),
    }
    return manifest


def _training_quality(payload: dict[str, Any], task: str) -> dict[str, Any]:
    best = payload["best"]
    if task == "generation":
        return {
            "metric": "val_loss",
            "value": round(best["val_loss"], 5),
            "unit": "nats per character",
            "data": "last 10% of the corpus",
            "data_sha256": payload["data_sha256"],
            "backend": "eager PyTorch",
        }
    return {"metric": "dev_accuracy", "value": round(best["val_accuracy"], 5), "backend": "eager PyTorch"}


def _quantize(
    work: Path, model: torch.nn.Module, manifest: dict[str, Any], eval_data: Path, tokenizer_json: str | None
) -> None:
    """Replace the fp32 ONNX model in ``work`` by the per-row int8 graph; verify it, record quality and speed."""
    task, opset = manifest["task"], manifest["export"]["opset"]
    fp32, int8 = work / "fp32.onnx", work / ONNX_FILE
    int8.rename(fp32)
    export_step_onnx(model, task, int8, quantize=True, opset=opset)
    check_onnx(int8)
    (work / TORCHSCRIPT_FILE).unlink()
    sessions = {"fp32": _session(fp32), "int8": _session(int8)}
    int8_runner = onnx_runner(sessions["int8"], task)
    manifest["export"]["verified"] += verify_quantized(model, task, "onnxruntime int8", int8_runner)
    block: dict[str, Any] = {"method": QUANTIZATION_METHOD, "backends": ["onnxruntime"]}
    block["quality"] = {k: measure_quality(s, manifest, eval_data, tokenizer_json) for k, s in sessions.items()}
    manifest["quality"] = block["quality"]["int8"]
    block["step_ms"] = {
        f"batch_{batch}": {k: round(v * 1e3, 4) for k, v in step_seconds(sessions, manifest, batch).items()}
        for batch in (1, 64)
    }
    block["size_bytes"] = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}
    manifest["quantization"] = block
    fp32.unlink()


def _session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session set up as the server sets up its own (``threads`` intra-op threads, one inter-op thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _batch_invariance(work: Path, manifest: dict[str, Any], scripted: Any) -> dict[str, dict[str, Any]]:
    """Check every backend the entry ships; ExportError if the onnxruntime graph is not invariant."""
    task, shape = manifest["task"], ModelShape.from_manifest(manifest)
    results: list[tuple[int, InvarianceResult]] = []
    for threads in sorted({1, os.cpu_count() or 1}):
        session = _session(work / ONNX_FILE, threads)
        results.append((threads, check_batch_invariance(onnx_runner(session, task), shape)))
    onnx_result = _threads_record(results)
    if not onnx_result.invariant:
        raise ExportError(f"the onnxruntime graph is not batch invariant: {onnx_result.first_failure}")
    record = {"onnxruntime": onnx_result.to_json()}
    if scripted is not None:
        result = check_batch_invariance(torch_runner(scripted), shape)
        checked = f"{result.checked}; torch {torch.__version__}, CPU, {torch.get_num_threads()} threads"
        record["torchscript"] = InvarianceResult(result.invariant, checked, result.first_failure).to_json()
    return record


Signature = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]
ONNX_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64"}


def _signature_runner(session: ort.InferenceSession, file: str, signature: Signature) -> Any:
    """A runner for ``session`` in ``signature``'s order; ExportError if the graph's inputs or outputs are not it."""
    for declared, actual, side in (
        (signature[0], session.get_inputs(), "inputs"),
        (signature[1], session.get_outputs(), "outputs"),
    ):
        got = [(a.name, ONNX_TYPES.get(a.type, a.type), tuple(a.shape)) for a in actual]
        want = [(t.name, t.dtype, t.shape) for t in declared]
        if got != want:
            raise ExportError(f"{file}: its {side} {got} are not the documented {want}")
    return named_runner(session, [t.name for t in signature[0]], [t.name for t in signature[1]])


def _threads_record(results: list[tuple[int, InvarianceResult]]) -> InvarianceResult:
    """One record for checks run with several intra-op thread counts."""
    failures = [f"with {threads} intra-op threads: {r.first_failure}" for threads, r in results if not r.invariant]
    counts = " and ".join(str(threads) for threads, _ in results)
    return InvarianceResult(
        not failures,
        f"{results[0][1].checked}; onnxruntime {ort.__version__}, CPU, {counts} intra-op threads",
        "; ".join(failures) or None,
    )


def _decoding(work: Path, model: torch.nn.Module, manifest: dict[str, Any], quantize: bool) -> dict[str, Any]:
    """Write a language model's ``sample.onnx`` and ``decode.onnx`` beside its (final) ``model.onnx``, verify them
    against it bitwise and check them for batch invariance, with 1 and all intra-op threads; their manifest block.
    ExportError on any failure."""
    opset, shape = manifest["export"]["opset"], ModelShape.from_manifest(manifest)
    signatures = {
        SAMPLE_FILE: sampler_signature(shape.vocab_size),
        DECODE_FILE: decode_signature(shape.state_rows, shape.hidden_size, shape.vocab_size),
    }
    onnx.save(build_sampler_model(shape.vocab_size, opset), str(work / SAMPLE_FILE))
    onnx.save(build_decode_model(model, quantize, opset), str(work / DECODE_FILE))
    for file in signatures:
        check_onnx(work / file)
    verified, results = [], []
    for threads in sorted({1, os.cpu_count() or 1}):
        step = onnx_runner(_session(work / ONNX_FILE, threads), "generation")
        sample, decode = (_signature_runner(_session(work / f, threads), f, s) for f, s in signatures.items())
        try:
            verified = verify_decoding(step, sample, decode, shape)
        except VerificationError as error:
            raise ExportError(
                f"{DECODE_FILE} does not draw what {ONNX_FILE} and {SAMPLE_FILE} draw, with {threads} intra-op "
                f"threads: {error}"
            ) from error
        results.append((threads, check_decoding_invariance(decode, sample, shape)))
    record = _threads_record(results)
    if not record.invariant:
        raise ExportError(f"the decode graph or the sampler is not batch invariant: {record.first_failure}")
    counts = " and ".join(str(threads) for threads, _ in results)
    block: dict[str, Any] = {}
    for file, (inputs, outputs) in signatures.items():
        key = "sampler" if file == SAMPLE_FILE else "decode"
        block[key] = {
            "file": file,
            "inputs": [t.to_json() for t in inputs],
            "outputs": [t.to_json() for t in outputs],
            "graph": SAMPLE_FILE_DESCRIPTION if file == SAMPLE_FILE else DECODE_FILE_DESCRIPTION,
        }
    block["decode"]["weights"] = "per-row int8, as model.onnx" if quantize else "float32, as model.onnx"
    block["sampling_rule"] = SAMPLING_RULE
    block["verified"] = [f"{check}; onnxruntime, {counts} intra-op threads" for check in verified]
    block["batch_invariance"] = {"onnxruntime": record.to_json()}
    return block


def _check_inputs(payload: dict[str, Any], checkpoint: Path, eval_data: Path | None, quantize: bool) -> None:
    if "training" in payload:
        raise ExportError(f"{checkpoint} is a resumable last.pt; export the best.pt of the run")
    if eval_data is not None and not eval_data.is_file():
        raise ExportError(f"--eval-data {eval_data} is not a file")
    if eval_data is None and quantize:
        raise ExportError("--quantize needs --eval-data to measure the quality change")
    if eval_data is None and "weights_stored_as" in payload:
        raise ExportError(
            f"{checkpoint} stores its weights as {payload['weights_stored_as']}: give --eval-data so the "
            "manifest carries the quality of these weights, not the training figure"
        )


def _replace(work: Path, out: Path) -> None:
    """Move the staged entry into place, read it back as the server will, and restore the old one on failure."""
    old = out.with_name(f".{out.name}.replaced") if out.exists() else None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    work.chmod(0o755)
    work.rename(out)
    try:
        load_entry(out)
    except Exception:
        shutil.rmtree(out)
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old)


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    opset: int = DEFAULT_OPSET,
    eval_data: Path | None = None,
    quantize: bool = False,
    force: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """Export, verify and write one model repository entry; returns its manifest."""
    payload = load_checkpoint(checkpoint)
    task = _task_of(payload, checkpoint)
    name = out.parent.name
    version = _check_target(out, name, task, force)
    _check_inputs(payload, checkpoint, eval_data, quantize)
    model = model_from_checkpoint(payload)
    created_parent = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        scripted = export_torchscript(model, work / TORCHSCRIPT_FILE)
        export_step_onnx(model, task, work / ONNX_FILE, quantize=False, opset=opset)
        check_onnx(work / ONNX_FILE)
        manifest = _base_manifest(payload, task, name, version, opset)
        manifest["export"]["command"] = command
        manifest["export"]["checkpoint_sha256"] = sha256_file(checkpoint)
        manifest["export"]["graph"] = GRAPH_DESCRIPTION
        runners = {"TorchScript": torch_runner(scripted), "onnxruntime": onnx_runner(_session(work / ONNX_FILE), task)}
        manifest["export"]["verified"] = verify_export(model, task, runners)
        tokenizer_json = payload.get("tokenizer")
        if tokenizer_json is not None:
            (work / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
        if eval_data is not None:
            manifest["quality"] = measure_quality(_session(work / ONNX_FILE), manifest, eval_data, tokenizer_json)
        else:
            manifest["quality"] = _training_quality(payload, task)
        manifest["backends"] = ["onnxruntime", "torchscript"]
        if quantize:
            _quantize(work, model, manifest, eval_data, tokenizer_json)
            manifest["backends"] = ["onnxruntime"]
        manifest["batch_invariance"] = _batch_invariance(work, manifest, None if quantize else scripted)
        if task == "generation":
            manifest["decoding"] = _decoding(work, model, manifest, quantize)
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(work.iterdir())}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        _replace(work, out)
    except BaseException:
        if created_parent:
            shutil.rmtree(out.parent, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest
