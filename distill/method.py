"""The method interface: what a method in `recipes/` gives the trainer.

A method builds its student and turns a batch into losses; the trainer owns everything else
(data, devices, optimizer, checkpoints), so it never asks which method it runs, and a method
never asks whether its teacher is live or a store. Hooks with a default may be left alone:

    build_student   the student module (default: a timm model by name, optionally from a checkpoint)
    check_run       refuse, before anything runs, a run the method cannot do (processes, views)
    check_teacher   refuse, before anything runs, a teacher the loss cannot use
    training_ids    the sample ids the run trains on (default: all)
    optimized_module  the part of the student the trainer's optimizer trains (default: all of it)
    setup           once the run's accelerator, model and optimizer exist
    state_dict      what it carries between steps, checkpointed with the run (and load_state_dict)
    loss            the losses of one batch: "loss" is backpropagated, the others are logged
    after_step      after each optimizer step; returns values to log
    evaluate        validation metrics, top1/top5 among them
    finish          on the main process with the final model; entries for the summary
    result_student  the student a follow-up run (`then`) starts from
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import timm
import torch
from accelerate import Accelerator
from torch import nn

import students  # noqa: F401  (registers the toolkit's students with timm)
from logit_store.registry import import_path
from teachers import Teacher
from teachers.checkpoint import load_checkpoint

from .augment import AugRecipe
from .data import ImageDataset
from .errors import RecipeError
from .evaluate import classification_accuracy
from .loader import ReplayDataset
from .recipe import MethodSpec, Recipe, StudentConfig, method_config, to_dict

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["Method", "create_method"]


class Method:
    """Base class of a method (see the module docstring); `self.cfg` is the recipe's parsed `loss` section.

    A method that trains on captions sets `tokenizer` in `build_student`; the trainer then adds each
    sample's caption tokens to the batch as "text".
    """

    tokenizer: Callable[[list[str]], torch.Tensor] | None = None

    def __init__(self, recipe: Recipe, spec: MethodSpec, cfg: Any, num_classes: int) -> None:
        self.recipe, self.spec, self.cfg, self.num_classes = recipe, spec, cfg, num_classes

    def build_student(self, cfg: StudentConfig, img_size: int) -> nn.Module:
        """A timm model by name (any registered one, at any input size), optionally from a checkpoint."""
        kwargs = {"num_classes": self.num_classes} | cfg.kwargs
        try:
            model = timm.create_model(cfg.model, **kwargs)
        except RuntimeError as err:  # timm's "Unknown model"
            close = difflib.get_close_matches(cfg.model, timm.list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; see timm.list_models()"
            raise RecipeError(f"student.model: {err}{hint}") from None
        except (TypeError, ValueError) as err:  # a model's own refusal of its keyword arguments
            raise RecipeError(f"student.kwargs: {cfg.model}: {err}") from None
        found = getattr(model, "num_classes", self.num_classes)
        if found != self.num_classes:
            raise RecipeError(
                f"student.kwargs.num_classes: {cfg.model} would output {found} classes, "
                f"but data.train (and so its teacher) has {self.num_classes}"
            )
        if cfg.checkpoint:
            load_checkpoint(model, cfg.checkpoint, what=f"student.model {cfg.model}")
        return model

    def check_run(self, num_processes: int, augmentation: AugRecipe) -> None:
        """Refuse, before anything runs, a run this method cannot do: on this many processes, with these views."""

    def check_teacher(self, teacher: Teacher | None) -> None:
        """Refuse, before training, a teacher this method's loss cannot use (e.g. a store for feature losses)."""

    def training_ids(self, train_set: ImageDataset, val_set: ImageDataset) -> np.ndarray:
        """The ids of data.train the run trains on, in id order."""
        return np.arange(len(train_set))

    def optimized_module(self, student: nn.Module) -> nn.Module:
        """The module whose parameters the trainer's optimizer and schedule train: the whole student by default.

        A method that trains some parameters with an optimizer of its own (built in `setup`, stepped in
        `after_step`) returns the submodule holding the others; its own still get their gradients, are clipped
        with the rest, averaged across processes and checkpointed with the model.
        """
        return student

    def setup(self, trainer: Trainer) -> None:
        """Called once the run's accelerator, model, optimizer and scheduler exist, before a resume is loaded."""

    def loss(
        self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: Teacher | None
    ) -> dict[str, torch.Tensor]:
        """Losses of one batch: `loss` (what is backpropagated) and any named parts to log."""
        raise NotImplementedError

    def after_step(self, student: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Called after each optimizer step; values to log with the losses."""
        return {}

    def evaluate(
        self, model: nn.Module, data: ReplayDataset, batch_size: int, accelerator: Accelerator
    ) -> dict[str, float]:
        """Validation metrics, `top1` and `top5` (%) among them: the student's classification accuracy."""
        return classification_accuracy(model, data, batch_size, accelerator)

    def finish(self, model: nn.Module, output_dir: Path) -> dict[str, Any]:
        """Called once on the main process with the final model after training; entries for the summary."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What the method carries between steps beyond the student (checkpointed with the run): tensors and
        plain data only, since checkpoints are read back with weights_only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` on resume."""

    def result_student(self, output_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
        """The student a follow-up run starts from: this run's model with its trained weights."""
        return to_dict(self.recipe.student) | {"checkpoint": str(output_dir / "model.safetensors")}


def create_method(recipe: Recipe, num_classes: int) -> Method:
    """The recipe's method, with its loss section validated: its class is imported here, not before."""
    spec, cfg = method_config(recipe)
    return import_path(spec.method)(recipe, spec, cfg, num_classes)
