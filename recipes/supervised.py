"""Plain supervised training (no teacher): cross-entropy on the (mixed) labels, e.g. to train a teacher."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill.loader import mixed_targets
from distill.losses import soft_target_cross_entropy
from distill.method import Method, register_method
from teachers import Teacher


@dataclass
class SupervisedLoss:
    label_smoothing: float = 0.0


@register_method("supervised")
class Supervised(Method):
    LossConfig = SupervisedLoss
    needs_teacher = False

    def loss(
        self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: Teacher | None
    ) -> dict[str, torch.Tensor]:
        targets = mixed_targets(batch, self.num_classes)
        eps = self.cfg.label_smoothing
        targets = targets * (1 - eps) + eps / self.num_classes
        return {"loss": soft_target_cross_entropy(student(batch["image"]), targets)}
