"""PNG plots of a training run's curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt
from matplotlib import ticker

__all__ = ["plot_training_curves"]


# Logged values that are not loss terms.
NOT_LOSSES = {"epoch", "step", "lr"}


def plot_training_curves(
    history: list[dict[str, Any]],
    path: str | Path,
    title: str = "",
    num_classes: int = 0,
    teacher_top1: float | None = None,
) -> None:
    """Training losses (the total and each logged term) and the learning rate by step, and validation top-1
    (top-5 when there are more than 5 classes) by epoch, with the teacher's top-1 as a line when known."""
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "top1" in h]
    steps = [h["step"] for h in train]
    fig, (ax_loss, ax_lr, ax_acc) = plt.subplots(1, 3, figsize=(15, 4.2))
    terms = sorted({k for h in train for k in h} - NOT_LOSSES - {"loss"})
    for name in ["loss", *terms]:
        values = [h.get(name) for h in train]
        positive = all(v is not None and v > 0 for v in values)
        if positive:  # parts that are not losses (a scale, a sparsity) go on the same log axis only when > 0
            ax_loss.plot(steps, values, label="total" if name == "loss" else name, lw=2 if name == "loss" else 1)
    ax_loss.set(xlabel="optimizer step", ylabel="training loss", yscale="log")
    ax_loss.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_loss.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    if terms:
        ax_loss.legend(fontsize="small")
    ax_lr.plot(steps, [h["lr"] for h in train])
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for key in ("top1", "top5") if num_classes > 5 else ("top1",):
        ax_acc.plot([h["epoch"] for h in evals], [h[key] for h in evals], marker="o", label=f"student {key}")
    if teacher_top1 is not None:
        ax_acc.axhline(teacher_top1, color="grey", ls="--", label=f"teacher top1 ({teacher_top1:.1f})")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)")
    ax_acc.legend(fontsize="small")
    for ax in (ax_loss, ax_lr, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
