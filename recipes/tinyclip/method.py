"""The CLIP methods: `ClipMethod` (student building, caption tokens, zero-shot evaluation), `Clip` (contrastive
training) and `TinyClip` (affinity mimicking, manual and automatic inheritance). See `recipes.tinyclip`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from accelerate import Accelerator
from torch import nn

from distill.augment import Augmentation
from distill.checkpoint import save_weights
from distill.data import ImageDataset
from distill.errors import RecipeError
from distill.evaluate import zero_shot_accuracy
from distill.loader import ReplayDataset
from distill.method import Method, MethodContext
from distill.recipe import StudentConfig
from students.clip_pruned import create_pruned_model
from students.tinyclip import tower_param_counts
from teachers import Teacher, TeacherError
from teachers.checkpoint import load_checkpoint
from teachers.clip_teacher import create_open_clip_model

from .affinity import affinity_loss, clip_contrastive_loss
from .inheritance import inherit_weights
from .masks import CLIPPruningMasks, MaskedCLIP, SparsityLagrangian

__all__ = ["Clip", "ClipMethod", "TinyClip", "create_clip_student"]

MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learned temperature here
MASK_SUBSET_STREAM = 7  # random stream of the mask-learning subset (loss.prune.steps), beside the recipe's seed


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

    def build_student(self, cfg: StudentConfig, img_size: int, teacher: Teacher | None) -> nn.Module:
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
        names = list(open_clip.IMAGENET_CLASSNAMES) if names == "imagenet" else names
        templates = list(open_clip.OPENAI_IMAGENET_TEMPLATES) if zs.templates == "openai_imagenet" else zs.templates
        if len(names) != data.images.num_classes:
            raise RecipeError(
                f"loss.zero_shot.class_names: {len(names)} names for {data.images.num_classes} classes in data.val"
            )
        return zero_shot_accuracy(model, data, batch_size, accelerator, self.tokenizer, names, templates)


class Clip(ClipMethod):
    """CLIP's contrastive loss on image-caption pairs; no teacher."""

    def loss(self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: None) -> dict[str, torch.Tensor]:
        image, text, scale = self.features(student, batch)
        return {"loss": clip_contrastive_loss(image, text, scale), "logit_scale": scale.detach()}


