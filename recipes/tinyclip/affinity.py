"""TinyCLIP affinity mimicking and the CLIP contrastive loss.

Affinity mimicking: with L2-normalised image features I and text features T of a batch and a fixed scale s,
the student's image-to-text affinities s I T^T (and text-to-image s T I^T) are trained toward the softmax of the
teacher's. ``affinity_loss`` returns the KL divergence KL(teacher || student) per row, i.e. the soft cross-entropy
minus the teacher's entropy: same gradients for the student, but zero (its minimum) when the student's
affinities equal the teacher's, which makes the number readable.

Under torch.distributed every rank scores its local rows against the columns of the whole global batch; the
gathered copy of the local features is replaced by the local tensor so its gradient flows. The other ranks'
slices carry no gradient, so a rank's features get none from their use as columns of other ranks' rows (as
open_clip's default); ``gather_with_grad=True`` adds it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_features(features: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
    """All ranks' features concatenated in rank order, the local slice keeping its autograd graph.

    Every rank must pass the same batch size. Without an initialised process group: ``features`` as is.
    ``with_grad`` also sends each rank, in the backward pass, the gradient its features get as *columns* of the
    other ranks' rows (exact full-batch gradients, for one all-reduce of the gathered gradient).
    """
    if not _distributed():
        return features
    if with_grad:
        return _AllGatherWithGrad.apply(features)
    parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, features.detach().contiguous())
    parts[dist.get_rank()] = features
    return torch.cat(parts)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for each slice and hands each rank its own."""

    @staticmethod
    def forward(ctx: Any, features: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, features.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # a reduce-scatter would move less data, but gloo lacks it
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def _row_offset(local_batch: int) -> int:
    return dist.get_rank() * local_batch if _distributed() else 0


def soft_kl(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(target) || softmax(logits)) = soft cross-entropy minus target entropy."""
    return F.kl_div(logits.log_softmax(-1), target_logits.log_softmax(-1), reduction="batchmean", log_target=True)


def affinity_loss(
    student_img: torch.Tensor,
    student_txt: torch.Tensor,
    teacher_img: torch.Tensor,
    teacher_txt: torch.Tensor,
    logit_scale: float = 50.0,
    gather_with_grad: bool = False,
) -> torch.Tensor:
    """1/2 KL on image-to-text affinities + 1/2 KL on text-to-image affinities (see the module docstring).

    Features are [batch, dim] (student and teacher dims may differ); the teacher's get no gradient.
    """
    s_img, s_txt = F.normalize(student_img, dim=-1), F.normalize(student_txt, dim=-1)
    t_img, t_txt = F.normalize(teacher_img.detach(), dim=-1), F.normalize(teacher_txt.detach(), dim=-1)
    all_s_img, all_s_txt = gather_features(s_img, gather_with_grad), gather_features(s_txt, gather_with_grad)
    all_t_img, all_t_txt = gather_features(t_img), gather_features(t_txt)
    i2t = soft_kl(logit_scale * s_img @ all_s_txt.T, logit_scale * t_img @ all_t_txt.T)
    t2i = soft_kl(logit_scale * s_txt @ all_s_img.T, logit_scale * t_txt @ all_t_img.T)
    return 0.5 * (i2t + t2i)


def clip_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    gather_with_grad: bool = False,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE; ``logit_scale`` is the multiplier (``model.logit_scale.exp()``), not its log."""
    img, txt = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    all_img, all_txt = gather_features(img, gather_with_grad), gather_features(txt, gather_with_grad)
    labels = torch.arange(img.shape[0], device=img.device) + _row_offset(img.shape[0])
    return 0.5 * (
        F.cross_entropy(logit_scale * img @ all_txt.T, labels) + F.cross_entropy(logit_scale * txt @ all_img.T, labels)
    )
