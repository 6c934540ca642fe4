"""TinyViT pretraining distillation: soft-target cross-entropy against the teacher's (sparse) distribution.

The teacher is a logit store or a live model; either way its distribution at temperature
T is softmax(teacher logits / T). TinyViT uses T = 1 and no label term (label_weight 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill.loader import mixed_targets
from distill.losses import soft_target_cross_entropy, soft_target_kd
from distill.method import Method, register_method
from teachers import Teacher


@dataclass
class TinyVitLoss:
    temperature: float = 1.0
    distill_weight: float = 1.0
    label_weight: float = 0.0


@register_method("tinyvit")
class TinyVit(Method):
    LossConfig = TinyVitLoss

    def loss(
        self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: Teacher | None
    ) -> dict[str, torch.Tensor]:
        logits = student(batch["image"])
        with torch.no_grad():
            teacher_logits = teacher.logits(batch["image"], int(batch["epoch"][0]), batch["id"])
        kd = soft_target_kd(logits, teacher_logits, self.cfg.temperature)
        parts = {"kd": kd}
        total = self.cfg.distill_weight * kd
        if self.cfg.label_weight:
            parts["label"] = soft_target_cross_entropy(logits, mixed_targets(batch, self.num_classes))
            total = total + self.cfg.label_weight * parts["label"]
        return {"loss": total} | parts
