"""`distill-eval`: a finished run's student (and optionally a teacher) scored on any dataset, through the
run's own evaluation: its method's metrics (top-1/top-5, zero-shot top-1 for CLIP students) on the views of
its recipe's evaluation transform (`plan.eval_view`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from teachers import create_teacher
from teachers.checkpoint import load_checkpoint

from .augment import load_recipe
from .data import create_dataset
from .errors import RecipeError
from .evaluate import teacher_accuracy
from .export import find_run
from .loader import ReplayDataset
from .method import create_method
from .plan import eval_view
from .recipe import parse_recipe

__all__ = ["score_run"]


def score_run(
    target: str | Path,
    data: str | None = None,
    teacher: str | None = None,
    teacher_checkpoint: str | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """The metrics of the run (folder or weights) `target` on `data` (default: the run's data.val), with
    `teacher_top1`/`teacher_top5` of `teacher` on the same views when given."""
    raw, weights, metadata = find_run(target)
    recipe = parse_recipe(raw)
    spec = data or recipe.data.val
    val_set = create_dataset(spec, "val", recipe.data.skip_unreadable)
    if not val_set.has_labels:
        raise RecipeError(f"--data: {spec} has no labels to score against")
    outputs = json.loads(metadata.get("num_classes", "0")) or val_set.num_classes  # (older weights: none)
    method = create_method(recipe, outputs)
    if method.spec.outputs == "logits" and val_set.num_classes != outputs:  # (zero-shot takes any classes)
        raise RecipeError(f"--data: {spec} has {val_set.num_classes} classes, the student outputs {outputs}")
    # Built as the run built it, less its initial weights (they may not be on this machine), then the run's:
    # the whole module's state (a TinyCLIP run's masks with its CLIP model, for one).
    student = method.build_student(dataclasses.replace(recipe.student, checkpoint=None), recipe.data.img_size)
    load_checkpoint(student, weights, what=f"the student of {target} ({recipe.student.model})")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    views = ReplayDataset(val_set, eval_view(recipe, load_recipe(recipe.augmentation)))
    size = batch_size or recipe.eval.batch_size
    result = {"weights": str(weights), "data": spec, "images": len(val_set)}
    result |= method.evaluate(student.to(accelerator.device).eval(), views, size, accelerator)
    if teacher:
        model = create_teacher(teacher, outputs, teacher_checkpoint, accelerator.device)
        if model.outputs != "logits" or model.store is not None:
            raise RecipeError(f"--teacher: {teacher} is not a live classifier (scores need its logits)")
        result |= {f"teacher_{k}": v for k, v in teacher_accuracy(model, views, size, accelerator).items()}
    return result
