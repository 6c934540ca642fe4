"""The KD method: `loss.kd` on the teacher's distribution at temperature T, plus an optional label term."""

from __future__ import annotations

import torch
from torch import nn

from distill.losses import dist_loss, dkd_loss, label_loss, nkd_loss, soft_target_kd, target_classes
from distill.method import Method
from teachers import Teacher


class TinyVit(Method):
    def loss(
        self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: Teacher | None
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        logits = student(batch["image"])
        with torch.no_grad():
            teacher_logits = teacher.logits(batch["image"], int(batch["epoch"][0]), batch["id"])
        kd = self.kd(logits, teacher_logits, batch)
        parts = {"kd": kd}
        total = cfg.distill_weight * kd
        if cfg.label_weight:
            parts["label"] = label_loss(logits, batch, self.num_classes)  # the labelled images only
            total = total + cfg.label_weight * parts["label"]
        return {"loss": total} | parts

    def kd(self, logits: torch.Tensor, teacher_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg, temperature = self.cfg, self.cfg.temperature
        if cfg.kd == "nkd":
            target = target_classes(batch, teacher_logits)
            return nkd_loss(logits, teacher_logits, target, temperature, cfg.nkd.gamma)
        if cfg.kd == "dkd":
            target = target_classes(batch, teacher_logits)
            return dkd_loss(logits, teacher_logits, target, temperature, cfg.dkd.alpha, cfg.dkd.beta)
        if cfg.kd == "dist":
            return dist_loss(logits, teacher_logits, temperature, cfg.dist.beta, cfg.dist.gamma)
        return soft_target_kd(logits, teacher_logits, temperature)
