"""The training loop shared by both tasks.

AdamW with linear warmup then exponential decay (a factor per epoch, so the
schedule does not depend on how many epochs are planned and a resumed run
continues it exactly), gradient clipping, gradient-health checks, validation
every epoch, early stopping, atomic checkpoints (``best.pt`` for shipping,
``last.pt`` for resuming), a JSONL metrics log and a PNG of the curves.

Reproducibility: the model is initialised from ``seed``, and every epoch
reseeds torch and the data order from (seed, epoch), so training N epochs
equals training k, resuming, and training N - k more.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .checkpoint import FORMAT, git_commit, load_checkpoint, save_atomic
from .plots import plot_metrics


@dataclass
class TrainConfig:
    epochs: int = 20
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    lr_decay: float = 0.9
    clip: float = 1.0
    patience: int = 3
    seed: int = 1337
    log_every: int = 10
    max_steps_per_epoch: int | None = None
    explode_threshold: float = 100.0
    vanish_threshold: float = 1e-6
    average_from: int = 0  # from this epoch on, also try the average of the epochs' weights (0: off)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite; no checkpoint was written for that step."""


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def learning_rate(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    return config.lr * warmup * config.lr_decay ** (step / max(1, steps_per_epoch))


class Trainer:
    """Trains ``task`` and writes ``best.pt``, ``last.pt``, ``metrics.jsonl`` and ``curves.png`` to ``out_dir``."""

    def __init__(
        self,
        task,
        config: TrainConfig,
        out_dir: str | os.PathLike,
        device: torch.device,
        distributed: Distributed | None = None,
        data_sha256: str = "",
        command: str = "",
    ) -> None:
        self.task = task
        self.config = config
        self.out_dir = Path(out_dir)
        self.device = device
        self.distributed = distributed or Distributed()
        self.data_sha256 = data_sha256
        self.command = command
        self.git_commit = git_commit()  # the code that runs, even if the checkout moves on meanwhile
        torch.manual_seed(config.seed)
        self.model = task.build_model().to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.epoch = 0
        self.best: dict[str, float] | None = None
        self.bad_epochs = 0
        self.history: list[dict[str, float]] = []
        self.average: dict[str, torch.Tensor] | None = None  # running mean of the weights since average_from
        self.averaged_epochs = 0

    # -- checkpoints -------------------------------------------------------

    def _payload(self, with_training_state: bool, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        payload = {
            "format": FORMAT,
            "kind": self.task.kind,
            "config": asdict(self.task.config),
            "state_dict": state_dict if state_dict is not None else self.model.state_dict(),
            **self.task.metadata(),
            "metrics": self.history,
            "best": self.best,
            "data_sha256": self.data_sha256,
            "git_commit": self.git_commit,
            "command": self.command,
        }
        if with_training_state:
            payload["training"] = {
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "epoch": self.epoch,
                "bad_epochs": self.bad_epochs,
                "train_config": asdict(self.config),
                "average": self.average,
                "averaged_epochs": self.averaged_epochs,
            }
        return payload

    def resume(self, path: str | os.PathLike) -> None:
        """Continue from a ``last.pt``: weights, optimizer, step, epoch and early-stopping state."""
        payload = load_checkpoint(path, expected_kind=self.task.kind)
        if "training" not in payload:
            raise ValueError(f"{path} has no training state; resume from last.pt, not best.pt")
        if payload["config"] != asdict(self.task.config):
            differs = sorted(k for k in payload["config"] if payload["config"][k] != asdict(self.task.config).get(k))
            raise ValueError(
                f"{path} is a model with other options ({', '.join(differs)}): resume with the run's options"
            )
        options = {k: v for k, v in payload["training"]["train_config"].items() if k not in ("epochs", "patience")}
        mine = {k: v for k, v in asdict(self.config).items() if k in options}
        if options != mine:
            differs = sorted(k for k in options if options[k] != mine.get(k))
            raise ValueError(
                f"{path} was trained with other options ({', '.join(differs)}): resume with the same "
                "ones (only --epochs and --patience may change)"
            )
        if self.data_sha256 and payload["data_sha256"] != self.data_sha256:
            raise ValueError(f"{path} was trained on data with sha256 {payload['data_sha256']}, not {self.data_sha256}")
        self.model.load_state_dict(payload["state_dict"])
        training = payload["training"]
        self.optimizer.load_state_dict(training["optimizer"])
        self.step, self.epoch, self.bad_epochs = training["step"], training["epoch"], training["bad_epochs"]
        average = training.get("average")
        self.average = {k: v.to(self.device) for k, v in average.items()} if average else None
        self.averaged_epochs = training.get("averaged_epochs", 0)
        self._trim_log()
        self.best, self.history = payload["best"], payload["metrics"]

    # -- logging -----------------------------------------------------------

    def _trim_log(self) -> None:
        """Keep the log's records up to the resumed step: a crashed epoch's steps are logged again."""
        path = self.out_dir / "metrics.jsonl"
        if self.distributed.is_main and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= self.step]
            path.write_text("".join(line + "\n" for line in kept))

    def _log(self, record: dict[str, Any]) -> None:
        if not self.distributed.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _event(self, event: str, grad_norm: float, loss: float) -> None:
        record = {
            "type": "event",
            "event": event,
            "step": self.step,
            "epoch": self.epoch + 1,
            "grad_norm": grad_norm,
            "loss": loss,
        }
        self._log(record)
        if self.distributed.is_main:
            message = (
                f"{event} at step {self.step} (epoch {self.epoch + 1}): grad norm {grad_norm:.3g}, loss {loss:.4g}"
            )
            tqdm.write(message, file=sys.stderr)

    # -- the loop ------------------------------------------------------------

    def _better(self, new: dict[str, float], old: dict[str, float] | None) -> bool:
        if old is None:
            return True
        a, b = new[self.task.metric], old[self.task.metric]
        return a > b if self.task.higher_is_better else a < b

    def _averaged_candidate(self, metrics: dict[str, Any]) -> tuple[dict[str, Any], dict | None]:
        """Fold this epoch's weights into the running average; return the better of (epoch, average)
        as (metrics, state_dict or None for the model's own)."""
        n = self.averaged_epochs
        state = self.model.state_dict()
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in state.items()}
        else:
            for key, value in state.items():
                if value.is_floating_point():
                    self.average[key].mul_(n / (n + 1)).add_(value, alpha=1 / (n + 1))
        self.averaged_epochs += 1
        averaged = self.task.build_model().to(self.device)
        averaged.load_state_dict(self.average)
        average_metrics = {**metrics, **self.task.evaluate(averaged, self.device), "weights": "average"}
        metrics["average"] = {k: average_metrics[k] for k in average_metrics if k.startswith("val_")}
        if self._better(average_metrics, metrics):
            return average_metrics, {k: v.clone() for k, v in self.average.items()}
        return metrics, None

    def _train_step(self, model: nn.Module, batch, steps_per_epoch: int) -> tuple[float, float]:
        lr = learning_rate(self.config, self.step, steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.task.loss(model, batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip).item()
        loss_value = loss.item()
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self._event("non_finite", grad_norm, loss_value)
            raise TrainingDiverged(
                f"loss {loss_value} / gradient norm {grad_norm} at step {self.step} (epoch {self.epoch + 1}); "
                "stopped without writing a checkpoint. Lower --lr or --clip and resume from last.pt"
            )
        if grad_norm > self.config.explode_threshold:
            self._event("exploding_gradient", grad_norm, loss_value)
        elif grad_norm < self.config.vanish_threshold:
            self._event("vanishing_gradient", grad_norm, loss_value)
        self.optimizer.step()
        self.step += 1
        return loss_value, grad_norm

    def fit(self) -> dict[str, float] | None:
        """Train until ``epochs`` or early stopping; returns the best validation metrics."""
        model: nn.Module = self.model
        if self.distributed.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(self.model, device_ids=device_ids)
        if self.step == 0 and self.distributed.is_main:  # a fresh run starts a fresh log
            (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
        steps_per_epoch = self.task.steps_per_epoch()
        if self.config.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, self.config.max_steps_per_epoch)
        while self.epoch < self.config.epochs and self.bad_epochs < self.config.patience:
            epoch_seed = self.config.seed * 1000 + self.epoch
            torch.manual_seed(epoch_seed)
            rng = random.Random(epoch_seed)
            started, losses = time.time(), []
            model.train()
            progress = tqdm(
                self.task.batches(rng),
                total=steps_per_epoch,
                desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                disable=not self.distributed.is_main,
                leave=False,
            )
            for i, batch in enumerate(progress):
                if i == steps_per_epoch:
                    break
                loss, grad_norm = self._train_step(model, batch, steps_per_epoch)
                losses.append(loss)
                if self.step % self.config.log_every == 0:
                    self._log(
                        {
                            "type": "step",
                            "step": self.step,
                            "epoch": self.epoch + 1,
                            "loss": loss,
                            "grad_norm": grad_norm,
                            "lr": self.optimizer.param_groups[0]["lr"],
                        }
                    )
                    progress.set_postfix(loss=f"{loss:.3f}", grad=f"{grad_norm:.2f}")
            self.epoch += 1
            metrics = {
                "epoch": self.epoch,
                "step": self.step,
                "train_loss": sum(losses) / max(1, len(losses)),
                **self.task.evaluate(self.model, self.device),
                "seconds": time.time() - started,
            }
            candidate, weights = metrics, None
            if self.config.average_from and self.epoch >= self.config.average_from:
                candidate, weights = self._averaged_candidate(metrics)
            self.history.append(metrics)
            improved = self._better(candidate, self.best)
            self.bad_epochs = 0 if improved else self.bad_epochs + 1
            if improved:
                self.best = candidate
            self._log({"type": "epoch", **metrics})
            if self.distributed.is_main:
                if improved:
                    save_atomic(self._payload(False, weights), self.out_dir / "best.pt")
                save_atomic(self._payload(with_training_state=True), self.out_dir / "last.pt")
                plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")
                summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                if "average" in metrics:
                    summary += ", average: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics["average"].items())
                tqdm.write(f"epoch {self.epoch}: {summary}" + (" (best)" if improved else ""))
        if self.distributed.is_main and self.bad_epochs >= self.config.patience:
            tqdm.write(f"early stop: no improvement of {self.task.metric} in {self.config.patience} epochs")
        return self.best