class TinyClip(ClipMethod):
    """Affinity mimicking (with manual or automatic inheritance: see `recipes.tinyclip`)."""

    def build_student(self, cfg: StudentConfig, img_size: int, teacher: Teacher | None) -> nn.Module:
        model = super().build_student(cfg, img_size, teacher)
        live_context = teacher.context_length if teacher is not None else None
        if live_context is not None and live_context != self.context_length:
            raise RecipeError(
                f"student.model: its context length {self.context_length} differs from the live teacher's "
                f"{live_context}; the teacher reads the student's caption tokens (a store has no such limit)"
            )
        spec = self.cfg.prune
        if spec is None:
            return model
        # The checkpoint is in the plain model by now; the masks start open on top of it.
        try:
            masks = CLIPPruningMasks(model, spec.towers, init_log_alpha=spec.init_log_alpha)
        except ValueError as err:
            raise RecipeError(f"loss.prune.towers: {err}") from None
        # The model entering a stage counts as dense: the ramp starts at 0 (the reference's --start-sparsity is
        # the previous stage's target, counted on the original model).
        lagrangian = SparsityLagrangian(spec.target_sparsity, spec.ramp_steps, 0.0, spec.init_lambda)
        return MaskedCLIP(model, masks, lagrangian, getattr(model, "pruned_cfg", None) or cfg.model)

    def check_run(self, num_processes: int, augmentation: Augmentation) -> None:
        spec, recipe = self.cfg.prune, self.recipe
        if spec is None:
            return
        if recipe.mixed_precision == "fp16":
            # The masks' optimizer is stepped here, outside accelerate's loss scaling: their gradients would stay
            # scaled, and would swamp the gradient-norm clip. bf16 needs no scaling.
            raise RecipeError("mixed_precision: fp16 is not supported with loss.prune (masks); use bf16 or no")
        if spec.steps is not None and recipe.epochs != 1:
            raise RecipeError(
                f"epochs: loss.prune.steps makes the run {spec.steps} steps long, one epoch over a subset of "
                f"data.train; set epochs: 1 (got {recipe.epochs})"
            )

    def training_ids(self, train_set: ImageDataset, val_set: ImageDataset) -> np.ndarray:
        """All of data.train; with loss.prune.steps, a seeded random subset of steps x batch_size ids, so that
        the run's one epoch ends at the prune step (the reference's first steps see a random subset too)."""
        ids = super().training_ids(train_set, val_set)
        spec = self.cfg.prune
        if spec is None or spec.steps is None:
            return ids
        wanted = spec.steps * self.recipe.batch_size
        if wanted > len(ids):
            raise RecipeError(
                f"loss.prune.steps: {spec.steps} steps of {self.recipe.batch_size} need {wanted} samples, "
                f"data.train has {len(ids)}; learn the masks for whole epochs instead (steps: null)"
            )
        return np.sort(np.random.default_rng([self.recipe.seed, MASK_SUBSET_STREAM]).permutation(ids)[:wanted])

    def optimized_module(self, student: nn.Module) -> nn.Module:
        """With loss.prune, the CLIP model only: the masks and multipliers have their own optimizer (`setup`)."""
        return student.model if self.cfg.prune is not None else student

    def setup(self, context: MethodContext) -> None:
        """With loss.prune: the masks' optimizer (constant rates, ascent on the multipliers), checkpointed."""
        if self.cfg.prune is None:
            return
        self.masked = context.accelerator.unwrap_model(context.model)
        self.mask_optimizer = self.masked.mask_optimizer(self.cfg.prune.mask_lr, self.cfg.prune.lagrangian_lr)

    def state_dict(self) -> dict[str, Any]:
        """With loss.prune, the masks' optimizer (the masks and multipliers are in the student's weights)."""
        return {} if self.cfg.prune is None else {"mask_optimizer": self.mask_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.cfg.prune is not None:
            self.mask_optimizer.load_state_dict(state["mask_optimizer"])

    def after_step(self, student: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """With loss.prune: a step of the masks' optimizer on the gradients of the step just taken."""
        if self.cfg.prune is None:
            return {}
        self.mask_optimizer.step()
        self.mask_optimizer.zero_grad(set_to_none=True)
        self.masked.after_mask_step()
        lagrangian = self.masked.lagrangian
        return {"lambda_1": lagrangian.lambda_1.detach(), "lambda_2": lagrangian.lambda_2.detach()}

    def inherit(self, model: nn.Module) -> None:
        spec = self.cfg.inherit
        if spec is None:
            return
        try:
            source = create_open_clip_model(spec.model, spec=f"loss.inherit.model {spec.model}")
            load_checkpoint(source, spec.checkpoint, what=f"loss.inherit.checkpoint {spec.checkpoint}")
            inherit_weights(source, model)
        except (TeacherError, ValueError) as err:
            raise RecipeError(f"loss.inherit: {err}") from None

    def loss(self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: Teacher) -> dict[str, torch.Tensor]:
        outputs = student(image=batch["image"], text=batch["text"])  # MaskedCLIP adds a sparsity dict
        image, text = outputs[0], outputs[1]
        with torch.no_grad():
            t_image = teacher.image_embeddings(batch["image"], int(batch["epoch"][0]), batch["id"])
            t_text = teacher.text_embeddings(batch["text"], batch["id"])
        cfg = self.cfg
        affinity = affinity_loss(image, text, t_image, t_text, cfg.affinity_scale, cfg.gather_with_grad)
        losses = {"loss": affinity, "affinity": affinity}
        if cfg.alpha != 1.0:
            # At the fixed scale too: the reference's --logit-scale 50 fixes the student's scale as well.
            contrastive = clip_contrastive_loss(image, text, cfg.affinity_scale, cfg.gather_with_grad)
            losses |= {"loss": cfg.alpha * affinity + (1 - cfg.alpha) * contrastive, "contrastive": contrastive}
        if cfg.prune is not None:
            sparsity = outputs[-1]
            losses["loss"] = losses["loss"] + sparsity["penalty"]
            losses |= {
                "lagrangian": sparsity["penalty"].detach(),
                "sparsity_expected": sparsity["expected_sparsity"].detach(),
                "sparsity_target": sparsity["target_sparsity"],
            }
        return losses

    def finish(self, model: nn.Module, output_dir: Path) -> dict[str, Any]:
        """With loss.prune: the physically pruned model, as pruned_model.json + pruned_model.safetensors."""
        if self.cfg.prune is None:
            return {}
        pruned = model.pruned()
        spec = output_dir / "pruned_model.json"
        spec.write_text(json.dumps({"tokenizer": self.tokenizer_name, "pruned_cfg": pruned.pruned_cfg}, indent=2))
        save_weights(pruned, output_dir / "pruned_model.safetensors")
        with torch.no_grad():
            expected = float(model.masks.expected_sparsity())
        return {
            "pruned_params": sum(p.numel() for p in pruned.parameters()),
            "pruned_sparsity": model.masks.pruned_sparsity(),  # realised by the final-mask rule
            "expected_sparsity": expected,  # what the masks were trained to
            "pruned_model": str(spec),
            # tower sizes as the TinyCLIP names count them (image; text without the token embedding)
            "tower_params": list(tower_param_counts(model.model)),
            "pruned_tower_params": list(tower_param_counts(pruned)),
        }

    def result_student(self, output_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
        """With loss.prune the pruned model; otherwise the trained student."""
        if self.cfg.prune is None:
            return super().result_student(output_dir, summary)
        return {
            "model": str(output_dir / "pruned_model.json"),
            "kwargs": {},
            "checkpoint": str(output_dir / "pruned_model.safetensors"),
        }
