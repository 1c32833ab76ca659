"""The models as served: each loaded model (runtime) with its engine, looked up by name.

``app.py`` builds the engines from what the registry loaded; the layers above find a model here, and the
lookup's errors (NOT_FOUND, or a model of the other task) are the ones the client sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ServiceError, Status
from ..runtime.registry import LoadedModel
from .classification import ClassifierEngine
from .generation import GenerationEngine


@dataclass
class ServedModel(LoadedModel):
    """A loaded model (entry, backend) and the engine that serves it."""

    engine: GenerationEngine | ClassifierEngine


class ServedModels:
    """Every model this server serves, by name."""

    def __init__(self, models: dict[str, ServedModel]) -> None:
        self.models = models

    def all(self) -> list[ServedModel]:
        return list(self.models.values())

    def get(self, name: str, field: str = "model") -> ServedModel:
        """The model called ``name`` (NOT_FOUND otherwise; ``field``: the request field that names it)."""
        if name not in self.models:
            raise ServiceError(
                Status.NOT_FOUND,
                f"no model {name!r}; this server has {', '.join(sorted(self.models))}",
                reason="MODEL_NOT_FOUND",
                field=field,
            )
        return self.models[name]

    def of_task(self, name: str, task: str, field: str = "model") -> ServedModel:
        """The model called ``name``, if it does ``task`` (INVALID_ARGUMENT otherwise)."""
        model = self.get(name, field)
        if model.task != task:
            hint = "use Classify" if model.task == "classification" else "use sessions, Generate or Step"
            raise ServiceError(
                Status.INVALID_ARGUMENT,
                f"model {name!r} is a {model.task} model, not {task}: {hint}",
                reason="WRONG_MODEL_TASK",
                field=field,
            )
        return model

    def start(self) -> None:
        for model in self.models.values():
            model.engine.start()

    async def stop(self) -> None:
        for model in self.models.values():
            await model.engine.stop()
