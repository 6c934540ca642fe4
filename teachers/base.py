"""The teacher interface: logits for a batch of augmented images, and an identity for the store manifest."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

__all__ = ["Teacher", "TeacherError"]


class TeacherError(ValueError):
    """A teacher that cannot be built or cannot answer; the message names the spec, file or key at fault."""


class Teacher(ABC):
    """A source of teacher logits.

    Live teachers run a model; a `StoreTeacher` answers from a logit store by (epoch, ids).
    Logits come back as float32 [B, num_classes] on the images' device, as plain tensors
    (not inference tensors), so they can be used as targets in a loss that is backpropagated.
    """

    spec: str
    num_classes: int
    weights_sha256: str | None = None

    @abstractmethod
    def logits(self, images: torch.Tensor, epoch: int | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, num_classes] float32 logits for a batch of (already augmented) images."""

    def describe(self) -> dict[str, Any]:
        """The teacher entry of a store manifest: spec, weights_sha256 and num_classes."""
        return {"spec": self.spec, "weights_sha256": self.weights_sha256, "num_classes": self.num_classes}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, num_classes={self.num_classes})"
