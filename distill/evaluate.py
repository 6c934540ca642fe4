"""Validation metrics over a whole replayed dataset, each process taking every n-th sample.

`classification_accuracy` scores a classifier's logits; `zero_shot_accuracy` scores a CLIP model's images
against the embeddings of class-name prompts. Both give top-1 / top-5 in percent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from .loader import ReplayDataset, collate


def _batches(data: ReplayDataset, batch_size: int, accelerator: Accelerator) -> Iterator[dict[str, torch.Tensor]]:
    ids = list(range(accelerator.process_index, len(data), accelerator.num_processes))
    batches = [[(0, i) for i in ids[s : s + batch_size]] for s in range(0, len(ids), batch_size)]
    yield from torch.utils.data.DataLoader(data, batch_sampler=batches, collate_fn=collate)


def _topk(
    scores_of: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module | None,
    data: ReplayDataset,
    batch_size: int,
    accelerator: Accelerator,
) -> dict[str, float]:
    """Top-1 / top-5 (%) of `scores_of(images)` over the dataset; `model` (a student; None for a teacher) in eval
    mode meanwhile and in train mode after."""
    if model is not None:
        model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for batch in _batches(data, batch_size, accelerator):
        with accelerator.autocast():
            scores = scores_of(batch["image"].to(accelerator.device))
        labels = batch["label"].to(accelerator.device)
        top = scores.topk(min(5, scores.shape[-1]), dim=-1).indices
        counts += torch.stack(
            [(top[:, 0] == labels).sum(), (top == labels[:, None]).any(-1).sum(), labels.new_tensor(len(labels))]
        )
    counts = accelerator.reduce(counts, "sum")
    if model is not None:
        model.train()
    return {"top1": 100 * counts[0].item() / counts[2].item(), "top5": 100 * counts[1].item() / counts[2].item()}


@torch.no_grad()
def classification_accuracy(
    model: nn.Module, data: ReplayDataset, batch_size: int, accelerator: Accelerator
) -> dict[str, float]:
    """Top-1 / top-5 (%) of the model's logits."""
    return _topk(model, model, data, batch_size, accelerator)


@torch.no_grad()
def teacher_accuracy(teacher: Any, data: ReplayDataset, batch_size: int, accelerator: Accelerator) -> dict[str, float]:
    """Top-1 / top-5 (%) of a live logits teacher (an ensemble too) on the same views as the student's
    evaluation. A teacher's models are in eval mode from the start (teachers/live.py) and stay so: a model put in
    train mode after this score would give the rest of a run its batch statistics (BatchNorm) and dropout."""
    return _topk(teacher.logits, None, data, batch_size, accelerator)


@torch.no_grad()
def zero_shot_accuracy(
    model: nn.Module,
    data: ReplayDataset,
    batch_size: int,
    accelerator: Accelerator,
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
) -> dict[str, float]:
    """Zero-shot top-1 / top-5 (%) of a CLIP model: each image against the mean embedding of its
    class's prompts (`template.format(class name)`)."""
    clip = accelerator.unwrap_model(model)
    clip.eval()
    with accelerator.autocast():
        classifier = zero_shot_classifier(clip, tokenizer, class_names, templates).float()

    def scores(images: torch.Tensor) -> torch.Tensor:
        return F.normalize(clip.encode_image(images).float(), dim=-1) @ classifier

    return _topk(scores, clip, data, batch_size, accelerator)


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
