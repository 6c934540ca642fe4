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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from distill.affinity import affinity_loss, clip_contrastive_loss
from distill.method import register_method
from distill.recipe import RecipeError, StudentConfig
from recipes.clip import ClipMethod, ZeroShotConfig
from students.clip_inheritance import inherit_weights
from teachers import TeacherError, load_checkpoint
from teachers.clip_teacher import EmbeddingTeacher, create_open_clip_model


@dataclass
class InheritConfig:
    model: str  # the open_clip config of the weights' source (usually the teacher)
    checkpoint: str


@dataclass
class TinyClipLoss:
    alpha: float = 1.0  # affinity weight; the contrastive term gets 1 - alpha
    affinity_scale: float = 50.0
    gather_with_grad: bool = False
    inherit: InheritConfig | None = None
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)


@register_method("tinyclip")
class TinyClip(ClipMethod):
    LossConfig = TinyClipLoss

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
        return model

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
        image, text, scale = self.features(student, batch)
        with torch.no_grad():
            t_image = teacher.image_embeddings(batch["image"], int(batch["epoch"][0]), batch["id"])
            t_text = teacher.text_embeddings(batch["text"], batch["id"])
        cfg = self.cfg
        affinity = affinity_loss(image, text, t_image, t_text, cfg.affinity_scale, cfg.gather_with_grad)
        if cfg.alpha == 1.0:
            return {"loss": affinity, "affinity": affinity}
        contrastive = clip_contrastive_loss(image, text, scale, cfg.gather_with_grad)
        total = cfg.alpha * affinity + (1 - cfg.alpha) * contrastive
        return {"loss": total, "affinity": affinity, "contrastive": contrastive}
