"""The model repository: ``<root>/<name>/<version>/manifest.json`` beside the files it lists.

This module defines the manifest's contract (shared with ``lstm_export``, which
writes it) and reads an entry back, checking everything a server relies on:
the manifest parses and has the supported format, its name and version match
the directory, every listed file exists and has its recorded sha256, and the
tensor signature is the one the task requires. It imports no torch.

A language model lists ``sample.onnx`` (its sampler, as ONNX operators: how
every character is drawn, whatever runtime steps the model) and may list
``decode.onnx`` (K characters per call: the step and the sampler in one loop),
described by its ``decoding`` block; the server uses the decode graph with
onnxruntime when the entry has one.

The optional ``batch_invariance`` block records, per backend, whether the export
found each row's results bitwise independent of its batch (``batch_invariant``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "lstm-model-repository/1"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.pt"
TOKENIZER_FILE = "tokenizer.json"
SAMPLE_FILE = "sample.onnx"  # a language model's sampler: the one definition of how a character is drawn
DECODE_FILE = "decode.onnx"  # a language model's multi-step decode graph (optional)
TASKS = ("generation", "classification")


class ModelRepositoryError(RuntimeError):
    """An entry cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, element type and shape (ints, or names for dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


def expected_signature(
    task: str, num_layers: int, num_directions: int, hidden_size: int, vocab_size: int, num_labels: int
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The (inputs, outputs) that docs/DESIGN.md section 3 fixes for ``task``."""
    state = (num_layers * num_directions, "batch", hidden_size)
    states_in = (TensorSpec("h0", "float32", state), TensorSpec("c0", "float32", state))
    states_out = (TensorSpec("hn", "float32", state), TensorSpec("cn", "float32", state))
    tokens = TensorSpec("tokens", "int64", ("batch", "time"))
    if task == "generation":
        logits = TensorSpec("logits", "float32", ("batch", "time", vocab_size))
        return (tokens, *states_in), (logits, *states_out)
    if task == "classification":
        lengths = TensorSpec("lengths", "int64", ("batch",))
        logits = TensorSpec("logits", "float32", ("batch", num_labels))
        return (tokens, lengths, *states_in), (logits, *states_out)
    raise ModelRepositoryError(f"unknown task {task!r}: expected one of {TASKS}")


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass(frozen=True)
class ModelEntry:
    """A checked model repository entry."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> int:
        return self.manifest["version"]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def num_layers(self) -> int:
        return self.manifest["num_layers"]

    @property
    def hidden_size(self) -> int:
        return self.manifest["hidden_size"]

    @property
    def num_directions(self) -> int:
        return self.manifest["num_directions"]

    @property
    def labels(self) -> list[str]:
        return self.manifest["labels"]

    @property
    def vocab(self) -> list[str] | None:
        """The language model's characters in id order (None for a classifier)."""
        return self.manifest.get("vocab")

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec.from_json(t) for t in self.manifest["signature"]["inputs"])

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec.from_json(t) for t in self.manifest["signature"]["outputs"])

    def file(self, name: str) -> Path:
        """The path of a file the manifest lists; ModelRepositoryError if it has none by that name."""
        if name not in self.manifest["files"]:
            raise ModelRepositoryError(f"{self.path / MANIFEST}: {self.name}/{self.version} has no {name}")
        return self.path / name

    @property
    def has_decode_graph(self) -> bool:
        return DECODE_FILE in self.manifest["files"]

    def tokenizer_json(self) -> str:
        """The classifier's tokenizer, as the JSON that ``tokenizers.Tokenizer.from_str`` reads."""
        return self.file(TOKENIZER_FILE).read_text(encoding="utf-8")


REQUIRED_KEYS = (
    "format",
    "name",
    "version",
    "task",
    "labels",
    "num_layers",
    "hidden_size",
    "num_directions",
    "signature",
    "files",
)


