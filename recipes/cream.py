"""Cream one-shot NAS, end to end: `python -m recipes.cream RECIPE.yaml [--set key.path=value ...]`.

One command runs three stages (see recipes/cream_digits.yaml for a recipe):

1. search: train the weight-sharing supernet (students.supernet), one sampled path per step. Once
   the board holds paths, the meta-matching network picks the sampled path's teacher among them and
   the loss is (m * KD + (2 - m) * CE) / 2 with m = sigmoid(-best matching score); before that it is
   plain CE. After each step the path's top-1 on a fixed *held-out* batch decides whether it enters
   the board (never its accuracy on the training batch it was just fit to). Every
   `search.meta_update_every` steps the meta network gets a one-step unrolled (bilevel) update. The
   first `search.board_start_epoch` epochs are plain CE with no board (early scores mean little). An
   optional logit store adds an outer KD term (`teacher.source: store:PATH`, `teacher.weight`).
2. select: print the board, take the best board path within `search.flops_budget` (MFLOPs) and
   export it from the supernet (`path.safetensors`).
3. retrain: the chosen path alone with the ordinary trainer (`distill.train.train`, in this
   process), built by name as timm's `cream_path`, from the exported weights (`retrain_init:
   supernet`) or from scratch (`retrain_init: scratch`); the `retrain` section is a distill-train
   recipe without `student`, `data` and `output_dir`, which are filled in.

Held-out data: with `search.heldout: train` (the default) every `search.heldout_every`-th id of
data.train (ids 0, N, 2N, ...) is held out of the search's training and used only for board scores
and the meta update's held-out loss; `search.heldout: val` uses data.val instead (which then no
longer measures the search independently). The retraining trains on all of data.train.

Outputs in `output_dir`: recipe.yaml, supernet.safetensors, path.safetensors, retrain/ (a full
distill-train run: model.safetensors, summary.json, metrics...), summary.json. The search runs on
one process, in float32 (the meta update differentiates through an SGD step), and does not resume.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from tqdm.auto import tqdm

from distill.augment import PRESETS, AugRecipe, ReplayAugment, load_recipe, recipe_manifest_entry
from distill.data import ImageDataset, create_dataset
from distill.loader import ReplayDataset, TrainBatchSampler, collate
from distill.losses import soft_target_kd
from distill.method import get_method
from distill.prioritized_board import (
    BoardEntry,
    MetaMatchingNetwork,
    PrioritizedBoard,
    kd_weight,
    meta_update,
    prioritized_loss,
    select_teacher,
    update_board,
)
from distill.recipe import (
    DataConfig,
    OptimizerConfig,
    Recipe,
    RecipeError,
    ScheduleConfig,
    parse_section,
    to_dict,
)
from distill.train import build_teacher, check_store, recipe_cli, save_weights
from distill.train import train as train_student
from students.supernet import PathModel, Supernet, SupernetConfig, build_path_model, export, path_flops, sample_path
from teachers import Teacher, create_teacher
from teachers.store_teacher import StoreTeacher

__all__ = [
    "CreamRecipe",
    "PathTrainer",
    "build_outer_teacher",
    "main",
    "retrain_recipe",
    "run",
    "search",
    "split_heldout",
]

Path_ = tuple[int, ...]  # a supernet path (flat choice indices); `Path` is pathlib's here


# ---- the recipe ------------------------------------------------------------------------------------------


@dataclass
class SupernetSection:
    """The supernet's shape: `SupernetConfig` fields over its defaults, or over `SupernetConfig.tiny()`."""

    tiny: bool = False  # start from the 32-px test supernet (3 stages of 2 layers, 2-6 MFLOPs per path)
    stage_chs: list[int] | None = None
    stage_depths: list[int] | None = None
    stage_strides: list[int] | None = None
    kernel_sizes: list[int] | None = None
    exp_ratios: list[float] | None = None
    se_ratio: float | None = None
    stem_chs: int | None = None
    head_chs: int | None = None
    num_features: int | None = None
    drop_rate: float | None = None

    def build(self) -> SupernetConfig:
        base = SupernetConfig.tiny() if self.tiny else SupernetConfig()
        given = {k: tuple(v) if isinstance(v, list) else v for k, v in to_dict(self).items() if k != "tiny"}
        try:
            return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
        except ValueError as err:
            raise RecipeError(f"supernet: {err}") from None


