"""The models a server holds: one version of each model in the repository (the highest unless pinned with
``model_versions``), opened and with its engine.

A model is batched across sessions only if its manifest records that the backend it runs on is batch-invariant
(``lstm-export`` checks it: a row's results are bitwise the same alone and beside any other rows). Otherwise
one session's results would depend on the others', and the server refuses to start unless the operator opts
in with ``allow_batch_variance`` (or turns batching off: ``max_batch`` / ``classify_max_batch`` 1)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from .backends import Backend, load_backend
from .classification import ClassifierEngine
from .codec import CharCodec
from .config import ServerConfig
from .errors import ServiceError
from .generation import GenerationEngine
from .metrics import Metrics
from .model_repository import (
    ModelEntry,
    ModelRepositoryError,
    batch_invariant,
    list_entries,
    load_entry,
    load_latest,
)
from .state import StateSlots

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    entry: ModelEntry
    backend: Backend
    engine: GenerationEngine | ClassifierEngine

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


def _open(entry: ModelEntry, config: ServerConfig, metrics: Metrics) -> LoadedModel:
    check_batching(entry, config.backend_for(entry.name), config)
    backend = load_backend(entry, config.backend_for(entry.name), config.device, config.threads or None)
    layers = entry.num_layers * entry.num_directions
    if entry.task == "generation":
        codec = CharCodec(entry.vocab)
        slots = StateSlots(layers, entry.hidden_size, len(codec), config.max_sessions)
        engine = GenerationEngine(
            entry.name,
            backend,
            codec,
            slots,
            config.max_batch,
            config.stream_buffer_chars,
            config.stream_interval_ms,
            metrics,
        )
    else:
        from tokenizers import Tokenizer

        engine = ClassifierEngine(
            entry.name,
            backend,
            Tokenizer.from_str(entry.tokenizer_json()),
            entry.labels,
            (layers, entry.hidden_size),
            entry.manifest.get("pad_id", 0),
            config.classify_max_batch,
            config.classify_max_delay_ms,
            metrics,
        )
    return LoadedModel(entry, backend, engine)


class ModelRegistry:
    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        root = Path(config.models)
        names = list_entries(root)
        if not names:
            raise ModelRepositoryError(f"{root}: no models found (expected <name>/<version>/manifest.json)")
        self.models: dict[str, LoadedModel] = {}
        for name in names:
            version = config.version_for(name)
            entry = load_entry(root / name / str(version)) if version else load_latest(root, name)
            model = _open(entry, config, metrics)
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

    def start(self) -> None:
        for model in self.models.values():
            model.engine.start()

    async def stop(self) -> None:
        for model in self.models.values():
            await model.engine.stop()

    def get(self, name: str) -> LoadedModel:
        if name not in self.models:
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND, f"no model {name!r}; this server has {', '.join(sorted(self.models))}"
            )
        return self.models[name]

    def of_task(self, name: str, task: str) -> LoadedModel:
        model = self.get(name)
        if model.task != task:
            hint = "use Classify" if model.task == "classification" else "use sessions, Generate or Step"
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, f"model {name!r} is a {model.task} model, not {task}: {hint}"
            )
        return model