def load_entry(path: str | Path) -> ModelEntry:
    """Read and check the entry at ``path`` (``<root>/<name>/<version>``)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ModelRepositoryError(f"{manifest_path}: missing (is {path} a <name>/<version> directory?)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelRepositoryError(f"{manifest_path}: corrupted, not valid JSON ({error})") from error
    if not isinstance(manifest, dict):
        raise ModelRepositoryError(f"{manifest_path}: corrupted, expected a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ModelRepositoryError(f"{manifest_path}: incomplete, missing {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise ModelRepositoryError(
            f"{manifest_path}: version mismatch, format {manifest['format']!r} is not the supported {FORMAT!r}"
        )
    if str(manifest["version"]) != path.name or manifest["name"] != path.parent.name:
        raise ModelRepositoryError(
            f"{manifest_path}: version mismatch, the manifest says {manifest['name']}/{manifest['version']} "
            f"but the directory is {path.parent.name}/{path.name}"
        )
    entry = ModelEntry(path, manifest)
    _check_files(entry)
    _check_signature(entry, manifest_path)
    _check_batch_invariance(manifest, manifest_path)
    return entry


def _check_batch_invariance(manifest: dict[str, Any], manifest_path: Path) -> None:
    record = manifest.get("batch_invariance")
    if record is None:
        return
    if not isinstance(record, dict) or not all(
        isinstance(r, dict) and isinstance(r.get("invariant"), bool) for r in record.values()
    ):
        raise ModelRepositoryError(
            f"{manifest_path}: corrupted batch_invariance, expected {{backend: {{'invariant': true|false, ...}}}}"
        )


def _check_files(entry: ModelEntry) -> None:
    for name, expected in entry.manifest["files"].items():
        file = entry.path / name
        if not file.is_file():
            raise ModelRepositoryError(f"{file}: missing (listed in {MANIFEST})")
        actual = sha256_file(file)
        if actual != expected:
            raise ModelRepositoryError(
                f"{file}: corrupted, sha256 {actual} does not match the manifest's {expected} "
                "(re-export the model or restore the file)"
            )


def _check_signature(entry: ModelEntry, manifest_path: Path) -> None:
    manifest = entry.manifest
    if entry.task == "generation":
        if not entry.vocab:
            raise ModelRepositoryError(f"{manifest_path}: a generation model needs its 'vocab'")
        vocab_size, num_labels = len(entry.vocab), 0
        entry.file(SAMPLE_FILE)
    else:
        entry.file(TOKENIZER_FILE)
        vocab_size, num_labels = 0, len(entry.labels)
    inputs, outputs = expected_signature(
        entry.task, entry.num_layers, entry.num_directions, entry.hidden_size, vocab_size, num_labels
    )
    try:
        actual = (entry.inputs, entry.outputs)
    except (KeyError, TypeError) as error:
        raise ModelRepositoryError(f"{manifest_path}: corrupted signature ({error})") from error
    if actual != (inputs, outputs):
        raise ModelRepositoryError(
            f"{manifest_path}: wrong shape, signature {_describe(actual)} does not match the {manifest['task']} "
            f"contract {_describe((inputs, outputs))}"
        )


def _describe(signature: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]) -> str:
    return "; ".join(",".join(f"{t.name}:{t.dtype}{list(t.shape)}" for t in side) for side in signature)


def check_onnx_session(entry: ModelEntry, session) -> None:
    """Check that an onnxruntime session's inputs and outputs are the manifest's signature."""
    dtypes = {"tensor(float)": "float32", "tensor(int64)": "int64"}
    for declared, actual, side in (
        (entry.inputs, session.get_inputs(), "input"),
        (entry.outputs, session.get_outputs(), "output"),
    ):
        got = tuple(
            (a.name, dtypes.get(a.type, a.type), tuple(d if isinstance(d, int) else "?" for d in a.shape))
            for a in actual
        )
        want = tuple((t.name, t.dtype, tuple(d if isinstance(d, int) else "?" for d in t.shape)) for t in declared)
        if got != want:
            raise ModelRepositoryError(
                f"{entry.file(ONNX_FILE)}: wrong shape, the model's {side}s {got} do not match the manifest's {want}"
            )


def batch_invariant(entry: ModelEntry, backend: str) -> bool:
    """Whether the export found ``backend`` of ``entry`` batch invariant (a row's logits, hn and cn bitwise the same
    alone or in any batch): ``manifest["batch_invariance"][backend]["invariant"]``, False where the manifest does
    not say (an entry exported before the check, or a backend it did not check)."""
    record = entry.manifest.get("batch_invariance")
    if not isinstance(record, dict) or not isinstance(record.get(backend), dict):
        return False
    return record[backend].get("invariant") is True


def list_entries(root: str | Path) -> dict[str, list[int]]:
    """Model names under ``root`` and their versions (directories with a manifest), sorted."""
    root = Path(root)
    found: dict[str, list[int]] = {}
    for manifest in sorted(root.glob(f"*/*/{MANIFEST}")):
        version_dir = manifest.parent
        if version_dir.name.isdigit():
            found.setdefault(version_dir.parent.name, []).append(int(version_dir.name))
    return {name: sorted(versions) for name, versions in sorted(found.items())}


def load_latest(root: str | Path, name: str) -> ModelEntry:
    """The highest version of ``name`` under ``root``."""
    versions = list_entries(root).get(name)
    if not versions:
        raise ModelRepositoryError(f"{Path(root) / name}: no versions of model {name!r}")
    return load_entry(Path(root) / name / str(versions[-1]))