@dataclass
class SearchConfig:
    epochs: int
    batch_size: int
    flops_budget: float  # MFLOPs (2 per multiply-add, at data.img_size): the pick is the best board path under it
    board_size: int = 10
    board_flops_limit: float | None = None  # MFLOPs; paths above it never enter the board (null: any)
    board_start_epoch: int = 0  # epochs of plain CE before the board takes paths (early scores mean little)
    meta_update_every: int = 200  # steps between one-step unrolled meta updates
    meta_lr: float = 1e-3  # Adam on the meta-matching network (hypergradients are tiny; Adam rescales them)
    meta_hidden: int = 0  # hidden width of the meta network (0: linear)
    sampling: Literal["uniform", "weighted"] = "uniform"
    choice_weights: list[float] | None = None  # with sampling: weighted, one weight per choice (k3e4, k3e6, ...)
    heldout: Literal["train", "val"] = "train"  # where held-out data comes from (see the module docstring)
    heldout_every: int = 10  # with heldout: train, ids 0, N, 2N, ... of data.train are held out
    heldout_batch_size: int = 128  # the fixed board batch, and the meta update's held-out batches
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class CreamTeacherConfig:
    source: str | None = None  # store:PATH for an outer KD term; saved with this data, augmentation and seed
    weight: float = 1.0  # loss = prioritized loss + weight * KD(student, store)
    temperature: float = 1.0
    epochs: Literal["strict", "cycle"] = "strict"  # search epoch e reads store epoch e (strict) or e % E


@dataclass
class CreamRecipe:
    data: DataConfig
    search: SearchConfig
    retrain: dict[str, Any]  # a distill-train recipe without student, data and output_dir (filled in)
    output_dir: str
    supernet: SupernetSection = field(default_factory=SupernetSection)
    teacher: CreamTeacherConfig = field(default_factory=CreamTeacherConfig)
    augmentation: str | dict[str, Any] = "basic"  # the search's training views
    seed: int = 0  # init, batch order, path sampling, and the replay seed (must equal a store's)
    retrain_init: Literal["supernet", "scratch"] = "supernet"

    def __post_init__(self) -> None:
        s = self.search
        for name in ("epochs", "batch_size", "board_size", "meta_update_every", "heldout_batch_size"):
            if getattr(s, name) < 1:
                raise RecipeError(f"search.{name}: expected an integer >= 1, got {getattr(s, name)}")
        if s.heldout_every < 2:
            raise RecipeError(f"search.heldout_every: expected an integer >= 2, got {s.heldout_every}")
        if s.flops_budget <= 0:
            raise RecipeError(f"search.flops_budget: expected MFLOPs > 0, got {s.flops_budget}")
        if not 0 <= s.board_start_epoch < s.epochs:
            raise RecipeError(f"search.board_start_epoch: expected 0 .. {s.epochs - 1}, got {s.board_start_epoch}")
        if (s.sampling == "weighted") != (s.choice_weights is not None):
            raise RecipeError("search.choice_weights: give them with sampling: weighted, and only then")
        if self.data.img_size < 1:
            raise RecipeError(f"data.img_size: expected an integer >= 1, got {self.data.img_size}")


RETRAIN_FILLED = ("student", "data", "output_dir")


def retrain_recipe(cfg: CreamRecipe, config: SupernetConfig, path: Sequence[int], checkpoint: str | None) -> dict:
    """The distill-train recipe of the retraining: the `retrain` section with the path model, data and output_dir."""
    given = [key for key in RETRAIN_FILLED if key in cfg.retrain]
    if given:
        raise RecipeError(
            f"retrain.{given[0]}: set by the Cream recipe (the chosen path, its data, output_dir/retrain)"
        )
    kwargs = {"path": list(path), "config": config_dict(config)}
    return copy.deepcopy(cfg.retrain) | {
        "student": {"model": "cream_path", "kwargs": kwargs, "checkpoint": checkpoint},
        "data": to_dict(cfg.data),
        "output_dir": str(Path(cfg.output_dir) / "retrain"),
    }


