"""The plan of one run: everything it needs, built and checked before anything is written.

`make_plan` validates the output dir (resume or refuse), loads the datasets, builds the method, the
teacher and the student, and checks a store against the data, augmentation, seed and epochs it
will replay. A recipe that cannot run is refused here, naming its key; only then does the
`Trainer` write a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from accelerate.utils import set_seed
from timm.data import DEFAULT_CROP_PCT
from torch import nn

from teachers import Teacher, create_teacher

from .augment import AugRecipe, load_recipe, recipe_manifest_entry
from .checkpoint import check_output_dir
from .data import ImageDataset, create_dataset
from .errors import RecipeError
from .loader import ReplayDataset
from .method import Method, create_method
from .recipe import Recipe, to_dict
from .views import EvalView, ReplayAugment

__all__ = ["Plan", "check_store", "eval_view", "make_plan"]


@dataclass
class Plan:
    """A run's parts (see the module docstring); `student` is None in a plan made without one."""

    recipe: Recipe
    out: Path
    resume_from: Path | None
    augmentation: AugRecipe
    train_set: ImageDataset
    val_set: ImageDataset
    train_ids: np.ndarray
    method: Method
    teacher: Teacher | None
    student: nn.Module | None
    train_data: ReplayDataset
    val_data: ReplayDataset

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_ids) // self.recipe.batch_size

    def view_epoch(self, epoch: int) -> int:
        """The epoch whose views (and stored outputs) training epoch `epoch` replays."""
        if self.teacher is not None and self.teacher.store is not None and self.recipe.teacher.epochs == "cycle":
            return epoch % self.teacher.store.manifest.epochs
        return epoch


def make_plan(recipe: Recipe, num_processes: int, device: torch.device, build_student: bool = True) -> Plan:
    """Check and build a run of `recipe` on `num_processes` processes (see the module docstring)."""
    out = Path(recipe.output_dir)
    resume_from = check_output_dir(out, to_dict(recipe))
    if recipe.batch_size % (num_processes * recipe.grad_accum):
        raise RecipeError(
            f"batch_size: {recipe.batch_size} images per step do not split evenly over "
            f"{num_processes} process(es) x grad_accum {recipe.grad_accum}"
        )
    set_seed(recipe.seed)
    augmentation = load_recipe(recipe.augmentation)
    train_set = create_dataset(recipe.data.train, "train", recipe.data.skip_unreadable)
    val_set = create_dataset(recipe.data.val, "val", recipe.data.skip_unreadable)
    if val_set.classes != train_set.classes:
        raise RecipeError(f"data.val: its classes {val_set.classes} differ from data.train's {train_set.classes}")
    method = create_method(recipe, train_set.num_classes)
    method.check_run(num_processes, augmentation)
    with torch.random.fork_rng(devices=[]):  # a live teacher's init must not shift the student's
        teacher = build_teacher(recipe, method, train_set, recipe_manifest_entry(augmentation), device)
    train_ids = method.training_ids(train_set, val_set)
    if len(train_ids) < recipe.batch_size:
        raise RecipeError(f"batch_size: {recipe.batch_size} is larger than the {len(train_ids)} training samples")
    student = method.build_student(recipe.student, recipe.data.img_size) if build_student else None
    if student is not None and method.tokenizer is not None and not train_set.has_captions:
        raise RecipeError(f"data.train: method {recipe.method!r} trains on captions; {recipe.data.train} has none")
    train_data = ReplayDataset(
        train_set, ReplayAugment(augmentation, recipe.data.img_size, recipe.seed), method.tokenizer
    )
    val_data = ReplayDataset(val_set, eval_view(recipe, augmentation))
    return Plan(
        recipe, out, resume_from, augmentation, train_set, val_set, train_ids, method, teacher, student,
        train_data, val_data,
    )  # fmt: skip


