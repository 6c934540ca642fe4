"""TinyCLIP affinity mimicking, the CLIP contrastive loss, and zero-shot evaluation helpers.

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

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


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


def tinyclip_loss(
    student_img: torch.Tensor,
    student_txt: torch.Tensor,
    teacher_img: torch.Tensor,
    teacher_txt: torch.Tensor,
    alpha: float = 1.0,
    affinity_scale: float = 50.0,
    contrastive_scale: float | torch.Tensor | None = None,
    gather_with_grad: bool = False,
) -> torch.Tensor:
    """``alpha * affinity + (1 - alpha) * contrastive`` (the contrastive term on the student's own features).

    ``contrastive_scale`` is the student's logit scale (exponentiated); it defaults to ``affinity_scale``.
    """
    loss = affinity_loss(student_img, student_txt, teacher_img, teacher_txt, affinity_scale, gather_with_grad)
    if alpha == 1.0:
        return loss
    scale = affinity_scale if contrastive_scale is None else contrastive_scale
    contrastive = clip_contrastive_loss(student_img, student_txt, scale, gather_with_grad)
    return alpha * loss + (1 - alpha) * contrastive


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def zero_shot_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
) -> torch.Tensor:
    """[embed_dim, num_classes] class embeddings: the normalised mean of each class's normalised prompt embeddings.

    ``tokenizer`` is open_clip's (``open_clip.get_tokenizer(name)``); a template is a format string with ``{}``
    or a callable of the class name (as in ``open_clip.zero_shot_metadata``).
    """
    device = _device(model)
    columns = []
    for name in classnames:
        texts = [t(name) if callable(t) else t.format(name) for t in templates]
        embeddings = model.encode_text(tokenizer(texts).to(device), normalize=True)
        columns.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def zero_shot_accuracy(
    model: nn.Module,
    classifier: torch.Tensor,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    topk: Sequence[int] = (1, 5),
) -> dict[int, float]:
    """Top-k accuracy (fraction) of ``model``'s images against a ``zero_shot_classifier``, per k in ``topk``."""
    device = _device(model)
    correct = dict.fromkeys(topk, 0)
    total = 0
    for images, labels in batches:
        logits = model.encode_image(images.to(device), normalize=True) @ classifier.to(device)
        labels = labels.to(device)
        ranked = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices
        for k in topk:
            correct[k] += int((ranked[:, :k] == labels[:, None]).any(dim=1).sum())
        total += labels.numel()
    return {k: correct[k] / max(total, 1) for k in topk}