def config_dict(config: SupernetConfig) -> dict[str, Any]:
    """A SupernetConfig as plain YAML/JSON data (`cream_path`'s `config` keyword)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def check_retrain(raw: dict[str, Any]) -> Recipe:
    """Validate the retraining recipe before anything runs, so a typo in it does not surface after the search."""
    recipe = parse_section(Recipe, raw, "retrain")
    try:
        load_recipe(recipe.augmentation)
    except ValueError as err:
        raise RecipeError(f"retrain.augmentation: {err}") from None
    return recipe


def check_retrain_teacher(recipe: Recipe, train_set: ImageDataset, device: torch.device) -> None:
    """Check the retraining's method, loss and teacher (e.g. tinyvit's store) against the data before the search."""
    method_cls = get_method(recipe.method)
    method = method_cls(parse_section(method_cls.LossConfig, recipe.loss, "retrain.loss"), train_set.num_classes)
    try:
        build_teacher(recipe, method, train_set, recipe_manifest_entry(load_recipe(recipe.augmentation)), device)
    except RecipeError as err:  # its messages name distill-train's keys, which sit under retrain. here
        raise RecipeError(f"retrain.{err}") from None


def check_choice_weights(cfg: SearchConfig, config: SupernetConfig) -> None:
    weights = cfg.choice_weights
    if weights is not None and (len(weights) != config.num_choices or min(weights) < 0 or not sum(weights)):
        names = ", ".join(f"k{k}e{e:g}" for k, e in config.choices)
        raise RecipeError(
            f"search.choice_weights: expected {config.num_choices} weights >= 0, one per choice ({names})"
        )


# ---- data: training ids, the held-out split, the outer teacher ---------------------------------------------


def split_heldout(
    cfg: CreamRecipe, train_set: ImageDataset, val_set: ImageDataset
) -> tuple[np.ndarray, ImageDataset, np.ndarray]:
    """(training ids, held-out dataset, held-out ids); deterministic, see the module docstring."""
    ids = np.arange(len(train_set))
    if cfg.search.heldout == "val":
        return ids, val_set, np.arange(len(val_set))
    held = ids % cfg.search.heldout_every == 0
    return ids[~held], train_set, ids[held]


def fixed_heldout_batch(data: ReplayDataset, ids: np.ndarray, size: int, seed: int, device) -> tuple:
    """The board's batch: `size` held-out samples drawn once; every entry's score and outputs are on it."""
    chosen = np.sort(np.random.default_rng([seed, 1]).permutation(ids)[:size])
    batch = collate([data[(0, int(i))] for i in chosen])
    return batch["image"].to(device), batch["label"].to(device)


def heldout_batches(data: ReplayDataset, ids: np.ndarray, size: int, seed: int, device) -> Iterator[tuple]:
    """Held-out batches without end, reshuffled every pass: the meta update's held-out loss."""
    for round_ in itertools.count():
        order = np.random.default_rng([seed, 2, round_]).permutation(ids)
        batches = [[(0, int(i)) for i in order[s : s + size]] for s in range(0, len(order) - size + 1, size)]
        for batch in torch.utils.data.DataLoader(data, batch_sampler=batches, collate_fn=collate):
            yield batch["image"].to(device), batch["label"].to(device)


def eval_views(augmentation: AugRecipe) -> AugRecipe:
    """Un-augmented views, normalized like the training views."""
    return dataclasses.replace(PRESETS["none"], mean=augmentation.mean, std=augmentation.std)


def build_outer_teacher(cfg: CreamRecipe, train_set: ImageDataset, augmentation: AugRecipe) -> StoreTeacher | None:
    """The optional store teacher, checked against the data, augmentation, seed and epochs like distill-train's."""
    if not cfg.teacher.source:
        return None
    if not cfg.teacher.source.startswith("store:"):
        raise RecipeError(
            f"teacher.source: the Cream search takes a logit store (store:PATH), got {cfg.teacher.source!r}"
        )
    teacher = create_teacher(cfg.teacher.source, train_set.num_classes)
    # check_store reads recipe.data.train, .seed, .epochs and .teacher.epochs; here epochs is search.epochs.
    view = SimpleNamespace(data=cfg.data, seed=cfg.seed, epochs=cfg.search.epochs, teacher=cfg.teacher)
    try:
        check_store(teacher, view, train_set, recipe_manifest_entry(augmentation))
    except RecipeError as err:
        message = str(err)
        raise RecipeError("search." + message if message.startswith("epochs:") else message) from None
    return teacher


# ---- one training step -----------------------------------------------------------------------------------


