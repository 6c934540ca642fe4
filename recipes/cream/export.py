"""The end of a Cream search: the board as a table, and the chosen path exported with BN statistics of its own.

A supernet's BN running statistics are an average over every path that used each layer (and an op's
statistics depend on the ops before it in whichever path ran), so an exported path's statistics are
recomputed on training batches: their plain average over the batches, in train mode, with no gradient.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from students.supernet import PathModel, Supernet, build_path_model, export

from .board import BoardEntry, PrioritizedBoard

__all__ = ["board_rows", "config_dict", "export_path", "format_board", "path_params", "recalibrate_bn"]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BatchNorm's running statistics by their cumulative average over `batches` (forwards in
    train mode, no gradient); the model's mode and the layers' momenta are restored. Returns the images seen."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # None: a cumulative average over the forwards, not an exponential one
    training, seen = model.training, 0
    model.train()
    try:
        for images in batches:
            model(images)
            seen += len(images)
    finally:
        model.train(training)
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
    return seen


def export_path(supernet: Supernet, path: Sequence[int], batches: Iterable[torch.Tensor]) -> tuple[PathModel, int]:
    """`path` as a standalone model (supernet weights) with BN statistics recalibrated on `batches`, and the
    images they held (with no batches, 0 and the supernet's statistics as exported)."""
    model, images, batches = export(supernet, path), 0, iter(batches)
    for first in batches:  # only when there are batches: recalibrating on none would zero the statistics
        images = recalibrate_bn(model, itertools.chain([first], batches))
        break
    return model, images


def config_dict(config: Any) -> dict[str, Any]:
    """A SupernetConfig as plain YAML/JSON data (`cream_path`'s `config` keyword)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def path_params(config: Any, path: Sequence[int], num_classes: int) -> int:
    """Parameters of a path's standalone model (built on the meta device: shapes only)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_path_model(config, path, num_classes).parameters())


def board_rows(
    board: PrioritizedBoard, config: Any, num_classes: int, budget: int, chosen: BoardEntry | None
) -> list[dict[str, Any]]:
    return [
        {
            "rank": rank,
            "path": list(entry.path),
            "heldout_top1": entry.heldout_score,
            "mflops": entry.flops / 1e6,
            "flops": entry.flops,
            "params": path_params(config, entry.path, num_classes),
            "within_budget": entry.flops <= budget,
            "chosen": entry is chosen,
        }
        for rank, entry in enumerate(board, start=1)
    ]


def format_board(rows: list[dict[str, Any]], budget_mflops: float, heldout_size: int) -> str:
    lines = [
        f"Cream board, best first (held-out top-1 on {heldout_size} images; budget {budget_mflops:g} MFLOPs):",
        f"{'rank':>4}  {'held-out':>8}  {'MFLOPs':>8}  {'params':>9}  path",
    ]
    for r in rows:
        mark = "  <- chosen" if r["chosen"] else ("" if r["within_budget"] else "  (over budget)")
        lines.append(
            f"{r['rank']:>4}  {r['heldout_top1']:>8.4f}  {r['mflops']:>8.3f}  {r['params']:>9,}  {r['path']}{mark}"
        )
    return "\n".join(lines)
