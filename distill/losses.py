"""Losses shared by the methods: soft-target cross-entropy, Hinton KD, the label term on (mixed) hard labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["label_loss", "mixed_targets", "soft_target_cross_entropy", "soft_target_kd"]


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c targets_c * log_softmax(logits)_c (targets: a distribution per row)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16 up, float64 kept
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def soft_target_kd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Soft-target cross-entropy of the student against softmax(teacher / T), times T^2.

    The T^2 keeps the gradient's scale independent of T (Hinton et al.); at T = 1 this is
    TinyViT's loss. Teacher logits may be log-probabilities (a store's rebuild): softmax of
    log-probs over T equals the stored distribution at temperature T.
    """
    targets = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return soft_target_cross_entropy(student_logits / temperature, targets) * temperature**2


def mixed_targets(batch: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """The mixed hard label of each view: lam * onehot(y) + (1 - lam) * onehot(y_partner)."""
    lam = batch["lam"][:, None]
    own = F.one_hot(batch["label"], num_classes).float()
    other = F.one_hot(batch["partner_label"].clamp(min=0), num_classes).float()  # (unmixed rows: lam 1)
    return lam * own + (1 - lam) * other


def label_loss(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], num_classes: int, smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy against the (mixed, smoothed) labels, averaged over the rows whose labels are known: an
    unlabelled image (label NO_LABEL, -1), or one mixed with an unlabelled partner, has no label term. A batch
    with no labelled row gives 0 (with a gradient of zeros, so every process backpropagates alike)."""
    known = (batch["label"] >= 0) & ((batch["partner_label"] >= 0) | (batch["lam"] >= 1))
    if not bool(known.any()):
        return logits.sum() * 0.0
    rows = {k: v[known] for k, v in batch.items() if k in ("label", "partner_label", "lam")}
    targets = mixed_targets(rows, num_classes) * (1 - smoothing) + smoothing / num_classes
    return soft_target_cross_entropy(logits[known], targets)
