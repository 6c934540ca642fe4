"""MiniViT weight-distillation losses: attention relations and hidden-state relations, captured with hooks.

MiniViT (the reference's Mini-Swin) distils a multiplexed student from a live teacher with

    loss = soft_ce(student_logits, teacher_probs) + 1.0 * attention_relation + 0.1 * hidden_relation

over chosen (student layer, teacher layer) pairs: six across all stages in the reference (`reference_layer_pairs`).

`RelationCapture` hooks any timm model whose blocks have an `attn.qkv` Linear (ViT/DeiT, Swin, and the multiplexed
students of `students.minivit`, where a per-block `attn.qkv_tap` is hooked instead because the shared `qkv` Linear
runs once per block using it). What is matched:

- Q, K, V are the output of the block's qkv projection (before any qk-norm), all heads concatenated, per token:
  (3, B, N, C) for ViT; for Swin one row per window, (3, B * windows, window area, C), so Swin layers must be paired
  with teacher layers of the same window layout (same resolution, window size and shift).
- Tokens are the block's output: (B, N, C) for ViT (prefix tokens included), Swin's (B, H, W, C) maps flattened to
  (B, H * W, C). Student and teacher must have the same number of tokens; widths may differ.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import partial
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "HIDDEN_RELATION_SCALE",
    "RelationCapture",
    "attention_relation_loss",
    "hidden_relation_loss",
    "reference_layer_pairs",
    "transformer_blocks",
]

QKV = torch.Tensor | Sequence[torch.Tensor]
# The reference multiplies the hidden-relation MSE by 49, "window size x window size" (Mini-Swin main.py), for
# every model: the scale `hidden_weight` 0.1 was tuned with.
HIDDEN_RELATION_SCALE = 49.0


def transformer_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The model's transformer blocks (modules with an `attn.qkv` Linear), by name, in forward order."""
    blocks = {
        name: module
        for name, module in model.named_modules()
        if isinstance(getattr(getattr(module, "attn", None), "qkv", None), nn.Linear)
    }
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no blocks with an `attn.qkv` Linear")
    return blocks


class RelationCapture:
    """Records Q/K/V and output tokens of chosen blocks at every forward of `model`.

    Use as a context manager or call `remove()` (which keeps the last record). Each forward of `model` clears the
    previous record, so after a forward `qkv[name]` is (3, B', N, C) and `tokens[name]` is (B, N, C) for every name
    in `layers` (see the module docstring). The tensors stay in the autograd graph: the student's carry gradients,
    the teacher's should come from a forward under `torch.no_grad()` (the losses detach them anyway).

    Args:
        model: A timm ViT/DeiT or Swin, plain or multiplexed.
        layers: Block indices into `transformer_blocks(model)` (negative counts from the end) or block names.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int | str]) -> None:
        blocks = transformer_blocks(model)
        names = list(blocks)
        self.layers: list[str] = [names[layer] if isinstance(layer, int) else layer for layer in layers]
        self.qkv: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(self._on_forward)]
        for name in self.layers:
            block = blocks[name]
            qkv_source = getattr(block.attn, "qkv_tap", block.attn.qkv)
            self._handles.append(qkv_source.register_forward_hook(partial(self._store_qkv, name)))
            self._handles.append(block.register_forward_hook(partial(self._store_tokens, name)))

    def clear(self) -> None:
        """Drop what was recorded (done automatically at each forward)."""
        self.qkv.clear()
        self.tokens.clear()

    def _on_forward(self, module: nn.Module, args: Any) -> None:
        self.clear()

    def _store_qkv(self, name: str, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        # (B', N, 3C) -> (3, B', N, C): timm lays qkv out as [q | k | v], heads contiguous inside each.
        self.qkv[name] = output.unflatten(-1, (3, -1)).movedim(-2, 0)

    def _store_tokens(self, name: str, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.tokens[name] = output.flatten(1, -2)

    def remove(self) -> None:
        """Remove the hooks; the last record stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> RelationCapture:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()


