"""TinyViT's loss: soft CE against softmax(teacher / T) x T^2, plus an optional label term."""

from __future__ import annotations

import torch
from torch import nn

from distill.losses import label_loss, soft_target_kd
from distill.method import Method
from teachers import Teacher


class TinyVit(Method):
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
            parts["label"] = label_loss(logits, batch, self.num_classes)  # the labelled images only
            total = total + self.cfg.label_weight * parts["label"]
        return {"loss": total} | parts
