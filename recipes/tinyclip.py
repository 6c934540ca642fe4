"""`tinyclip`: distils a CLIP teacher into a student by affinity mimicking (Wu et al., ICCV 2023).

Affinity mimicking: the student's image-to-text and text-to-image affinities inside the batch,
s I T^T and s T I^T at a fixed scale s, are trained toward the teacher's. The teacher's
embeddings come from a live open_clip model or from an embeddings store, whose stored
embeddings rebuild the teacher's affinities for any student batch size. An optional
contrastive term on the student's own features takes weight 1 - alpha.

The student is built as in `recipes.clip` (an open_clip config, e.g. TinyCLIP-ViT-8M-16-Text-3M,
or a pruned model's config JSON); `loss.inherit` initialises it from a bigger CLIP's weights
(manual inheritance: layers at a uniform stride, leading widths and heads). Validation is
zero-shot classification with class-name prompts.

`loss.prune` trains one stage of automatic inheritance: the student (usually the teacher itself, from its
checkpoint, or the previous stage's pruned model) gets hard-concrete masks over hidden dims, heads and MLP units
(`students.clip_pruning.MaskedCLIP`), and the loss adds the Lagrangian sparsity penalty, its target ramped
linearly from the masks' initial expected sparsity (~0) to `target_sparsity` over `ramp_steps` training
batches, then held. At the end (`finish`) the deterministic masks are applied and the model physically pruned
into `output_dir/pruned_model.json` + `pruned_model.safetensors`, a student for the next recipe (`student:
{model: OUT/pruned_model.json, checkpoint: OUT/pruned_model.safetensors}`); model.safetensors holds the masked
model (keys `model.*`, `masks.*`, `lagrangian.*`, `step`). Masks and multipliers train in the recipe's one
optimizer at its learning rate and schedule: the multipliers ascend through a reversed gradient, and both are
stored divided by `mask_lr_scale` / `lagrangian_lr_scale`, so that Adam moves them that many times faster
than the weights. `recipes.tinyclip_prune` chains stages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.affinity import affinity_loss, clip_contrastive_loss
from distill.method import register_method
from distill.recipe import RecipeError, StudentConfig
from distill.train import save_weights
from recipes.clip import MAX_LOGIT_SCALE, ClipMethod, ZeroShotConfig
from students.clip_inheritance import inherit_weights
from students.clip_pruning import TOWERS, CLIPPruningMasks, MaskedCLIP, SparsityLagrangian
from students.tinyclip import tower_param_counts
from teachers import TeacherError, load_checkpoint
from teachers.clip_teacher import EmbeddingTeacher, create_open_clip_model


@dataclass
class InheritConfig:
    model: str  # the open_clip config of the weights' source (usually the teacher)
    checkpoint: str


@dataclass
class PruneConfig:
    """One automatic-inheritance stage (see the module docstring)."""

    target_sparsity: float  # fraction of the masked towers' parameters (no token embedding) to remove
    ramp_steps: int  # training batches (micro-batches under grad_accum) of the ramp to the target (0: none)
    mask_lr_scale: float = 100.0  # masks learn this many times faster than the weights (Adam-type optimizers)
    lagrangian_lr_scale: float = 100.0  # the multipliers, likewise (100: 0.01 / step at lr 1e-4, as in CoFi)
    init_drop: float = 0.05  # the masks' initial drop rate (small: start from the inherited model)
    towers: list[str] = field(default_factory=lambda: list(TOWERS))


def check_prune(cfg: PruneConfig) -> None:
    if not 0 <= cfg.target_sparsity < 1:
        raise RecipeError(f"loss.prune.target_sparsity: expected a fraction in [0, 1), got {cfg.target_sparsity}")
    if cfg.ramp_steps < 0:
        raise RecipeError(f"loss.prune.ramp_steps: expected an integer >= 0, got {cfg.ramp_steps}")
    for name in ("mask_lr_scale", "lagrangian_lr_scale"):
        if not getattr(cfg, name) > 0:
            raise RecipeError(f"loss.prune.{name}: expected a number > 0, got {getattr(cfg, name)}")
    if not 0 < cfg.init_drop < 1:
        raise RecipeError(f"loss.prune.init_drop: expected a fraction in (0, 1), got {cfg.init_drop}")
    if not cfg.towers or len(set(cfg.towers)) != len(cfg.towers) or not set(cfg.towers) <= set(TOWERS):
        raise RecipeError(f"loss.prune.towers: expected distinct towers among {list(TOWERS)}, got {cfg.towers}")


@dataclass
class TinyClipLoss:
    alpha: float = 1.0  # affinity weight; the contrastive term gets 1 - alpha
    affinity_scale: float = 50.0
    gather_with_grad: bool = False
    inherit: InheritConfig | None = None
    prune: PruneConfig | None = None
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)


@register_method("tinyclip")
class TinyClip(ClipMethod):
    LossConfig = TinyClipLoss

    def __init__(self, loss: TinyClipLoss, num_classes: int) -> None:
        super().__init__(loss, num_classes)
        if loss.prune is not None:
            check_prune(loss.prune)

    def check_teacher(self, teacher: object) -> None:
        if not isinstance(teacher, EmbeddingTeacher):
            raise RecipeError(
                f"teacher.source: method tinyclip needs a CLIP teacher (open_clip:NAME, or store:PATH of an "
                f"embeddings store); {getattr(teacher, 'spec', teacher)} gives logits"
            )
        self.teacher_context = getattr(teacher, "context_length", None)

    def build_student(self, cfg: StudentConfig, img_size: int) -> nn.Module:
        model = super().build_student(cfg, img_size)
        live_context = getattr(self, "teacher_context", None)
        if live_context is not None and live_context != self.context_length:
            raise RecipeError(
                f"student.model: its context length {self.context_length} differs from the live teacher's "
                f"{live_context}; the teacher reads the student's caption tokens (a store has no such limit)"
            )
        spec = self.cfg.prune
        if spec is None:
            return model
        # The checkpoint is in the plain model by now; the masks start near 1 on top of it.
        try:
            masks = CLIPPruningMasks(model, spec.towers, init_drop=spec.init_drop, lr_scale=spec.mask_lr_scale)
        except ValueError as err:
            raise RecipeError(f"loss.prune.towers: {err}") from None
        with torch.no_grad():  # the ramp starts where the masks start, so the multipliers start at rest
            start = float(masks.expected_sparsity())
        lagrangian = SparsityLagrangian(spec.target_sparsity, spec.ramp_steps, start, spec.lagrangian_lr_scale)
        return MaskedCLIP(model, masks, lagrangian, getattr(model, "pruned_cfg", None) or cfg.model)

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

    def loss(
        self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: EmbeddingTeacher
    ) -> dict[str, torch.Tensor]:
        outputs = student(image=batch["image"], text=batch["text"])  # MaskedCLIP adds a sparsity dict
        image, text, scale = outputs[0], outputs[1], outputs[2].clamp(max=MAX_LOGIT_SCALE)
        with torch.no_grad():
            t_image = teacher.image_embeddings(batch["image"], int(batch["epoch"][0]), batch["id"])
            t_text = teacher.text_embeddings(batch["text"], batch["id"])
        cfg = self.cfg
        affinity = affinity_loss(image, text, t_image, t_text, cfg.affinity_scale, cfg.gather_with_grad)
        losses = {"loss": affinity, "affinity": affinity}
        if cfg.alpha != 1.0:
            contrastive = clip_contrastive_loss(image, text, scale, cfg.gather_with_grad)
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
        return {
            "pruned_params": sum(p.numel() for p in pruned.parameters()),
            "pruned_sparsity": model.masks.pruned_sparsity(),
            "pruned_model": str(spec),
            # (image, text without the token embedding) before and after: what the sparsity counts
            "tower_params": list(tower_param_counts(model.model)),
            "pruned_tower_params": list(tower_param_counts(pruned)),
        }
