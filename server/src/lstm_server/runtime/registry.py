"""The models a server holds: one version of each model in the repository (the highest unless pinned with
``model_versions``), checked and opened on its backend.

A model is batched across sessions only if its manifest records that the backend it runs on is batch-invariant
(``lstm-export`` checks it: a row's results are bitwise the same alone and beside any other rows). Otherwise
one session's results would depend on the others', and the server refuses to start unless the operator opts
in with ``allow_batch_variance`` (or turns batching off: ``max_batch`` / ``classify_max_batch`` 1).

The registry builds no engine: ``app.py`` gives each loaded model its engine (``engine/models.py``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import ServerConfig
from .backends import Backend, load_backend
from .model_repository import ModelEntry, ModelRepositoryError, batch_invariant, list_entries, load_entry, load_latest

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A checked repository entry, opened on its backend."""

    entry: ModelEntry
    backend: Backend

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def version(self) -> int:
        return self.entry.version

    @property
    def task(self) -> str:
        return self.entry.task


def check_batching(entry: ModelEntry, backend: str, config: ServerConfig) -> None:
    """Refuse to batch sessions on an entry not proven batch-invariant with ``backend`` (unless opted in)."""
    batch = config.max_batch if entry.task == "generation" else config.classify_max_batch
    if batch == 1 or config.allow_batch_variance or batch_invariant(entry, backend):
        return
    found = entry.manifest.get("batch_invariance", {}).get(backend, {}).get("first_failure")
    why = f" ({found})" if found else " (its manifest records no batch-invariance check)"
    option = "--max-batch 1" if entry.task == "generation" else "--classify-max-batch 1"
    raise ModelRepositoryError(
        f"{entry.name}/{entry.version} on {backend} is not batch-invariant{why}: batched, one session's results "
        f"would depend on the others'. Serve an invariant version (--model-versions), re-export it with "
        f"lstm-export, turn batching off ({option}), or pass --allow-batch-variance to batch it anyway"
    )


class ModelRegistry:
    """Loads every model of the repository at ``config.models``: ``models`` maps each name to its LoadedModel."""

    def __init__(self, config: ServerConfig) -> None:
        root = Path(config.models)
        names = list_entries(root)
        if not names:
            raise ModelRepositoryError(f"{root}: no models found (expected <name>/<version>/manifest.json)")
        self.models: dict[str, LoadedModel] = {}
        for name in names:
            version = config.version_for(name)
            entry = load_entry(root / name / str(version)) if version else load_latest(root, name)
            backend_name = config.backend_for(name)
            check_batching(entry, backend_name, config)
            threads = config.threads_for(name)
            # a language model with a decode graph reads prompts with this backend on its prefill thread, beside the
            # decode thread: its idle workers spinning there would take the cores the decode call is using
            prompts_only = entry.task == "generation" and entry.has_decode_graph
            spinning = config.thread_spinning and not prompts_only
            backend = load_backend(entry, backend_name, config.device, threads, spinning)
            model = LoadedModel(entry, backend)
            self.models[name] = model
            log.info(
                "loaded model",
                extra={
                    "model": name,
                    "version": model.version,
                    "task": model.task,
                    "backend": model.backend.name,
                    "device": model.backend.device,
                },
            )
