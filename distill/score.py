"""`distill-eval`: a finished run's student (and optionally a teacher) scored on any dataset, through the
run's own evaluation: its method's metrics (top-1/top-5, zero-shot top-1 for CLIP students) on the views of
its recipe's evaluation transform (`plan.eval_view`).

Weights (and the recipe and config beside or inside them) may come from elsewhere: they never make the toolkit
fetch anything. The student is built bare (no `pretrained`, no weight source in a pretrained_cfg, a hub name
replaced by the architecture its config.json names) and the local weights loaded into it."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from teachers import create_teacher
from teachers.checkpoint import load_checkpoint

from .augment import load_augmentation
from .data import create_dataset
from .errors import RecipeError
from .evaluate import teacher_accuracy
from .export import CONFIG_FILE, WEIGHTS_SOURCE_KEYS, find_run, metadata_value, untrusted_json
from .files import read_regular_file
from .loader import ReplayDataset
from .method import create_method
from .plan import eval_view
from .recipe import StudentConfig, parse_recipe
from .threads import cpu_threads

__all__ = ["offline_student", "score_run"]

# timm.create_model arguments by which a model fetches or reads weights of its own: the run's are loaded after.
FETCHING_KWARGS = ("pretrained", "checkpoint_path", "cache_dir")
HUB_PREFIXES = ("hf-hub:", "hf_hub:")  # timm fetches such a model's config.json from the hub, even unpretrained
MAX_CONFIG_BYTES = 1 << 20  # timm's config.json is a few KiB


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
    outputs = metadata_value(metadata, "num_classes", weights) or val_set.num_classes  # (older weights: none)
    if not isinstance(outputs, int) or isinstance(outputs, bool) or outputs < 1:
        raise RecipeError(f"{weights}: metadata num_classes: expected a class count >= 1, got {outputs!r}")
    method = create_method(recipe, outputs)
    if method.spec.outputs == "logits" and val_set.num_classes != outputs:  # (zero-shot takes any classes)
        raise RecipeError(f"--data: {spec} has {val_set.num_classes} classes, the student outputs {outputs}")
    # Built as the run built it, less its initial weights (they may not be on this machine), then the run's:
    # the whole module's state (a TinyCLIP run's masks with its CLIP model, for one).
    student = method.build_student(offline_student(recipe.student, weights), recipe.data.img_size, None)
    load_checkpoint(student, weights, what=f"the student of {target} ({recipe.student.model})")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    threads = cpu_threads(accelerator.num_processes, accelerator.device.type)
    if threads and accelerator.is_main_process:
        print(threads, file=sys.stderr)  # (stdout is the result's JSON line)
    views = ReplayDataset(val_set, eval_view(recipe, load_augmentation(recipe.augmentation)))
    size = batch_size or recipe.eval.batch_size
    result = {"weights": str(weights), "data": spec, "images": len(val_set)}
    result |= method.evaluate(student.to(accelerator.device).eval(), views, size, accelerator)
    if teacher:
        model = create_teacher(teacher, outputs, teacher_checkpoint, accelerator.device)
        if model.outputs != "logits" or model.store is not None:
            raise RecipeError(f"--teacher: {teacher} is not a live classifier (scores need its logits)")
        result |= {f"teacher_{k}": v for k, v in teacher_accuracy(model, views, size, accelerator).items()}
    return result


def offline_student(cfg: StudentConfig, weights: Path) -> StudentConfig:
    """`cfg` as distill-eval builds it: nothing fetched nor read but the weights loaded after (see the module)."""
    kwargs, model = _offline_kwargs(cfg.kwargs), cfg.model
    if model.lower().startswith(HUB_PREFIXES):
        model, kwargs = _architecture_beside(weights, model, kwargs)
    return dataclasses.replace(cfg, model=model, kwargs=kwargs, checkpoint=None)


def _offline_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments less FETCHING_KWARGS, their pretrained_cfg (and its overlay) less WEIGHTS_SOURCE_KEYS."""
    out = {key: value for key, value in kwargs.items() if key not in FETCHING_KWARGS}
    for key in ("pretrained_cfg", "pretrained_cfg_overlay"):
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if k not in WEIGHTS_SOURCE_KEYS}
    return out


def _architecture_beside(weights: Path, name: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the timm architecture, its kwargs) of a hub-named student, from the config.json beside its weights
    (`export.export_model` writes it in timm's form): its model_args under the recipe's kwargs, its
    pretrained_cfg less WEIGHTS_SOURCE_KEYS."""
    path = weights.parent / CONFIG_FILE
    if not path.is_file():
        raise RecipeError(
            f"student.model {name!r} is a Hugging Face hub name and no {CONFIG_FILE} beside {weights} names its "
            "architecture; distill-eval fetches nothing for weights from elsewhere: put the run's config.json there"
        )
    try:
        config = untrusted_json(read_regular_file(path, MAX_CONFIG_BYTES, "a model config").decode("utf-8"), str(path))
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read: {err}") from None
    config = config if isinstance(config, dict) else {}
    arch, args, pretrained = config.get("architecture"), config.get("model_args", {}), config.get("pretrained_cfg", {})
    if not isinstance(arch, str) or ":" in arch or not isinstance(args, dict) or not isinstance(pretrained, dict):
        raise RecipeError(
            f"{path}: expected timm's model config: an 'architecture' (a timm model name, no source prefix), "
            "'model_args' and 'pretrained_cfg' mappings"
        )
    cfg = {k: v for k, v in pretrained.items() if k not in WEIGHTS_SOURCE_KEYS}
    return arch, _offline_kwargs(args) | ({"pretrained_cfg": cfg} if cfg else {}) | kwargs
