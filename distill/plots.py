"""PNG plots of a training run's curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt

__all__ = ["plot_training_curves"]


def plot_training_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Training loss and learning rate by step, and validation top-1/top-5 by epoch, from the run's history."""
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "top1" in h]
    fig, (ax_loss, ax_lr, ax_acc) = plt.subplots(1, 3, figsize=(14, 4))
    ax_loss.plot([h["step"] for h in train], [h["loss"] for h in train])
    ax_loss.set(xlabel="optimizer step", ylabel="training loss", yscale="log")
    ax_lr.plot([h["step"] for h in train], [h["lr"] for h in train])
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate")
    for key in ("top1", "top5"):
        ax_acc.plot([h["epoch"] for h in evals], [h[key] for h in evals], marker="o", label=key)
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)")
    ax_acc.legend()
    for ax in (ax_loss, ax_lr, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
