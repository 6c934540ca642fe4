"""Losses shared by the methods: soft-target cross-entropy, Hinton KD, the label term on (mixed) hard labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "dist_loss",
    "dkd_loss",
    "label_loss",
    "mixed_targets",
    "nkd_loss",
    "soft_target_cross_entropy",
    "soft_target_kd",
    "target_classes",
]


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
    """Cross-entropy against the (mixed, smoothed) labels of the rows whose labels are known, summed and divided
    by the batch size: an unlabelled image (label NO_LABEL, -1), or one mixed with an unlabelled partner, adds
    0. Each labelled image weighs as much as each image in a per-image KD term, as in SimCLRv2's
    (1 - a) sum_{D_L} CE + a sum_{D} KD (Chen et al. 2020); with every label known this is the plain mean.
    A batch with no labelled row gives 0 (with a gradient of zeros, so every process backpropagates alike)."""
    known = (batch["label"] >= 0) & ((batch["partner_label"] >= 0) | (batch["lam"] >= 1))
    if not bool(known.any()):
        return logits.sum() * 0.0
    rows = {k: v[known] for k, v in batch.items() if k in ("label", "partner_label", "lam")}
    targets = mixed_targets(rows, num_classes) * (1 - smoothing) + smoothing / num_classes
    return soft_target_cross_entropy(logits[known], targets) * (int(known.sum()) / len(known))


# ---- logit distillation losses on a teacher's distribution (live, or a store's rebuild) ---------------------
#
# Each takes the student's logits, the teacher's logits (log-probabilities do: a store's rebuild), and the
# class each image is taught toward (its label, or the teacher's top-1 for an unlabelled image).


def target_classes(batch: dict[str, torch.Tensor], teacher_logits: torch.Tensor) -> torch.Tensor:
    """The label of each image, or the teacher's top class where there is none (NO_LABEL)."""
    return torch.where(batch["label"] >= 0, batch["label"], teacher_logits.argmax(-1))


def nkd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
    gamma: float = 1.5,
) -> torch.Tensor:  # fmt: skip
    """Normalized KD (Yang et al., ICCV 2023): -p_t log q_t on the target class, plus gamma T^2 times the soft
    cross-entropy of the non-target classes, each side renormalised over them (at temperature T)."""
    s, t = student_logits.float(), teacher_logits.float()
    mask = F.one_hot(target, s.shape[-1]).bool()
    q_target = F.log_softmax(s, -1).gather(1, target[:, None])[:, 0]
    p_target = F.softmax(t, -1).gather(1, target[:, None])[:, 0]
    target_term = -(p_target * q_target).mean()
    log_q = F.log_softmax((s / temperature).masked_fill(mask, float("-inf")), -1).masked_fill(mask, 0.0)
    p = F.softmax((t / temperature).masked_fill(mask, float("-inf")), -1)
    return target_term - gamma * temperature**2 * (p * log_q).sum(-1).mean()


def dkd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
    alpha: float = 1.0, beta: float = 8.0,
) -> torch.Tensor:  # fmt: skip
    """Decoupled KD (Zhao et al., CVPR 2022): alpha TCKD + beta NCKD, times T^2. TCKD is the KL of the binary
    (target, rest) distributions; NCKD the KL of the non-target classes' distributions, renormalised."""
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    mask = F.one_hot(target, s.shape[-1]).bool()
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    p_bin = torch.stack([p.masked_fill(~mask, 0).sum(-1), p.masked_fill(mask, 0).sum(-1)], -1)
    q_bin = torch.stack([q.masked_fill(~mask, 0).sum(-1), q.masked_fill(mask, 0).sum(-1)], -1)
    tckd = (p_bin * (p_bin.clamp_min(1e-12).log() - q_bin.clamp_min(1e-12).log())).sum(-1).mean()
    log_p_rest = F.log_softmax(t.masked_fill(mask, float("-inf")), -1)
    log_q_rest = F.log_softmax(s.masked_fill(mask, float("-inf")), -1)
    nckd = (log_p_rest.exp() * (log_p_rest - log_q_rest).masked_fill(mask, 0.0)).sum(-1).mean()
    return (alpha * tckd + beta * nckd) * temperature**2


def dist_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, beta: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """DIST (Huang et al., NeurIPS 2022): beta (1 - Pearson correlation) of each image's class probabilities
    (inter-class) + gamma (1 - correlation) of each class's probabilities over the batch (intra-class), times T^2."""
    q = F.softmax(student_logits.float() / temperature, -1)
    p = F.softmax(teacher_logits.float() / temperature, -1)
    inter = 1 - _pearson(q, p).mean()
    intra = 1 - _pearson(q.T, p.T).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Correlation of matching rows."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)