@dataclass
class PathTrainer:
    """One supernet training step: prioritized-path loss, optimizer step, board admission, meta updates."""

    model: nn.Module  # the supernet, called model(images, path)
    meta: MetaMatchingNetwork
    board: PrioritizedBoard
    optimizer: torch.optim.Optimizer
    meta_optimizer: torch.optim.Optimizer
    heldout: tuple[torch.Tensor, torch.Tensor]  # the fixed board batch (also the meta batch)
    flops: Callable[[Path_], int]
    meta_update_every: int = 200
    clip_grad: float | None = None
    teacher: Teacher | None = None  # the outer store teacher
    teacher_weight: float = 1.0
    teacher_temperature: float = 1.0
    steps: int = 0
    meta_updates: int = 0

    def step(
        self,
        batch: dict[str, torch.Tensor],
        path: Path_,
        use_board: bool,
        next_heldout: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    ) -> dict[str, float]:
        """Train `path` on `batch`; with `use_board`, learn from the board and offer the path to it."""
        images, labels = batch["image"], batch["label"]
        logs: dict[str, float] = {}
        prioritized = use_board and len(self.board) > 0
        if prioritized and self.steps % self.meta_update_every == 0:
            # Before the real step, on its batch: this step's m already follows the updated meta network.
            lr = self.optimizer.param_groups[0]["lr"]
            result = meta_update(
                self.meta, self.model, path, (images, labels), next_heldout(), self.board, self.heldout[0],
                lr=lr, meta_optimizer=self.meta_optimizer,
            )  # fmt: skip
            self.meta_updates += 1
            logs["meta_heldout_loss"] = result.heldout_loss

        logits = self.model(images, path)
        if prioritized:
            entry, m = self.choose_teacher(path)
            with torch.no_grad():
                teacher_logits = self.model(images, entry.path)
            loss = prioritized_loss(logits, teacher_logits, labels, m)
            logs["m"] = m.item()
        else:
            loss = F.cross_entropy(logits, labels)
        if self.teacher is not None:
            with torch.no_grad():
                stored = self.teacher.logits(images, int(batch["epoch"][0]), batch["id"])
            store_kd = soft_target_kd(logits, stored, self.teacher_temperature)
            loss = loss + self.teacher_weight * store_kd
            logs["store_kd"] = store_kd.item()

        self.optimizer.zero_grad(set_to_none=True)  # None, not 0: ops off the path are neither moved nor decayed
        loss.backward()
        if self.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        self.steps += 1
        logs["loss"] = loss.item()

        if use_board:
            # Admission by the held-out batch's score: the training batch was just fit, its accuracy flatters.
            logs["admitted"] = float(update_board(self.board, self.model, path, self.heldout, self.flops(path)))
        return logs

    def choose_teacher(self, path: Path_) -> tuple[BoardEntry, torch.Tensor]:
        """The best-matching board entry and its m = sigmoid(-score), detached: m only weighs the student's loss."""
        with torch.no_grad():
            student_on_meta_batch = self.model(self.heldout[0], path)
        entry, score = select_teacher(self.meta, student_on_meta_batch, self.board)
        return entry, kd_weight(score).detach()


# ---- the search loop -------------------------------------------------------------------------------------

LOG_ORDER = ["loss", "m", "store_kd", "meta_heldout_loss", "admitted"]  # PathTrainer.step's logs


