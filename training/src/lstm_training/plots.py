"""A PNG of a training run's curves, drawn from its metrics.jsonl."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Loss (train per logged step, validation per epoch), validation accuracy if any, and gradient norm."""
    with open(metrics_path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    events = [r for r in records if r["type"] == "event"]
    has_accuracy = any("val_accuracy" in r for r in epochs)
    panels = 3 if has_accuracy else 2
    figure, axes = plt.subplots(panels, 1, figsize=(8, 3 * panels), sharex=True)

    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss", alpha=0.6)
    axes[0].plot([r["step"] for r in epochs], [r["val_loss"] for r in epochs], "o-", label="validation loss")
    axes[0].set_ylabel("loss (nats)")
    axes[0].legend()
    if has_accuracy:
        axes[1].plot([r["step"] for r in epochs], [r["val_accuracy"] for r in epochs], "o-", color="tab:green")
        axes[1].set_ylabel("validation accuracy")
    grad_axis = axes[-1]
    grad_axis.plot([r["step"] for r in steps], [r["grad_norm"] for r in steps], color="tab:red", alpha=0.7)
    for event in events:
        grad_axis.axvline(event["step"], color="black", linestyle=":", alpha=0.5)
    if any(r["grad_norm"] > 0 for r in steps):
        grad_axis.set_yscale("log")
    grad_axis.set_ylabel("gradient norm (before clipping)")
    grad_axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(png_path, dpi=80)
    plt.close(figure)