def eval_view(recipe: Recipe, augmentation: AugRecipe) -> EvalView:
    """The run's evaluation transform (`EvalConfig`): recipe.eval's crop_pct and interpolation, else the
    student's timm defaults, else timm's (0.875, bicubic); normalised as the training views are."""
    try:
        defaults = timm.models.get_pretrained_cfg(recipe.student.model)
    except RuntimeError:  # a name with a tag timm does not know: the student's build names the error
        defaults = None
    crop_pct = recipe.eval.crop_pct or (defaults and defaults.crop_pct) or DEFAULT_CROP_PCT
    interpolation = recipe.eval.interpolation or (defaults and defaults.interpolation) or "bicubic"
    return EvalView(recipe.data.img_size, crop_pct, interpolation, augmentation.mean, augmentation.std)


def build_teacher(
    recipe: Recipe, method: Method, train_set: ImageDataset, aug_entry: dict[str, Any], device: torch.device
) -> Teacher | None:
    """The recipe's teacher (a store or a live model), checked against the method and the data."""
    source = recipe.teacher.source
    if not source:
        return None
    teacher = create_teacher(source, train_set.num_classes or None, recipe.teacher.checkpoint, device)
    if teacher.outputs != method.spec.outputs:
        raise RecipeError(
            f"teacher.source: method {recipe.method!r} learns from a teacher's {method.spec.outputs}; "
            f"{teacher.spec} gives {teacher.outputs}"
        )
    method.check_teacher(teacher)
    if teacher.store is not None:
        check_store(teacher, recipe, train_set, aug_entry)
    elif recipe.teacher.epochs != "strict":
        raise RecipeError("teacher.epochs: cycle maps epochs onto a store's; a live teacher takes none")
    return teacher


def check_store(teacher: Teacher, recipe: Recipe, dataset: ImageDataset, aug_entry: dict[str, Any]) -> None:
    """Refuse a store that was not saved for this data, augmentation, seed and epoch count; name the field."""
    store = teacher.store
    m, where = store.manifest, f"teacher.source {teacher.source}"
    checks = [
        *([("num_classes", m.num_classes, dataset.num_classes, "data.train's class count")] if m.k else []),
        (
            "dataset.fingerprint",
            m.dataset.get("fingerprint"),
            dataset.fingerprint(),
            f"data.train ({recipe.data.train})",
        ),
        ("augmentation.hash", m.augmentation.get("hash"), aug_entry["hash"], "the recipe's augmentation"),
        ("global_seed", m.global_seed, recipe.seed, "the recipe's seed (the replayed views would differ)"),
    ]
    for name, stored, ours, what in checks:
        if stored != ours:
            detail = _recipe_difference(m.augmentation.get("recipe", {}), aug_entry["recipe"]) if "aug" in name else ""
            raise RecipeError(f"{where}: store field {name} is {stored!r} but {what} gives {ours!r}{detail}")
    if recipe.epochs > m.epochs and recipe.teacher.epochs == "strict":
        raise RecipeError(
            f"epochs: {recipe.epochs} training epochs but the store {store.location} holds {m.epochs}; "
            "set teacher.epochs: cycle to reuse its epochs, or train for fewer"
        )
    planes = [*range(min(recipe.epochs, m.epochs)), *([m.epochs] if m.kind == "embeddings" else [])]
    for epoch in planes:
        missing = store.pending_shards(epoch)
        if missing:
            what = "the text plane" if epoch == m.epochs else f"epoch {epoch}"
            raise RecipeError(
                f"{where}: {what} is incomplete ({len(missing)} of {m.num_shards} shards not committed); "
                "finish it by re-running its distill-save-logits command"
            )


def _recipe_difference(stored: dict[str, Any], ours: dict[str, Any]) -> str:
    keys = sorted(k for k in set(stored) | set(ours) if stored.get(k) != ours.get(k))
    return f" (differs in {', '.join(f'{k}: store {stored.get(k)!r}, recipe {ours.get(k)!r}' for k in keys)})"
