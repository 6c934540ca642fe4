"""Cross-entropy against the (mixed, optionally smoothed) labels of the labelled images."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from distill.data import ImageDataset
from distill.errors import RecipeError
from distill.losses import label_loss
from distill.method import Method
from teachers import Teacher


class Supervised(Method):
    def training_ids(self, train_set: ImageDataset, val_set: ImageDataset) -> np.ndarray:
        """The labelled images: a label-only run learns nothing from the others."""
        ids = np.flatnonzero(train_set.labels >= 0)
        if not len(ids):
            raise RecipeError(f"data.train: method 'supervised' trains on labels; {train_set.spec} has none")
        return ids

    def loss(
        self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: Teacher | None
    ) -> dict[str, torch.Tensor]:
        return {"loss": label_loss(student(batch["image"]), batch, self.num_classes, self.cfg.label_smoothing)}
