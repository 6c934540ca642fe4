"""The method interface: what a method in `recipes/` gives the trainer.

A method builds its student and turns a batch into losses; the trainer owns everything else
(data, devices, optimizer, checkpoints), so it never asks which method it runs, and a method
never asks whether its teacher is live or a store. Hooks with a default may be left alone.
They are called in this order (each at most once unless said; `tests/test_method_contract.py`
records a run and checks it), every hook given what it needs as arguments:

    the plan (`distill.plan.make_plan`), before anything is written:
      check_run(num_processes, augmentation)   refuse a run the method cannot do (processes, views)
      check_teacher(teacher)                   refuse a teacher the loss cannot use (None: no teacher)
      training_ids(train_set, val_set)         the sample ids the run trains on (default: all)
      build_student(cfg, img_size, teacher)    the student module (default: a timm model by name)
    the run (`distill.trainer.Trainer`), in every process:
      optimized_module(student)                the part of the student the trainer's optimizer trains
      setup(context)                           once the run's model and optimizer exist (`MethodContext`)
      load_state_dict(state)                   a resumed run only: what `state_dict` returned
      per optimizer step: loss(student, batch, teacher) once per micro-batch, then after_step(student, batch)
      evaluate(model, data, batch_size, accelerator)   at the end of each epoch that evaluates
      state_dict()                             at every checkpoint (after the evaluation at an epoch's end)
    the end, on the main process:
      finish(model, output_dir)                entries for the summary
      result_student(output_dir, summary)      the student a follow-up run (`then`) starts from

What a hook learns of the run comes in its arguments or the `MethodContext` of `setup`, never from
an earlier hook's side effect. A method may keep what it derives of its own student in
`build_student` (`tokenizer`, a config): `distill-eval` calls `build_student` then `evaluate`.
docs/methods/README.md holds the contract with a complete minimal method.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from accelerate import Accelerator
from torch import nn

import students  # noqa: F401  (registers the toolkit's students with timm)
from logit_store.registry import import_path
from teachers import Teacher
from teachers.checkpoint import load_checkpoint

from .augment import Augmentation
from .data import ImageDataset
from .errors import RecipeError
from .evaluate import classification_accuracy
from .loader import ReplayDataset
from .recipe import MethodSpec, Recipe, StudentConfig, method_config, to_dict

__all__ = ["Method", "MethodContext", "create_method"]


@dataclass(frozen=True)
class MethodContext:
    """What a method may use of its run, handed to `setup` once the model and optimizer exist; nothing else of
    the trainer is a method's to touch. The trainer owns the loop, the schedule, EMA and checkpoints: a method's
    own state goes into checkpoints through `state_dict`.

    accelerator   the run's Accelerator (device, process index, mixed precision, unwrap_model)
    model         the prepared student as `loss` receives it (wrapped in several processes)
    param_groups  the trainer's optimizer's parameter groups as they are now (the schedule sets their "lr" every
                  step; a resume replaces the list, so it is asked for each time, not kept)
    teacher       the run's teacher (None: none), as `loss` receives it
    train_data    data.train's views: `train_data[(view_epoch(epoch), id)]`; `train_data.images` is data.train
    train_ids     the ids the run trains on (what `training_ids` returned)
    val_data      data.val's evaluation views (`val_data.augment` is the evaluation transform)
    view_epoch    the epoch of views (and stored teacher outputs) that training epoch `epoch` replays
    global_step   optimizer steps done so far: in `loss` the step being computed is global_step() + 1, in
                  `after_step` it counts the step just taken
    epoch         the training epoch under way (from 0)
    log           a line for the run's log (printed and in train.log, main process)
    """

    accelerator: Accelerator
    model: nn.Module
    param_groups: Callable[[], list[dict[str, Any]]]
    teacher: Teacher | None
    train_data: ReplayDataset
    train_ids: np.ndarray
    val_data: ReplayDataset
    view_epoch: Callable[[int], int]
    global_step: Callable[[], int]
    epoch: Callable[[], int]
    log: Callable[[str], None]


class Method:
    """Base class of a method: its hooks and their order are in the module docstring; `self.cfg` is the recipe's
    parsed `loss` section, `self.recipe` the whole recipe, `self.num_classes` the classes the student outputs.

    A method that trains on captions sets `tokenizer` in `build_student`; the trainer then adds each
    sample's caption tokens to the batch as "text".
    """

    tokenizer: Callable[[list[str]], torch.Tensor] | None = None

    def __init__(self, recipe: Recipe, spec: MethodSpec, cfg: Any, num_classes: int) -> None:
        self.recipe, self.spec, self.cfg, self.num_classes = recipe, spec, cfg, num_classes

    def build_student(self, cfg: StudentConfig, img_size: int, teacher: Teacher | None) -> nn.Module:
        """A timm model by name (any registered one, at any input size), optionally from a checkpoint. `teacher`
        is the checked teacher of the run (None without one, and in `distill-eval`), for checks of the pair.

        A model whose constructor takes `img_size` (ViT, DeiT, Swin, ...) and is built for another size than the
        data's is built at `img_size` (as timm's train.py passes its --img-size), unless student.kwargs sets it or
        the model takes any size already (`dynamic_img_size`).
        A checkpoint whose classifier has another class count (a pretrained 1000-class head) loads all but that
        classifier, which stays newly initialised, and a warning says so (see `load_checkpoint`)."""
        kwargs = {"num_classes": self.num_classes} | cfg.kwargs
        model = self._create(cfg, kwargs)
        if "img_size" not in kwargs and _takes_img_size(model) and not getattr(model, "dynamic_img_size", False):
            built = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", ())[-2:])
            if built != (img_size, img_size):  # (timm resamples pretrained position embeddings to it)
                model = self._create(cfg, kwargs | {"img_size": img_size})
        found = getattr(model, "num_classes", self.num_classes)
        if found != self.num_classes:
            raise RecipeError(
                f"student.kwargs.num_classes: {cfg.model} would output {found} classes, "
                f"but data.train (and so its teacher) has {self.num_classes}"
            )
        if cfg.checkpoint:
            note = load_checkpoint(model, cfg.checkpoint, what=f"student.model {cfg.model}", new_head=True)
            if note:
                logging.getLogger(__name__).warning("student.checkpoint: %s", note)
        return model

    @staticmethod
    def _create(cfg: StudentConfig, kwargs: dict[str, Any]) -> nn.Module:
        """`timm.create_model(cfg.model, **kwargs)`; its refusals as RecipeErrors naming the key."""
        try:
            return timm.create_model(cfg.model, **kwargs)
        except RuntimeError as err:  # timm's "Unknown model", or its pretrained weights that would not load
            if "unknown model" not in str(err).lower():
                raise RecipeError(f"student.kwargs: {cfg.model}: {err}") from None
            close = difflib.get_close_matches(cfg.model, timm.list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; see timm.list_models()"
            raise RecipeError(f"student.model: {err}{hint}") from None
        except (TypeError, ValueError) as err:  # a model's own refusal of its keyword arguments
            raise RecipeError(f"student.kwargs: {cfg.model}: {err}") from None

    def check_run(self, num_processes: int, augmentation: Augmentation) -> None:
        """Refuse, before anything runs, a run this method cannot do: on this many processes, with these views."""

    def check_teacher(self, teacher: Teacher | None) -> None:
        """Refuse, before training, a teacher this method's loss cannot use (e.g. a store for feature losses);
        None when the recipe has no teacher."""

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

    def setup(self, context: MethodContext) -> None:
        """Called once the run's accelerator, model, optimizer and scheduler exist, before a resume is loaded
        (`load_state_dict`): build what the method carries (its own optimizer, held-out batches); keep `context`
        to read the run's progress later."""

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


def _takes_img_size(model: nn.Module) -> bool:
    """Whether the model's class names `img_size` among its constructor's parameters (timm's ViTs, Swins...)."""
    try:
        return "img_size" in inspect.signature(type(model)).parameters
    except (TypeError, ValueError):  # a class without a signature to read
        return False


def create_method(recipe: Recipe, num_classes: int) -> Method:
    """The recipe's method, with its loss section validated: its class is imported here, not before."""
    spec, cfg = method_config(recipe)
    return import_path(spec.method)(recipe, spec, cfg, num_classes)
