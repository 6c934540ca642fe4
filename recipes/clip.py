"""`clip`: trains a CLIP model contrastively on image-caption pairs (a teacher, or a baseline), and the parts
every CLIP method shares: the student (an open_clip config by name, or a pruned model's config JSON), caption
tokenization, and zero-shot validation with class-name prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from accelerate import Accelerator
from torch import nn

from distill.affinity import clip_contrastive_loss
from distill.evaluate import zero_shot_accuracy
from distill.loader import ReplayDataset
from distill.method import Method, register_method
from distill.recipe import RecipeError, StudentConfig
from students.clip_pruning import create_pruned_model
from teachers import TeacherError, load_checkpoint
from teachers.clip_teacher import create_open_clip_model

MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learned temperature here


@dataclass
class ZeroShotConfig:
    templates: list[str] = field(default_factory=lambda: ["a photo of the number {}"])
    class_names: list[str] | None = None  # default: the validation set's class names


@dataclass
class ClipLoss:
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)


def create_clip_student(cfg: StudentConfig) -> tuple[nn.Module, str]:
    """(model, tokenizer name): an open_clip config by name, or a pruned model from its config JSON
    ({"tokenizer": open_clip name, "pruned_cfg": the pruned model's config}, as the pruning stage writes it)."""
    if cfg.model.endswith(".json"):
        try:
            spec = json.loads(Path(cfg.model).read_text())
            model = create_pruned_model(spec["pruned_cfg"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RecipeError(f"student.model: {cfg.model} is not a readable pruned model config: {err!r}") from None
        model.pruned_cfg = spec["pruned_cfg"]
        return model, spec["tokenizer"]
    try:
        model = create_open_clip_model(cfg.model, spec=f"student.model {cfg.model}")
    except TeacherError as err:
        raise RecipeError(str(err)) from None
    return model, cfg.model


class ClipMethod(Method):
    """Student building, caption tokenization and zero-shot evaluation shared by the CLIP methods."""

    def build_student(self, cfg: StudentConfig, img_size: int) -> nn.Module:
        if cfg.kwargs:
            raise RecipeError("student.kwargs: CLIP students take their shape from the open_clip config; none allowed")
        model, tokenizer_name = create_clip_student(cfg)
        grid = model.visual.image_size
        if tuple(grid if isinstance(grid, tuple) else (grid, grid)) != (img_size, img_size):
            raise RecipeError(f"data.img_size: {img_size}, but student {cfg.model} takes {grid} px images")
        self.inherit(model)
        if cfg.checkpoint:
            load_checkpoint(model, cfg.checkpoint)
        self.tokenizer_name = tokenizer_name  # a pruned student written by `finish` names it again
        self.tokenizer = open_clip.get_tokenizer(tokenizer_name)
        self.context_length = int(model.context_length)
        return model

    def inherit(self, model: nn.Module) -> None:
        """Initialise `model` from other weights before training (none by default)."""

    def features(self, student: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(image features, text features, clamped logit scale), through the (possibly wrapped) module's forward."""
        image, text, scale = student(image=batch["image"], text=batch["text"])[:3]
        return image, text, scale.clamp(max=MAX_LOGIT_SCALE)

    def evaluate(
        self, model: nn.Module, data: ReplayDataset, batch_size: int, accelerator: Accelerator
    ) -> dict[str, float]:
        zs = self.cfg.zero_shot
        if not data.images.has_labels:
            raise RecipeError(
                f"data.val: zero-shot evaluation needs labelled images; {data.images.spec} has no classes"
            )
        names = zs.class_names or data.images.classes
        if len(names) != data.images.num_classes:
            raise RecipeError(
                f"loss.zero_shot.class_names: {len(names)} names for {data.images.num_classes} classes in data.val"
            )
        return zero_shot_accuracy(model, data, batch_size, accelerator, self.tokenizer, names, zs.templates)


@register_method("clip")
class Clip(ClipMethod):
    """CLIP's contrastive loss on image-caption pairs; no teacher."""

    LossConfig = ClipLoss
    needs_teacher = False

    def loss(self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: None) -> dict[str, torch.Tensor]:
        image, text, scale = self.features(student, batch)
        return {"loss": clip_contrastive_loss(image, text, scale), "logit_scale": scale.detach()}
