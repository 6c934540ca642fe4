"""`distill-train RECIPE.yaml [--set key.path=value ...]`: train a student by a method recipe.

Runs as it is on one process, or under `accelerate launch` / `torchrun` with several
(data parallel; `batch_size` is the global batch, so the steps are the same for any
process count). Re-running the same command in the same `output_dir` resumes from the
last checkpoint. Writes `model.safetensors`, `summary.json`, `metrics.csv`, TensorBoard
logs and `training_curves.png` to `output_dir`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm

from logit_store import StoreError
from teachers import Teacher, TeacherError, create_teacher
from teachers.clip_teacher import EmbeddingStoreTeacher, EmbeddingTeacher
from teachers.store_teacher import StoreTeacher

from .augment import PRESETS, ReplayAugment, load_recipe, recipe_manifest_entry
from .data import DatasetError, ImageDataset, create_dataset
from .loader import ReplayDataset, TrainBatchSampler, collate
from .method import Method, get_method
from .plots import plot_training_curves
from .recipe import Recipe, RecipeError, load_recipe_file, parse_section, to_dict
from .tracking import CsvTracker

__all__ = ["TrainState", "check_store", "main", "train"]

STORE_TEACHERS = (StoreTeacher, EmbeddingStoreTeacher)

# Weights shared between modules (MiniViT) are written once per checkpoint by design and tied again by
# load_state (tested); accelerate would warn about it at every checkpoint.
logging.getLogger("accelerate.utils.other").addFilter(lambda r: "Removed shared tensor" not in r.getMessage())


@dataclass
class TrainState:
    """Where the run stands; checkpointed with the model, so a resumed run continues exactly."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    global_step: int = 0
    images: int = 0  # training images seen, all processes
    train_seconds: float = 0.0  # time in training steps (not eval or checkpoints)
    history: list[dict[str, float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


# ---- the run's parts -------------------------------------------------------------------------------------


def prepare_output_dir(out: Path, resolved: dict[str, Any]) -> Path | None:
    """Check `out` can take this run; the checkpoint to resume from, if any. Nothing is overwritten."""
    if (out / "summary.json").exists():
        raise RecipeError(f"output_dir {out} holds a finished run (summary.json): choose another output_dir")
    saved = out / "recipe.yaml"
    if saved.exists():
        previous = yaml.safe_load(saved.read_text())
        if previous != resolved:
            key = _first_difference(previous, resolved)
            raise RecipeError(
                f"output_dir {out} holds a run of another recipe ({key} differs): choose another output_dir"
            )
    elif out.exists() and any(out.iterdir()):
        raise RecipeError(f"output_dir {out} is not empty and holds no run of this toolkit (no recipe.yaml)")
    checkpoints = sorted((out / "checkpoints").glob("step_*[0-9]"))
    return checkpoints[-1] if checkpoints else None


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    return path or "the recipe"


def check_store(
    teacher: StoreTeacher | EmbeddingStoreTeacher, recipe: Recipe, dataset: ImageDataset, aug_entry: dict[str, Any]
) -> None:
    """Refuse a store that was not saved for this data, augmentation, seed and epoch count; name the field."""
    m, where = teacher.store.manifest, f"teacher.source {teacher.location}"
    checks = [
        *([("num_classes", m.num_classes, dataset.num_classes, "data.train's class count")] if m.k else []),
        (
            "dataset.fingerprint",
            m.dataset.get("fingerprint"),
            dataset.fingerprint(),
            f"data.train ({recipe.data.train})",
        ),
        ("augmentation.hash", m.augmentation.get("hash"), aug_entry["hash"], "the recipe's augmentation"),
        ("global_seed", m.global_seed, recipe.seed, "the recipe's seed (the replayed views would differ)"),
    ]
    for name, stored, ours, what in checks:
        if stored != ours:
            detail = _recipe_difference(m.augmentation.get("recipe", {}), aug_entry["recipe"]) if "aug" in name else ""
            raise RecipeError(f"{where}: store field {name} is {stored!r} but {what} gives {ours!r}{detail}")
    if recipe.epochs > m.epochs and recipe.teacher.epochs == "strict":
        raise RecipeError(
            f"epochs: {recipe.epochs} training epochs but the store {teacher.location} holds {m.epochs}; "
            "set teacher.epochs: cycle to reuse its epochs, or train for fewer"
        )
    planes = [*range(min(recipe.epochs, m.epochs)), *([m.epochs] if m.kind == "embeddings" else [])]
    for epoch in planes:
        missing = teacher.store.pending_shards(epoch)
        if missing:
            what = "the text plane" if epoch == m.epochs else f"epoch {epoch}"
            raise RecipeError(
                f"{where}: {what} is incomplete ({len(missing)} of {m.num_shards} shards not committed); "
                "finish it by re-running its distill-save-logits command"
            )


def _recipe_difference(stored: dict[str, Any], ours: dict[str, Any]) -> str:
    keys = sorted(k for k in set(stored) | set(ours) if stored.get(k) != ours.get(k))
    return f" (differs in {', '.join(f'{k}: store {stored.get(k)!r}, recipe {ours.get(k)!r}' for k in keys)})"


def build_teacher(recipe: Recipe, method: Method, train_set: ImageDataset, aug_entry: dict, device: torch.device):
    """The recipe's teacher (a store or a live model), checked against the data; None for teacherless methods."""
    source = recipe.teacher.source
    if not method.needs_teacher:
        if source:
            raise RecipeError(f"teacher.source: method {recipe.method!r} trains on labels only and takes no teacher")
        return None
    if not source:
        raise RecipeError(f"teacher.source: method {recipe.method!r} needs a teacher: store:PATH or a live spec")
    teacher = create_teacher(source, train_set.num_classes or None, recipe.teacher.checkpoint, device)
    method.check_teacher(teacher)
    if isinstance(teacher, STORE_TEACHERS):
        check_store(teacher, recipe, train_set, aug_entry)
    elif recipe.teacher.epochs != "strict":
        raise RecipeError("teacher.epochs: cycle maps epochs onto a store's; a live teacher takes none")
    return teacher


def view_epoch(teacher: Teacher | EmbeddingTeacher | None, recipe: Recipe, epoch: int) -> int:
    """The epoch whose views (and stored logits) training epoch `epoch` replays."""
    if isinstance(teacher, STORE_TEACHERS) and recipe.teacher.epochs == "cycle":
        return epoch % teacher.store.manifest.epochs
    return epoch


def save_checkpoint(accelerator: Accelerator, out: Path, step: int) -> None:
    """accelerate's state into checkpoints/step_N, made visible by one rename; older ones removed after."""
    final = out / "checkpoints" / f"step_{step:08d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        partial.rename(final)
        for old in (out / "checkpoints").glob("step_*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_weights(model: nn.Module, path: Path) -> None:
    # Clones, so weights shared between modules are written under every name and load as any state dict.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(path))


# ---- the loop --------------------------------------------------------------------------------------------


def train(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate a recipe mapping, run it, and return the summary it writes."""
    recipe = parse_section(Recipe, raw, "")
    method_cls = get_method(recipe.method)
    loss_cfg = parse_section(method_cls.LossConfig, recipe.loss, "loss")
    try:
        augmentation = load_recipe(recipe.augmentation)
    except ValueError as err:
        raise RecipeError(f"augmentation: {err}") from None
    out, resolved = Path(recipe.output_dir), to_dict(recipe)
    resume_from = prepare_output_dir(out, resolved)  # reads only: nothing is written until all checks pass
    csv_tracker = CsvTracker(out)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # gloo for several CPU processes is set up only when asked
        mixed_precision=recipe.mixed_precision,
        gradient_accumulation_steps=recipe.grad_accum,
        log_with=["tensorboard", csv_tracker],
        project_dir=str(out),
    )
    if recipe.batch_size % (accelerator.num_processes * recipe.grad_accum):
        raise RecipeError(
            f"batch_size: {recipe.batch_size} images per step do not split evenly over "
            f"{accelerator.num_processes} process(es) x grad_accum {recipe.grad_accum}"
        )
    started = time.perf_counter()
    set_seed(recipe.seed)

    train_set = create_dataset(recipe.data.train, "train", recipe.data.skip_unreadable)
    val_set = create_dataset(recipe.data.val, "val", recipe.data.skip_unreadable)
    if val_set.classes != train_set.classes:
        raise RecipeError(f"data.val: its classes {val_set.classes} differ from data.train's {train_set.classes}")
    method = method_cls(loss_cfg, train_set.num_classes)
    with torch.random.fork_rng(devices=[]):  # a live teacher's init must not shift the student's
        teacher = build_teacher(recipe, method, train_set, recipe_manifest_entry(augmentation), accelerator.device)
    model = method.build_student(recipe.student, recipe.data.img_size)
    if method.tokenizer is not None and not train_set.has_captions:
        raise RecipeError(f"data.train: method {recipe.method!r} trains on captions; {recipe.data.train} has none")
    train_data = ReplayDataset(
        train_set, ReplayAugment(augmentation, recipe.data.img_size, recipe.seed), method.tokenizer
    )
    # Evaluation: the whole image, normalised as in training.
    plain = dataclasses.replace(PRESETS["none"], mean=augmentation.mean, std=augmentation.std)
    val_data = ReplayDataset(val_set, ReplayAugment(plain, recipe.data.img_size, 0))
    opt = recipe.optimizer
    optimizer = create_optimizer_v2(
        model, opt=opt.name, lr=opt.lr, weight_decay=opt.weight_decay, momentum=opt.momentum, **opt.kwargs
    )
    steps_per_epoch = len(train_set) // recipe.batch_size
    if steps_per_epoch == 0:
        raise RecipeError(f"batch_size: {recipe.batch_size} is larger than data.train's {len(train_set)} samples")
    sched = recipe.schedule
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched.name, num_epochs=recipe.epochs, warmup_epochs=sched.warmup_epochs,
        warmup_lr=sched.warmup_lr, min_lr=sched.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )  # fmt: skip
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=recipe.ema.decay) if recipe.ema else None
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state, *([ema] if ema else []))
    if resume_from:
        accelerator.load_state(str(resume_from))
        accelerator.print(f"resuming from {resume_from} (epoch {state.epoch}, step {state.global_step})")
    csv_tracker.resume_step = state.global_step  # drops rows logged after the checkpoint
    accelerator.init_trackers("tensorboard", config=_flat(resolved))

    progress = tqdm(
        total=steps_per_epoch * recipe.epochs, initial=state.global_step, unit="step", dynamic_ncols=True,
        disable=not accelerator.is_main_process, desc="training",
    )  # fmt: skip
    running: dict[str, torch.Tensor] = {}  # loss sums since the last log, on the device: no sync per step
    model.train()
    while state.epoch < recipe.epochs:
        epoch = state.epoch
        sampler = TrainBatchSampler(
            len(train_set), recipe.batch_size, epoch, view_epoch(teacher, recipe, epoch), recipe.seed,
            accelerator.process_index, accelerator.num_processes, recipe.grad_accum, state.step_in_epoch,
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(
            train_data, batch_sampler=sampler, num_workers=recipe.data.workers, collate_fn=collate,
            generator=torch.Generator(),  # its own: drawing worker seeds from the global RNG would shift a resume
        )  # fmt: skip
        tick = time.perf_counter()
        for batch in loader:
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            with accelerator.accumulate(model), accelerator.autocast():
                losses = method.loss(model, batch, teacher)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and opt.clip_grad:
                    accelerator.clip_grad_norm_(model.parameters(), opt.clip_grad)
                optimizer.step()
                optimizer.zero_grad()
            for name, value in losses.items():
                running[name] = running.get(name, 0.0) + value.detach().float() / recipe.grad_accum
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            state.step_in_epoch += 1
            state.images += recipe.batch_size
            scheduler.step_update(state.global_step)
            if ema:
                ema.update(accelerator.unwrap_model(model), step=state.global_step)
            state.train_seconds += time.perf_counter() - tick
            if state.global_step % recipe.log_every == 0 or state.step_in_epoch == steps_per_epoch:
                running = log_training(accelerator, state, running, optimizer, progress)
            progress.update(1)
            every = recipe.checkpoint_every
            if every and state.global_step % every == 0 and state.step_in_epoch < steps_per_epoch:
                save_checkpoint(accelerator, out, state.global_step)  # (an epoch's end is checkpointed below)
            tick = time.perf_counter()
        state.epoch, state.step_in_epoch = epoch + 1, 0
        if state.epoch % recipe.eval.every == 0 or state.epoch == recipe.epochs:
            metrics = method.evaluate(ema.module if ema else model, val_data, recipe.eval.batch_size, accelerator)
            state.history.append({"epoch": state.epoch, "step": state.global_step, **metrics})
            accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=state.global_step)
            progress.set_postfix(top1=f"{metrics['top1']:.2f}", img_s=f"{state.images / state.train_seconds:.0f}")
        save_checkpoint(accelerator, out, state.global_step)
    progress.close()

    final = ema.module if ema else accelerator.unwrap_model(model)
    summary = {
        "method": recipe.method,
        "student": recipe.student.model,
        "params": sum(p.numel() for p in final.parameters()),
        "teacher_source": _teacher_source(teacher),
        "epochs": recipe.epochs,
        "top1": state.history[-1]["top1"],
        "top5": state.history[-1]["top5"],
        "images_per_s": state.images / state.train_seconds,
        "train_seconds": state.train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "steps": state.global_step,
        "batch_size": recipe.batch_size,
        "processes": accelerator.num_processes,
        "ema": bool(ema),
    }
    if accelerator.is_main_process:
        summary |= method.finish(final, out)
        save_weights(final, out / "model.safetensors")
        plot_training_curves(state.history, out / "training_curves.png", f"{recipe.student.model} ({recipe.method})")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the run is complete; its result is the weights
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also ends the process group, so it comes last
    return summary


def log_training(
    accelerator: Accelerator, state: TrainState, running: dict[str, torch.Tensor], optimizer: Any, progress: tqdm
) -> dict[str, torch.Tensor]:
    """Log the mean of each loss since the last log (over processes too); returns fresh accumulators."""
    names = sorted(running)
    means = accelerator.reduce(torch.stack([running[n] for n in names]), "mean")
    last = next((h["step"] for h in reversed(state.history) if "loss" in h), 0)
    steps = max(state.global_step - last, 1)
    values = {n: v / steps for n, v in zip(names, means.tolist(), strict=True)}
    lr = optimizer.param_groups[0]["lr"]
    state.history.append({"epoch": state.epoch, "step": state.global_step, "lr": lr, **values})
    img_s = state.images / max(state.train_seconds, 1e-9)
    accelerator.log({**{f"train/{n}": v for n, v in values.items()}, "train/lr": lr, "train/images_per_s": img_s},
                    step=state.global_step)  # fmt: skip
    progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{img_s:.0f}")
    return {}


def _teacher_source(teacher: Teacher | EmbeddingTeacher | None) -> str:
    if teacher is None:
        return "none"
    return f"store:{teacher.location}" if isinstance(teacher, STORE_TEACHERS) else f"live:{teacher.spec}"


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = (
                value if isinstance(value, int | float | str | bool) or value is None else str(value)
            )
    return flat


def recipe_cli(
    prog: str, description: str, run: Callable[[dict[str, Any]], dict[str, Any]], argv: list[str] | None,
    shown: tuple[str, ...] | None = None,
) -> int:  # fmt: skip
    """`PROG RECIPE.yaml [--set key.path=value ...]`: run a recipe; errors in the input exit 2 with the message."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", help="recipe YAML file (see recipes/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key")
    args = parser.parse_args(argv)
    try:
        summary = run(load_recipe_file(args.recipe, args.set))
    except (RecipeError, TeacherError, StoreError, DatasetError) as err:
        print(f"{prog}: error: {args.recipe}: {err}", file=sys.stderr)
        return 2
    shown_summary = {k: summary[k] for k in shown or summary}
    print(
        json.dumps(
            {k: round(v, 4) if isinstance(v, float) and math.isfinite(v) else v for k, v in shown_summary.items()}
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return recipe_cli("distill-train", __doc__, train, argv)


if __name__ == "__main__":
    sys.exit(main())
