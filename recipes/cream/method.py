"""The Cream method on the trainer's hooks (see `recipes.cream`): a path per step, the board, meta updates,
and at the end the pick within the FLOPs budget, exported for the retraining."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from distill.augment import AugRecipe
from distill.checkpoint import save_weights
from distill.data import ImageDataset
from distill.errors import RecipeError
from distill.evaluate import classification_accuracy
from distill.loader import ReplayDataset, collate
from distill.losses import soft_target_kd
from distill.method import Method
from distill.plan import eval_views
from distill.recipe import StudentConfig
from distill.views import ReplayAugment
from students.supernet import PathModel, Supernet, build_path_model, export, path_flops, sample_path
from teachers import Teacher

from .board import (
    BoardEntry,
    MetaMatchingNetwork,
    PrioritizedBoard,
    kd_weight,
    meta_update,
    prioritized_loss,
    select_teacher,
    update_board,
)

if TYPE_CHECKING:
    from distill.trainer import Trainer

__all__ = ["Cream", "format_board"]

PathKey = tuple[int, ...]


class Cream(Method):
    """Prioritized-path training of a `cream_supernet` student (see `recipes.cream`)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        cfg, recipe = self.cfg, self.recipe
        if cfg.board_start_epoch >= recipe.epochs:
            raise RecipeError(f"loss.board_start_epoch: expected 0 .. {recipe.epochs - 1}, got {cfg.board_start_epoch}")
        if recipe.mixed_precision not in (None, "no"):
            raise RecipeError(
                "mixed_precision: the search runs in float32 (the meta update differentiates an SGD step)"
            )

    # ---- the plan ------------------------------------------------------------------------------------------

    def check_run(self, num_processes: int, augmentation: AugRecipe) -> None:
        if num_processes > 1:
            raise RecipeError("the Cream search runs on one process: start it without accelerate launch / torchrun")
        if augmentation.mixing:
            raise RecipeError("augmentation: the search trains on hard labels; mixup/cutmix are not supported")

    def build_student(self, cfg: StudentConfig, img_size: int) -> nn.Module:
        model = super().build_student(cfg, img_size)
        if not isinstance(model, Supernet):
            raise RecipeError(f"student.model: method cream trains a supernet (cream_supernet), not {cfg.model}")
        config, weights = model.config, self.cfg.choice_weights
        if weights is not None and (len(weights) != config.num_choices or min(weights) < 0 or not sum(weights)):
            names = ", ".join(f"k{k}e{e:g}" for k, e in config.choices)
            raise RecipeError(
                f"loss.choice_weights: expected {config.num_choices} weights >= 0, one per choice ({names})"
            )
        self.config, self.img_size = config, img_size
        return model

    def training_ids(self, train_set: ImageDataset, val_set: ImageDataset) -> np.ndarray:
        """All of data.train, or (heldout: train) all but every heldout_every-th id, held out for scores."""
        ids = np.arange(len(train_set))
        if self.cfg.heldout == "val":
            self.heldout_set, self.heldout_ids = val_set, np.arange(len(val_set))
            return ids
        held = ids % self.cfg.heldout_every == 0
        self.heldout_set, self.heldout_ids = train_set, ids[held]
        return ids[~held]

    # ---- the run -------------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer) -> None:
        """The held-out batches, the board, the meta network and its optimizer (checkpointed: `state_dict`)."""
        cfg, acc = self.cfg, trainer.accelerator
        if acc.mixed_precision != "no":  # the launcher's: the recipe said nothing
            raise RecipeError("mixed_precision: the search runs in float32; set mixed_precision: 'no' in the recipe")
        self.trainer, self.device = trainer, acc.device
        views = ReplayAugment(eval_views(trainer.plan.augmentation), self.img_size, 0)
        self.heldout_data = ReplayDataset(self.heldout_set, views)
        self.heldout_size = min(cfg.heldout_batch_size, len(self.heldout_ids))
        chosen = np.sort(
            np.random.default_rng([self.recipe.seed, 1]).permutation(self.heldout_ids)[: self.heldout_size]
        )
        self.heldout = self._batch(chosen)  # the board's batch: every entry's score and outputs are on it
        self.meta = MetaMatchingNetwork(self.num_classes, cfg.meta_hidden).to(self.device)
        self.meta_optimizer = torch.optim.Adam(self.meta.parameters(), lr=cfg.meta_lr)
        self.search = SearchState(self.recipe.seed, PrioritizedBoard(cfg.board_size, _flops(cfg.board_flops_limit)))

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
        weights = torch.tensor(cfg.choice_weights) if cfg.sampling == "weighted" else None
        self.path = sample_path(self.config, search.generator, weights)
        prioritized = self.board_on and len(search.board) > 0
        logs: dict[str, Any] = {}
        if prioritized and self.trainer.state.global_step % cfg.meta_update_every == 0:
            # Before the real step, on its batch: this step's m already follows the updated meta network.
            result = meta_update(
                self.meta, student, self.path, (images, labels), self._heldout_batch(search.meta_updates),
                search.board, self.heldout[0], lr=self.trainer.optimizer.param_groups[0]["lr"],
                meta_optimizer=self.meta_optimizer,
            )  # fmt: skip
            search.meta_updates += 1
            logs["meta_heldout_loss"] = result.heldout_loss
        logits = student(images, self.path)
        if prioritized:
            entry, m = self.choose_teacher(student, self.path)
            with torch.no_grad():
                teacher_logits = student(images, entry.path)
            loss = prioritized_loss(logits, teacher_logits, labels, m)
            logs["m"] = m
        else:
            loss = F.cross_entropy(logits, labels)
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
        return self.trainer.state.epoch >= self.cfg.board_start_epoch

    def choose_teacher(self, student: nn.Module, path: PathKey) -> tuple[BoardEntry, torch.Tensor]:
        """The best-matching board entry and its m = sigmoid(-score), detached: m only weighs the student's loss."""
        with torch.no_grad():
            student_on_meta_batch = student(self.heldout[0], path)
        entry, score = select_teacher(self.meta, student_on_meta_batch, self.search.board)
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
        """Print the board, pick its best path within the budget (the paper's pick: no evolution), export it."""
        board, budget = self.search.board, _flops(self.cfg.flops_budget)
        chosen = board.best(flops_limit=budget)
        rows = board_rows(board, self.config, self.num_classes, budget, chosen)
        print(format_board(rows, self.cfg.flops_budget, self.heldout_size), flush=True)
        if chosen is None:
            smallest = min((e.flops for e in board), default=0) / 1e6
            raise RecipeError(
                f"loss.flops_budget: no board path is within {self.cfg.flops_budget:g} MFLOPs (the board's smallest "
                f"has {smallest:.3f}); raise it, or set loss.board_flops_limit to keep the board under it"
            )
        path_model: PathModel = export(model, chosen.path)
        save_weights(path_model, output_dir / "path.safetensors")
        flops = self.flops(chosen.path)
        return {
            "path": list(chosen.path),
            "choices": [f"k{k}e{e:g}" for k, e in (self.config.choices[c] for c in chosen.path)],
            "heldout_top1": chosen.heldout_score,
            "flops": flops,
            "mflops": flops / 1e6,
            "path_params": sum(p.numel() for p in path_model.parameters()),
            "img_size": self.img_size,
            "flops_budget_mflops": self.cfg.flops_budget,
            "supernet": config_dict(self.config),
            "meta_updates": self.search.meta_updates,
            "heldout_samples": len(self.heldout_ids),
            "board": rows,
        }

    def result_student(self, output_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
        """The chosen path as timm's `cream_path`, from its supernet weights unless `retrain_init: scratch`."""
        checkpoint = str(output_dir / "path.safetensors") if self.cfg.retrain_init == "supernet" else None
        kwargs = {"path": summary["path"], "config": summary["supernet"]}
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


def config_dict(config: Any) -> dict[str, Any]:
    """A SupernetConfig as plain YAML/JSON data (`cream_path`'s `config` keyword)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def path_params(config: Any, path: Sequence[int], num_classes: int) -> int:
    """Parameters of a path's standalone model (built on the meta device: shapes only)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_path_model(config, path, num_classes).parameters())


def board_rows(
    board: PrioritizedBoard, config: Any, num_classes: int, budget: int, chosen: BoardEntry | None
) -> list[dict[str, Any]]:
    return [
        {
            "rank": rank,
            "path": list(entry.path),
            "heldout_top1": entry.heldout_score,
            "mflops": entry.flops / 1e6,
            "flops": entry.flops,
            "params": path_params(config, entry.path, num_classes),
            "within_budget": entry.flops <= budget,
            "chosen": entry is chosen,
        }
        for rank, entry in enumerate(board, start=1)
    ]


def format_board(rows: list[dict[str, Any]], budget_mflops: float, heldout_size: int) -> str:
    lines = [
        f"Cream board, best first (held-out top-1 on {heldout_size} images; budget {budget_mflops:g} MFLOPs):",
        f"{'rank':>4}  {'held-out':>8}  {'MFLOPs':>8}  {'params':>9}  path",
    ]
    for r in rows:
        mark = "  <- chosen" if r["chosen"] else ("" if r["within_budget"] else "  (over budget)")
        lines.append(
            f"{r['rank']:>4}  {r['heldout_top1']:>8.4f}  {r['mflops']:>8.3f}  {r['params']:>9,}  {r['path']}{mark}"
        )
    return "\n".join(lines)


def _flops(mflops: float | None) -> int | None:
    return None if mflops is None else round(mflops * 1e6)
