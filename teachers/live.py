"""Live teachers: a model run in eval and inference mode (bfloat16 autocast on CUDA); `ModelTeacher` gives logits."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .base import Teacher, TeacherError
from .checkpoint import file_sha256, load_checkpoint, state_dict_sha256

__all__ = ["LiveTeacher", "ModelTeacher", "infer_num_classes"]

DEFAULT_INPUT_SIZE = (3, 224, 224)


class LiveTeacher(Teacher):
    """A teacher that runs a model: the checkpoint (if any) is loaded strictly, the model put in eval mode on
    `device` and run in inference mode (bfloat16 autocast on CUDA). `weights_sha256` is the checkpoint file's
    sha256, or the state dict's when there is none."""

    def __init__(
        self,
        model: nn.Module,
        spec: str,
        checkpoint: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TeacherError(f"teacher {spec}: expected an nn.Module, got {type(model).__name__}")
        self.spec = spec
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        if checkpoint is not None:
            load_checkpoint(model, checkpoint, what=spec)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.weights_sha256 = (
            file_sha256(checkpoint) if checkpoint is not None else state_dict_sha256(self.model.state_dict())
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _run(self, forward: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
        """`forward` on `x` moved to the model's device, in inference mode and autocast."""
        with torch.inference_mode(), self._autocast():
            return forward(x.to(self.device, non_blocking=True))

    @staticmethod
    def _target(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # float32 on the input's device, cloned outside inference mode: an ordinary tensor autograd may save.
        return out.to(device=like.device, dtype=torch.float32).clone()

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, device={self.device})"


class ModelTeacher(LiveTeacher):
    """A live teacher around an `nn.Module` that maps [B, ...] images to [B, num_classes] logits.

    `num_classes` is taken from `model.num_classes`, or from one forward pass when the model has no
    such attribute; a given `num_classes` must agree with it. With `class_indices` the teacher answers
    only those columns of the model's logits, in that order (a pretrained head mapped onto the data's classes).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: str,
        num_classes: int | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        class_indices: list[int] | None = None,
    ) -> None:
        super().__init__(model, spec, checkpoint, device)
        self.class_indices = class_indices
        if class_indices is None:
            self.num_classes = self._resolve_num_classes(num_classes)
        else:
            self.num_classes = len(class_indices)
            self._columns = torch.tensor(class_indices, device=self.device)

    def describe(self) -> dict[str, Any]:
        mapped = {"class_indices": self.class_indices} if self.class_indices is not None else {}
        return super().describe() | mapped

    def _resolve_num_classes(self, asked: int | None) -> int:
        found = getattr(self.model, "num_classes", None)
        if not (isinstance(found, int) and not isinstance(found, bool) and found > 0):
            found = None
        if found is None:
            try:  # one forward pass; when num_classes is given, a failure here leaves the check to logits()
                found = infer_num_classes(self.model, self.device, self._autocast, what=self.spec)
            except TeacherError:
                if asked is None:
                    raise
        if asked is not None and found is not None and asked != found:
            raise TeacherError(f"teacher {self.spec} has {found} classes, but num_classes={asked} was asked for")
        return int(asked if asked is not None else found)

    def logits(self, images: torch.Tensor, epoch: int | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the model on `images` (epoch and ids are ignored); float32 [B, num_classes] on the images' device."""
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise TeacherError(f"teacher {self.spec}: images must be a floating-point tensor, got {kind}")
        out = self._run(self.model, images)
        if not isinstance(out, torch.Tensor):
            raise TeacherError(f"teacher {self.spec}: the model returned a {type(out).__name__}, expected a tensor")
        if self.class_indices is not None:
            out = out.index_select(1, self._columns)
        if out.shape != (images.shape[0], self.num_classes):
            raise TeacherError(
                f"teacher {self.spec}: the model returned shape {list(out.shape)}, "
                f"expected [{images.shape[0]}, {self.num_classes}] ([batch, num_classes])"
            )
        return self._target(out, images)


def infer_num_classes(
    model: nn.Module,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    what: str = "the model",
) -> int:
    """The width of the model's output on one zero image of its default input size (timm's cfg, else 3x224x224)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = tuple(cfg.get("input_size") or DEFAULT_INPUT_SIZE)
    context = autocast() if autocast is not None else contextlib.nullcontext()
    try:
        with torch.inference_mode(), context:
            out = model(torch.zeros(1, *size, device=device))
    except Exception as err:
        raise TeacherError(
            f"cannot infer num_classes of {what}: it has no 'num_classes' attribute and a forward pass on "
            f"[1, {', '.join(map(str, size))}] failed ({err}); pass num_classes explicitly"
        ) from err
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TeacherError(f"cannot infer num_classes of {what}: its output is {shape}, expected [batch, num_classes]")
    return int(out.shape[1])