def _relation_heads(qkv: QKV, relation_heads: int) -> torch.Tensor:
    """(3, B, N, C) or [q, k, v] -> (3, B, R, N, C / R): concatenated head features split into R relation heads."""
    x = torch.stack(tuple(qkv)) if not isinstance(qkv, torch.Tensor) else qkv
    if x.dim() != 4 or x.shape[0] != 3:
        raise ValueError(f"expected Q, K, V as a (3, B, N, C) tensor, got shape {tuple(x.shape)}")
    channels = x.shape[-1]
    if channels % relation_heads:
        raise ValueError(f"relation_heads={relation_heads} does not divide the qkv width {channels}")
    return x.unflatten(-1, (relation_heads, channels // relation_heads)).transpose(2, 3)


def _log_relation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log softmax(a b^T / sqrt(d)) over the last axis, for (..., N, d) inputs."""
    return (a @ b.transpose(-2, -1) / math.sqrt(a.shape[-1])).log_softmax(dim=-1)


def attention_relation_loss(student_qkv: QKV, teacher_qkv: QKV, relation_heads: int) -> torch.Tensor:
    """MiniViT attention-relation loss between one student and one teacher layer.

    For each of the nine pairs (i, j) in {Q, K, V}^2 the student relation softmax(X_i X_j^T / sqrt(d)) is matched
    to the teacher's (the target, detached). Both widths are split into `relation_heads` heads, so head counts may
    differ; d is each side's width per relation head. The match is KL(teacher || student) summed over keys and
    averaged over pairs, heads, query tokens and batch: the soft cross-entropy minus the teacher's entropy, which
    gives the student the same gradient and is exactly zero when the relations are equal.

    Args:
        student_qkv: (3, B, N, Cs) tensor or (q, k, v) of (B, N, Cs) each.
        teacher_qkv: (3, B, N, Ct) tensor or (q, k, v) of (B, N, Ct) each.
        relation_heads: Number of relation heads; must divide Cs and Ct.
    """
    student = _relation_heads(student_qkv, relation_heads)
    teacher = _relation_heads(teacher_qkv, relation_heads).detach()
    if student.shape[1:4] != teacher.shape[1:4]:
        raise ValueError(f"batch / token shapes differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    losses = []
    for i, j in itertools.product(range(3), repeat=2):
        log_s = _log_relation(student[i], student[j])
        log_t = _log_relation(teacher[i], teacher[j])
        losses.append(F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=-1).mean())
    return torch.stack(losses).mean()


def hidden_relation_loss(
    student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, scale: float = HIDDEN_RELATION_SCALE
) -> torch.Tensor:
    """`scale` x the MSE (mean over B, N, N) between the token Gram matrices of L2-normalised (B, N, C) student and
    (detached) teacher tokens; the default scale is the reference's 49."""
    if student_tokens.shape[:-1] != teacher_tokens.shape[:-1]:
        raise ValueError(f"token shapes differ: {tuple(student_tokens.shape)} vs {tuple(teacher_tokens.shape)}")
    student = F.normalize(student_tokens, dim=-1)
    teacher = F.normalize(teacher_tokens.detach(), dim=-1)
    return scale * F.mse_loss(student @ student.transpose(-2, -1), teacher @ teacher.transpose(-2, -1))


def _stage_depths(model: nn.Module) -> list[int]:
    """Blocks per stage, in forward order: a stage is the module holding consecutive blocks (`blocks`, `layers.i`)."""
    stages: dict[str, int] = {}
    for name in transformer_blocks(model):
        stage = name.rsplit(".", 1)[0] if "." in name else ""
        stages[stage] = stages.get(stage, 0) + 1
    return list(stages.values())


def _stage_picks(depth: int, count: int) -> list[int]:
    """`count` blocks of a `depth`-block stage, evenly spaced and ending at its last block (first to last)."""
    return sorted(depth - 1 - round(i * depth / count) for i in range(count))


def reference_layer_pairs(student: nn.Module, teacher: nn.Module) -> list[list[int]]:
    """The reference's [student block, teacher block] pairs, by the rule its six Mini-Swin pairs follow.

    Stage by stage (the models must have as many stages): the last block of a stage where both models have at most
    two blocks, else three blocks per side, evenly spaced and ending at the stage's last block. For Mini-Swin-T
    (2, 2, 6, 2) against Swin-B/L (2, 2, 18, 2) that is student 1, 3, 5, 7, 9, 11 with teacher 1, 3, 9, 15, 21,
    23, and for Mini-Swin-S/B 1, 3, 9, 15, 21, 23 on both sides: the reference's `--student_layer_list` and
    `--teacher_layer_list` (Mini-Swin README). For a 12-block ViT it gives blocks 3, 7, 11.
    """
    s_depths, t_depths = _stage_depths(student), _stage_depths(teacher)
    if len(s_depths) != len(t_depths):
        raise ValueError(
            f"the reference's layer pairs match stage to stage, but the student has {len(s_depths)} stages "
            f"({s_depths} blocks) and the teacher {len(t_depths)} ({t_depths} blocks)"
        )
    pairs, s_start, t_start = [], 0, 0
    for s_depth, t_depth in zip(s_depths, t_depths, strict=True):
        count = 1 if max(s_depth, t_depth) <= 2 else min(3, s_depth, t_depth)
        for s_pick, t_pick in zip(_stage_picks(s_depth, count), _stage_picks(t_depth, count), strict=True):
            pairs.append([s_start + s_pick, t_start + t_pick])
        s_start, t_start = s_start + s_depth, t_start + t_depth
    return pairs