def search(
    cfg: CreamRecipe,
    trainer: PathTrainer,
    scheduler: Any,
    train_data: ReplayDataset,
    train_ids: np.ndarray,
    next_heldout: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    store_epochs: int | None = None,
) -> dict[str, Any]:
    """Train the supernet for search.epochs, one sampled path per step; returns the search's summary."""
    s = cfg.search
    steps_per_epoch = len(train_ids) // s.batch_size
    generator = torch.Generator().manual_seed(cfg.seed)  # the path sequence is the recipe's, whatever else draws
    weights = torch.tensor(s.choice_weights) if s.sampling == "weighted" else None
    progress = tqdm(total=steps_per_epoch * s.epochs, unit="step", dynamic_ncols=True, desc="cream search")
    history: list[dict[str, float]] = []
    images_seen, train_seconds = 0, 0.0
    for epoch in range(s.epochs):
        # A cycled store replays its epoch e % E: the views must be that epoch's too.
        view = epoch % store_epochs if store_epochs and cfg.teacher.epochs == "cycle" else epoch
        sampler = TrainBatchSampler(len(train_ids), s.batch_size, epoch, view, cfg.seed)
        batches = [[(e, int(train_ids[i])) for e, i in positions] for positions in sampler]  # positions -> ids
        loader = torch.utils.data.DataLoader(
            train_data, batch_sampler=batches, num_workers=cfg.data.workers, collate_fn=collate
        )
        use_board = epoch >= s.board_start_epoch
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        tick = time.perf_counter()
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            path = sample_path(trainer.model.config, generator, weights)
            logs = trainer.step(batch, path, use_board, next_heldout)
            scheduler.step_update(trainer.steps)
            images_seen += len(batch["image"])
            train_seconds += time.perf_counter() - tick
            for name, value in logs.items():
                totals[name] = totals.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
            progress.update(1)
            progress.set_postfix(
                loss=f"{logs['loss']:.3f}", m=f"{logs.get('m', float('nan')):.2f}", board=len(trainer.board),
                img_s=f"{images_seen / train_seconds:.0f}",
            )  # fmt: skip
            tick = time.perf_counter()
        # Epoch means: loss, m (KD weight), store_kd, meta_heldout_loss, admitted (fraction of steps).
        means = {name: totals[name] / counts[name] for name in sorted(totals, key=LOG_ORDER.index)}
        row = means | {"board_size": len(trainer.board)}
        if len(trainer.board):
            row["board_best_heldout"] = trainer.board[0].heldout_score
        progress.write(f"search epoch {epoch + 1}/{s.epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
        history.append({"epoch": epoch + 1, "step": trainer.steps, **row})
    progress.close()
    return {
        "epochs": s.epochs,
        "steps": trainer.steps,
        "images": images_seen,
        "images_per_s": images_seen / max(train_seconds, 1e-9),
        "train_seconds": train_seconds,
        "meta_updates": trainer.meta_updates,
        "history": history,
    }


# ---- selection -------------------------------------------------------------------------------------------


def path_params(config: SupernetConfig, path: Sequence[int], num_classes: int) -> int:
    """Parameters of a path's standalone model (built on the meta device: shapes only)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_path_model(config, path, num_classes).parameters())


def board_rows(
    board: PrioritizedBoard, config: SupernetConfig, num_classes: int, budget: int, chosen: BoardEntry | None
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


def select(
    board: PrioritizedBoard, config: SupernetConfig, num_classes: int, budget_mflops: float, heldout_size: int
) -> tuple[BoardEntry, list[dict[str, Any]]]:
    """Print the board and pick its best path within the budget (the paper's pick: no evolution)."""
    budget = to_flops(budget_mflops)
    chosen = board.best(flops_limit=budget)
    rows = board_rows(board, config, num_classes, budget, chosen)
    print(format_board(rows, budget_mflops, heldout_size), flush=True)
    if chosen is None:
        smallest = min((e.flops for e in board), default=0) / 1e6
        raise RecipeError(
            f"search.flops_budget: no board path is within {budget_mflops:g} MFLOPs (the board's smallest has "
            f"{smallest:.3f}); raise it, or set search.board_flops_limit to keep the board under it"
        )
    return chosen, rows


def to_flops(mflops: float | None) -> int | None:
    return None if mflops is None else round(mflops * 1e6)


# ---- the run ---------------------------------------------------------------------------------------------


def run(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate a Cream recipe mapping, search, select, retrain; return the summary it writes."""
    cfg = parse_section(CreamRecipe, raw, "")
    config = cfg.supernet.build()
    check_choice_weights(cfg.search, config)
    retrain_check = check_retrain(retrain_recipe(cfg, config, (0,) * config.num_layers, None))
    try:
        augmentation = load_recipe(cfg.augmentation)
    except ValueError as err:
        raise RecipeError(f"augmentation: {err}") from None
    if augmentation.mixing:
        raise RecipeError("augmentation: the search trains on hard labels; mixup/cutmix are not supported")
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()):
        raise RecipeError(f"output_dir {out} is not empty: choose another (a Cream run does not resume)")
    # One accelerate state per process: the in-process retraining's Accelerator must match this one.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=retrain_check.mixed_precision)
    if accelerator.num_processes > 1:
        raise RecipeError("the Cream search runs on one process: start it without accelerate launch / torchrun")
    device, started = accelerator.device, time.perf_counter()
    set_seed(cfg.seed)

    train_set = create_dataset(cfg.data.train, "train", cfg.data.skip_unreadable)
    val_set = create_dataset(cfg.data.val, "val", cfg.data.skip_unreadable)
    if val_set.classes != train_set.classes:
        raise RecipeError(f"data.val: its classes {val_set.classes} differ from data.train's {train_set.classes}")
    teacher = build_outer_teacher(cfg, train_set, augmentation)
    check_retrain_teacher(retrain_check, train_set, device)
    train_ids, heldout_set, heldout_ids = split_heldout(cfg, train_set, val_set)
    if len(train_ids) < cfg.search.batch_size:
        raise RecipeError(f"search.batch_size: {cfg.search.batch_size} is more than the {len(train_ids)} training ids")
    train_data = ReplayDataset(train_set, ReplayAugment(augmentation, cfg.data.img_size, cfg.seed))
    heldout_data = ReplayDataset(heldout_set, ReplayAugment(eval_views(augmentation), cfg.data.img_size, 0))
    heldout_size = min(cfg.search.heldout_batch_size, len(heldout_ids))
    heldout = fixed_heldout_batch(heldout_data, heldout_ids, heldout_size, cfg.seed, device)
    heldout_stream = heldout_batches(heldout_data, heldout_ids, heldout_size, cfg.seed, device)

    num_classes = train_set.num_classes
    model = Supernet(config, num_classes).to(device)
    meta = MetaMatchingNetwork(num_classes, cfg.search.meta_hidden).to(device)
    opt, sched = cfg.search.optimizer, cfg.search.schedule
    optimizer = create_optimizer_v2(
        model, opt=opt.name, lr=opt.lr, weight_decay=opt.weight_decay, momentum=opt.momentum, **opt.kwargs
    )
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched.name, num_epochs=cfg.search.epochs, warmup_epochs=sched.warmup_epochs,
        warmup_lr=sched.warmup_lr, min_lr=sched.min_lr, step_on_epochs=False,
        updates_per_epoch=len(train_ids) // cfg.search.batch_size,
    )  # fmt: skip
    board = PrioritizedBoard(cfg.search.board_size, flops_limit=to_flops(cfg.search.board_flops_limit))
    trainer = PathTrainer(
        model, meta, board, optimizer, torch.optim.Adam(meta.parameters(), lr=cfg.search.meta_lr), heldout,
        flops=lambda path: path_flops(config, path, cfg.data.img_size, num_classes),
        meta_update_every=cfg.search.meta_update_every, clip_grad=opt.clip_grad, teacher=teacher,
        teacher_weight=cfg.teacher.weight, teacher_temperature=cfg.teacher.temperature,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    model.train()
    store_epochs = teacher.store.manifest.epochs if teacher else None
    search_summary = search(cfg, trainer, scheduler, train_data, train_ids, lambda: next(heldout_stream), device,
                            store_epochs)  # fmt: skip
    save_weights(model, out / "supernet.safetensors")

    chosen, rows = select(board, config, num_classes, cfg.search.flops_budget, heldout_size)
    path_model: PathModel = export(model, chosen.path)
    save_weights(path_model, out / "path.safetensors")
    checkpoint = str(out / "path.safetensors") if cfg.retrain_init == "supernet" else None
    search_seconds = time.perf_counter() - started

    retrain_summary = train_student(retrain_recipe(cfg, config, chosen.path, checkpoint))

    flops = path_flops(config, chosen.path, cfg.data.img_size, num_classes)
    summary = {
        "path": list(chosen.path),
        "choices": [f"k{k}e{e:g}" for k, e in (config.choices[c] for c in chosen.path)],
        "heldout_top1": chosen.heldout_score,
        "flops": flops,
        "mflops": flops / 1e6,
        "params": sum(p.numel() for p in path_model.parameters()),
        "img_size": cfg.data.img_size,
        "flops_budget_mflops": cfg.search.flops_budget,
        "top1": retrain_summary["top1"],
        "top5": retrain_summary["top5"],
        "retrain_init": cfg.retrain_init,
        "supernet": config_dict(config),
        "supernet_params": sum(p.numel() for p in model.parameters()),
        "search": search_summary | {"wall_seconds": search_seconds, "heldout": cfg.search.heldout,
                                    "heldout_samples": len(heldout_ids), "train_samples": len(train_ids)},
        "board": rows,
        "retrain": retrain_summary,
        "wall_seconds": time.perf_counter() - started,
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    return recipe_cli("cream", __doc__, run, argv, ("path", "mflops", "params", "heldout_top1", "top1", "top5"))


if __name__ == "__main__":
    sys.exit(main())
