"""ModelStatistics of the Open Inference Protocol: per tenant, served model and version, the inference requests
served through this protocol (ModelInfer, and each request of ModelStreamInfer); lstm.v1's calls are not counted.
A tenant sees its own requests only: counts of the others' would tell it how busy they are.

A request counts once its model and version are known to be served; one refused before (unknown model) counts
nowhere. Its duration runs from its arrival to its last response (or its error); a request cancelled by its
client counts nowhere. ``queue`` and ``compute_infer`` count successful requests only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tritonclient.grpc import service_pb2 as ip

from ..engine.models import ServedModel


@dataclass(frozen=True)
class Arrival:
    """When a request arrived: a monotonic clock for durations, the wall clock for ``last_inference``."""

    ns: int = field(default_factory=time.monotonic_ns)
    epoch_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(ns, 0)

    def message(self) -> ip.StatisticDuration:
        return ip.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class ModelCounts:
    last_inference: int = 0  # ms since the epoch: the arrival of the latest request that has ended
    inference_count: int = 0  # items of successful requests: a classifier's texts, one per generation turn
    execution_count: int = 0  # successful requests
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)


class InferenceStatistics:
    """The counts behind ModelStatistics, the one owner of them. Used only on the server's event loop (every
    call is made from a coroutine or callback of that loop), so it needs no locks."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str, str], ModelCounts] = {}  # (tenant, model, version)

    def _counts(self, tenant: str, model: ServedModel, arrival: Arrival) -> ModelCounts:
        counts = self._models.setdefault((tenant, model.name, str(model.version)), ModelCounts())
        counts.last_inference = max(counts.last_inference, arrival.epoch_ms)
        return counts

    def succeeded(
        self,
        tenant: str,
        model: ServedModel,
        arrival: Arrival,
        items: int,
        queue_ns: int | None,
        compute_ns: int | None,
    ) -> None:
        """A request of ``tenant`` whose last response went out now; ``queue_ns`` and ``compute_ns`` where
        measured."""
        counts = self._counts(tenant, model, arrival)
        counts.inference_count += items
        counts.execution_count += 1
        counts.success.add(time.monotonic_ns() - arrival.ns)
        if queue_ns is not None:
            counts.queue.add(queue_ns)
        if compute_ns is not None:
            counts.compute_infer.add(compute_ns)

    def failed(self, tenant: str, model: ServedModel, arrival: Arrival) -> None:
        """A request of ``tenant`` to a served model whose error went out now."""
        self._counts(tenant, model, arrival).fail.add(time.monotonic_ns() - arrival.ns)

    def message(self, tenant: str, model: ServedModel) -> ip.ModelStatistics:
        """The model's statistics of ``tenant``'s requests; the fields not measured here stay zero."""
        counts = self._models.get((tenant, model.name, str(model.version)), ModelCounts())
        return ip.ModelStatistics(
            name=model.name,
            version=str(model.version),
            last_inference=counts.last_inference,
            inference_count=counts.inference_count,
            execution_count=counts.execution_count,
            inference_stats=ip.InferStatistics(
                success=counts.success.message(),
                fail=counts.fail.message(),
                queue=counts.queue.message(),
                compute_infer=counts.compute_infer.message(),
                # not timed apart from compute_infer: counted with no time, since clients (perf_analyzer) need the
                # three compute counts to agree
                compute_input=ip.StatisticDuration(count=counts.compute_infer.count),
                compute_output=ip.StatisticDuration(count=counts.compute_infer.count),
            ),
        )
