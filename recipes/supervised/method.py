"""Cross-entropy against the (mixed, optionally smoothed) labels."""

from __future__ import annotations

import torch
from torch import nn

from distill.losses import mixed_targets, soft_target_cross_entropy
from distill.method import Method
from teachers import Teacher


class Supervised(Method):
    def loss(
        self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: Teacher | None
    ) -> dict[str, torch.Tensor]:
        targets = mixed_targets(batch, self.num_classes)
        eps = self.cfg.label_smoothing
        targets = targets * (1 - eps) + eps / self.num_classes
        return {"loss": soft_target_cross_entropy(student(batch["image"]), targets)}
