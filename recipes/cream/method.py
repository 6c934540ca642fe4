"""The Cream method on the trainer's hooks (see `recipes.cream`): a path per step, the board, meta updates,
and at the end the pick within the FLOPs budget, exported for the retraining."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from distill.augment import Augmentation
from distill.checkpoint import save_weights
from distill.data import ImageDataset
from distill.errors import RecipeError
from distill.evaluate import classification_accuracy
from distill.loader import ReplayDataset, collate
from distill.losses import soft_target_kd
from distill.method import Method, MethodContext
from distill.recipe import StudentConfig
from students.supernet import SKIP, Supernet, SupernetConfig, path_flops, sample_path
from teachers import Teacher

from . import REFERENCE_PRIOR
from .board import (
    BoardEntry,
    MetaMatchingNetwork,
    PrioritizedBoard,
    eval_logits,
    kd_weight,
    meta_update,
    prioritized_loss,
    select_teacher,
    update_board,
)
from .export import board_rows, config_dict, export_path, format_board

__all__ = ["Cream", "SearchState"]

PathKey = tuple[int, ...]


class Cream(Method):
    """Prioritized-path training of a `cream_supernet` student (see `recipes.cream`)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        cfg, recipe = self.cfg, self.recipe
        if cfg.board_start_epoch >= recipe.epochs:
            raise RecipeError(
                f"loss.board_start_epoch: expected 0 .. {recipe.epochs - 1} (epochs of plain CE before the board; "
                f"the default 21 is the reference's, for 120 epochs), got {cfg.board_start_epoch}"
            )
        if recipe.grad_accum != 1:
            raise RecipeError("grad_accum: the search samples one path per optimizer step; set batch_size instead")
        if recipe.mixed_precision not in (None, "no"):
            raise RecipeError(
                "mixed_precision: the search runs in float32 (the meta update differentiates an SGD step)"
            )

    # ---- the plan ------------------------------------------------------------------------------------------

    def check_run(self, num_processes: int, augmentation: Augmentation) -> None:
        if num_processes > 1:
            raise RecipeError("the Cream search runs on one process: start it without accelerate launch / torchrun")
        if augmentation.mixing:
            raise RecipeError("augmentation: the search trains on hard labels; mixup/cutmix are not supported")

    def build_student(self, cfg: StudentConfig, img_size: int, teacher: Teacher | None) -> nn.Module:
        model = super().build_student(cfg, img_size, teacher)
        if not isinstance(model, Supernet):
            raise RecipeError(f"student.model: method cream trains a supernet (cream_supernet), not {cfg.model}")
        self._sampling_weights(model.config)  # refused before anything runs
        return model

    def _sampling_weights(self, config: SupernetConfig) -> torch.Tensor | None:
        """The per-layer draw of a path: None (uniform), or one weight per choice (and one for skipping)."""
        cfg = self.cfg
        if cfg.sampling == "uniform":
            return None
        names = ", ".join(f"k{k}e{e:g}" for k, e in config.choices)
        weights = cfg.choice_weights
        if weights is None and config.num_choices != len(REFERENCE_PRIOR):
            raise RecipeError(
                f"loss.choice_weights: this supernet has {config.num_choices} choices ({names}): give one weight each"
            )
        weights = list(REFERENCE_PRIOR if weights is None else weights)
        if len(weights) != config.num_choices or min(weights) < 0 or not sum(weights):
            raise RecipeError(
                f"loss.choice_weights: expected {config.num_choices} weights >= 0, one per choice ({names})"
            )
        return torch.tensor(weights + ([cfg.skip_weight] if cfg.skip_weight else []), dtype=torch.float64)

    def training_ids(self, train_set: ImageDataset, val_set: ImageDataset) -> np.ndarray:
        """All of data.train, or (heldout: train) all but every heldout_every-th id, held out for scores."""
        train_ids, _, heldout_ids = self.split(train_set, val_set)
        available = min(self.cfg.heldout_batch_size, len(heldout_ids))
        if self.cfg.meta_input == "slice" and self.cfg.meta_slice > available:
            raise RecipeError(f"loss.meta_slice: {self.cfg.meta_slice} images, but the held-out batch has {available}")
        return train_ids

    def split(self, train_set: ImageDataset, val_set: ImageDataset) -> tuple[np.ndarray, ImageDataset, np.ndarray]:
        """(training ids, held-out dataset, held-out ids): disjoint, a function of the data and `loss` alone."""
        ids = np.arange(len(train_set))
        if self.cfg.heldout == "val":
            return ids, val_set, np.arange(len(val_set))
        held = ids % self.cfg.heldout_every == 0
        return ids[~held], train_set, ids[held]

    # ---- the run -------------------------------------------------------------------------------------------

    def setup(self, context: MethodContext) -> None:
        """The supernet's path sampler, the held-out batches, the board, the meta network and its optimizer
        (checkpointed: `state_dict`)."""
        cfg, acc = self.cfg, context.accelerator
        if acc.mixed_precision != "no":  # the launcher's: the recipe said nothing
            raise RecipeError("mixed_precision: the search runs in float32; set mixed_precision: 'no' in the recipe")
        self.context, self.device = context, acc.device
        self.config, self.img_size = acc.unwrap_model(context.model).config, self.recipe.data.img_size
        self.weights = self._sampling_weights(self.config)
        self.heldout_set, self.heldout_ids = self.split(context.train_data.images, context.val_data.images)[1:]
        # Held-out images are seen as validation images are: the recipe's evaluation transform.
        self.heldout_data = ReplayDataset(self.heldout_set, context.val_data.augment)
        self.heldout_size = min(cfg.heldout_batch_size, len(self.heldout_ids))
        slice_size = cfg.meta_slice if cfg.meta_input == "slice" else None  # (checked by training_ids)
        chosen = np.sort(
            np.random.default_rng([self.recipe.seed, 1]).permutation(self.heldout_ids)[: self.heldout_size]
        )
        self.heldout = self._batch(chosen)  # the board's batch: every entry's score and outputs are on it
        self.meta = MetaMatchingNetwork(self.num_classes, cfg.meta_hidden, slice_size).to(self.device)
        self.meta_images = self.heldout[0][: self.meta.batch_needed]  # the meta network's share of it
        self.meta_optimizer = torch.optim.Adam(self.meta.parameters(), lr=cfg.meta_lr)
        board = PrioritizedBoard(cfg.board_size, _flops(cfg.board_flops_limit), cfg.admission_margin / 100)
        self.search = SearchState(self.recipe.seed, board)

    def state_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "search": self.search.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.meta.load_state_dict(state["meta"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.search.load_state_dict(state["search"])

    def loss(self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: Teacher | None) -> dict[str, Any]:
        """Sample this step's path; with the board on, a meta update every few steps and the prioritized loss."""
        cfg, search, images, labels = self.cfg, self.search, batch["image"], batch["label"]
        self.path = sample_path(self.config, search.generator, self.weights)
        prioritized = self.board_on and len(search.board) > 0
        logs: dict[str, Any] = {}
        if prioritized and self.context.global_step() % cfg.meta_update_every == 0:
            # Before the real step, on its batch: this step's m already follows the updated meta network.
            result = meta_update(
                self.meta, student, self.path, (images, labels), self._heldout_batch(search.meta_updates),
                search.board, self.meta_images, lr=self.context.param_groups()[0]["lr"],
                meta_optimizer=self.meta_optimizer,
                loss_fn=partial(prioritized_loss, label_smoothing=cfg.label_smoothing),
            )  # fmt: skip
            search.meta_updates += 1
            logs["meta_heldout_loss"] = result.heldout_loss
        logits = student(images, self.path)
        if prioritized:
            entry, m = self.choose_teacher(student, self.path)
            with torch.no_grad():
                teacher_logits = student(images, entry.path)
            loss = prioritized_loss(logits, teacher_logits, labels, m, cfg.label_smoothing)
            logs["m"] = m
        else:
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        if teacher is not None:
            with torch.no_grad():
                stored = teacher.logits(images, int(batch["epoch"][0]), batch["id"])
            logs["store_kd"] = soft_target_kd(logits, stored, cfg.kd_temperature)
            loss = loss + cfg.kd_weight * logs["store_kd"]
        return {"loss": loss, **logs}

    def after_step(self, student: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Offer the step's path to the board by its held-out score (the training batch was just fit: it flatters)."""
        if not self.board_on:
            return {}
        board = self.search.board
        admitted = update_board(board, student, self.path, self.heldout, self.flops(self.path))
        return {"admitted": float(admitted), "board_size": float(len(board))}

    @property
    def board_on(self) -> bool:
        return self.context.epoch() >= self.cfg.board_start_epoch

    def choose_teacher(self, student: nn.Module, path: PathKey) -> tuple[BoardEntry, torch.Tensor]:
        """The best-matching board entry and its m = sigmoid(-score), detached: m only weighs the student's loss.
        The student's outputs on the meta images are taken in eval mode, as the board's entries were."""
        entry, score = select_teacher(self.meta, eval_logits(student, self.meta_images, path), self.search.board)
        return entry, kd_weight(score).detach()

    def flops(self, path: Sequence[int]) -> int:
        return path_flops(self.config, path, self.img_size, self.num_classes)

    def _batch(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate([self.heldout_data[(0, int(i))] for i in ids])
        return batch["image"].to(self.device), batch["label"].to(self.device)

    def _heldout_batch(self, update: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out batch of meta update number `update`: passes over the held-out ids, each reshuffled."""
        size = self.heldout_size
        per_round = len(self.heldout_ids) // size
        round_, index = divmod(update, per_round)
        order = np.random.default_rng([self.recipe.seed, 2, round_]).permutation(self.heldout_ids)
        return self._batch(order[index * size : (index + 1) * size])

    def evaluate(
        self, model: nn.Module, data: ReplayDataset, batch_size: int, accelerator: Accelerator
    ) -> dict[str, float]:
        """The board's best path (the first choice of every layer while the board is empty) on data.val."""
        supernet = accelerator.unwrap_model(model)
        best = self.search.board.best()
        path = best.path if best else (0,) * self.config.num_layers
        metrics = classification_accuracy(_OnePath(supernet, path), data, batch_size, accelerator)
        return metrics | {"board_size": float(len(self.search.board))}

    # ---- the end -------------------------------------------------------------------------------------------

    def finish(self, model: nn.Module, output_dir: Path) -> dict[str, Any]:
        """Write the board to the run's log (printed and in train.log), pick its best path within the budget (the
        paper's pick: no evolution), export it with BN statistics recalibrated on training batches."""
        board, budget = self.search.board, _flops(self.cfg.flops_budget)
        chosen = board.best(flops_limit=budget)
        rows = board_rows(board, self.config, self.num_classes, budget, chosen)
        self.context.log(format_board(rows, self.cfg.flops_budget, self.heldout_size))
        if chosen is None:
            smallest = min((e.flops for e in board), default=0) / 1e6
            raise RecipeError(
                f"loss.flops_budget: no board path is within {self.cfg.flops_budget:g} MFLOPs (the board's smallest "
                f"has {smallest:.3f}); raise it, or set loss.board_flops_limit to keep the board under it"
            )
        path_model, recalibration_images = export_path(model, chosen.path, self._recalibration_batches())
        save_weights(path_model, output_dir / "path.safetensors")
        flops = self.flops(chosen.path)
        return {
            "path": list(chosen.path),
            "choices": [self._choice_name(c) for c in chosen.path],
            "heldout_top1": chosen.heldout_score,
            "flops": flops,
            "mflops": flops / 1e6,
            "path_params": sum(p.numel() for p in path_model.parameters()),
            "img_size": self.img_size,
            "flops_budget_mflops": self.cfg.flops_budget,
            "supernet": config_dict(self.config),
            "meta_updates": self.search.meta_updates,
            "heldout_samples": len(self.heldout_ids),
            "bn_recalibration_images": recalibration_images,
            "board": rows,
        }

    def _recalibration_batches(self) -> Iterator[torch.Tensor]:
        """The first `recalibration_batches` training batches of a fixed shuffle of the training ids, as the last
        epoch's views (the recipe's batch size)."""
        context, size = self.context, self.recipe.batch_size
        ids = np.random.default_rng([self.recipe.seed, 3]).permutation(context.train_ids)
        ids = ids[: self.cfg.recalibration_batches * size]
        epoch = context.view_epoch(self.recipe.epochs - 1)
        for start in range(0, len(ids), size):
            chunk = [context.train_data[(epoch, int(i))] for i in ids[start : start + size]]
            yield collate(chunk)["image"].to(self.device)

    def _choice_name(self, choice: int) -> str:
        if choice == SKIP:
            return "skip"
        kernel_size, exp_ratio = self.config.choices[choice]
        return f"k{kernel_size}e{exp_ratio:g}"

    def result_student(self, output_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
        """The chosen path as timm's `cream_path`, from scratch (the reference) unless `retrain_init: supernet`."""
        checkpoint = str(output_dir / "path.safetensors") if self.cfg.retrain_init == "supernet" else None
        kwargs = {"path": summary["path"], "config": summary["supernet"], "drop_rate": self.cfg.retrain_drop_rate}
        return {"model": "cream_path", "kwargs": kwargs, "checkpoint": checkpoint}


class SearchState:
    """What the search carries between steps beyond the weights: the board, the path sampler's generator and
    the count of meta updates (which also places the held-out stream); checkpointed with the run."""

    def __init__(self, seed: int, board: PrioritizedBoard) -> None:
        self.board, self.meta_updates = board, 0
        self.generator = torch.Generator().manual_seed(seed)  # the path sequence is the recipe's alone

    def state_dict(self) -> dict[str, Any]:
        return {
            "board": self.board.state_dict(),
            "generator": self.generator.get_state(),
            "meta_updates": self.meta_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.board.load_state_dict(state["board"])
        self.generator.set_state(state["generator"])
        self.meta_updates = state["meta_updates"]


class _OnePath(nn.Module):
    """One path of a supernet as a plain classifier (for evaluation)."""

    def __init__(self, supernet: Supernet, path: Sequence[int]) -> None:
        super().__init__()
        self.supernet, self.path = supernet, tuple(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.supernet(x, self.path)


def _flops(mflops: float | None) -> int | None:
    return None if mflops is None else round(mflops * 1e6)
