"""The method interface: what a recipe module in `recipes/` gives the trainer.

A method names its loss configuration, builds its student, and turns a batch into
losses. The trainer owns everything else (data, devices, optimizer, checkpoints), so it
never asks which method it runs; a method never asks whether its teacher is live or a store.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import timm
import torch
from accelerate import Accelerator
from torch import nn

import students  # noqa: F401  (registers the toolkit's students with timm and open_clip)
from teachers import Teacher
from teachers.checkpoint import load_checkpoint

from .evaluate import classification_accuracy
from .loader import ReplayDataset
from .recipe import RecipeError, StudentConfig, parse_section

__all__ = ["Method", "create_method", "get_method", "register_method"]

_METHODS: dict[str, type[Method]] = {}


@dataclass
class NoLossConfig:
    pass


class Method:
    """Base class of a distillation method; subclasses set `LossConfig` and implement `loss`.

    A method that trains on captions sets `tokenizer` in `build_student`; the trainer then
    adds each sample's caption tokens to the batch as "text".
    """

    LossConfig: ClassVar[type] = NoLossConfig
    needs_teacher: ClassVar[bool] = True
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None

    def __init__(self, loss: Any, num_classes: int) -> None:
        self.cfg, self.num_classes = loss, num_classes

    def build_student(self, cfg: StudentConfig, img_size: int) -> nn.Module:
        """A timm model by name (any registered one, at any input size), optionally from a checkpoint."""
        kwargs = {"num_classes": self.num_classes} | cfg.kwargs
        try:
            model = timm.create_model(cfg.model, **kwargs)
        except RuntimeError as err:  # timm's "Unknown model"
            raise RecipeError(f"student.model: {err}") from None
        if cfg.checkpoint:
            load_checkpoint(model, cfg.checkpoint)
        return model

    def check_teacher(self, teacher: Teacher | None) -> None:
        """Refuse, before training, a teacher this method's loss cannot use (e.g. a store for feature losses)."""

    def loss(
        self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: Teacher | None
    ) -> dict[str, torch.Tensor]:
        """Losses of one batch: `loss` (what is backpropagated) and any named parts to log."""
        raise NotImplementedError

    def finish(self, model: nn.Module, output_dir: Path) -> dict[str, Any]:
        """Called once on the main process with the final model after training; entries for the summary."""
        return {}

    def evaluate(
        self, model: nn.Module, data: ReplayDataset, batch_size: int, accelerator: Accelerator
    ) -> dict[str, float]:
        """Validation metrics, `top1` and `top5` (%) among them: the student's classification accuracy."""
        return classification_accuracy(model, data, batch_size, accelerator)


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def add(cls: type[Method]) -> type[Method]:
        _METHODS[name] = cls
        return cls

    return add


def create_method(name: str, loss: dict[str, Any], num_classes: int) -> Method:
    """The method `name` with its loss section validated."""
    cls = get_method(name)
    return cls(parse_section(cls.LossConfig, loss, "loss"), num_classes)


def get_method(name: str) -> type[Method]:
    """The method class `name`: from a module in `recipes/`, or a dotted module path, imported on demand."""
    if name not in _METHODS:
        module = name if "." in name else f"recipes.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name not in (module, *_parents(module)):
                raise
            raise RecipeError(
                f"method: no module {module!r}; known methods: {sorted(_METHODS) or 'none loaded'}"
            ) from None
    if name not in _METHODS:
        raise RecipeError(f"method: module for {name!r} registers no method named {name!r}")
    return _METHODS[name]


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]
