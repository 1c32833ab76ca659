"""Checkpoints: written atomically, self-describing, loadable without the training code's arguments.

A checkpoint is a dict with ``format``, ``kind`` (charlm or sentiment), ``config``
(the model dataclass as a dict), ``state_dict``, ``vocab`` (charlm: the characters
in id order) or ``tokenizer`` (sentiment: the tokenizer's JSON), ``labels``,
``metrics`` (every epoch's validation figures), ``best`` (the best epoch's),
``data_sha256``, ``git_commit``, ``command`` and, in a resumable checkpoint,
``training`` (optimizer, step, epoch, early-stopping counters).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import build_model

FORMAT = "lstm-serving-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not of the expected kind."""


def git_commit() -> str:
    """The commit of the source tree this code runs from, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def save_atomic(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``payload`` to ``path`` so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        try:
            torch.save(payload, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        except BaseException:
            os.unlink(tmp.name)
            raise
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def load_checkpoint(path: str | os.PathLike, expected_kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint, checking its format and (optionally) its kind."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {path} does not exist") from error
    except Exception as error:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({error}); is it truncated or not a checkpoint?"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint")
    if expected_kind is not None and payload["kind"] != expected_kind:
        raise CheckpointError(f"{path} holds a {payload['kind']!r} model, expected {expected_kind!r}")
    return payload


def model_from_checkpoint(payload: dict[str, Any]) -> nn.Module:
    """The model of a loaded checkpoint, with its weights, in eval mode."""
    model = build_model(payload["kind"], payload["config"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def compact_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> dict[str, Any]:
    """Write ``source`` with its floating-point weights stored as float16 (half the size) and no training
    state; loading casts them back to float32. Returns the written payload (``weights_stored_as`` says so)."""
    payload = load_checkpoint(source)
    payload.pop("training", None)
    payload["state_dict"] = {
        name: value.half() if value.is_floating_point() else value for name, value in payload["state_dict"].items()
    }
    payload["weights_stored_as"] = "float16"
    save_atomic(payload, target)
    return payload
