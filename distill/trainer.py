"""The one training loop: a `Trainer` runs a `Plan` on accelerate and writes the run's outputs.

Runs as it is on one process, or under `accelerate launch` / `torchrun` with several (data
parallel; `batch_size` is the global batch, so the steps are the same for any process count).
A run in an `output_dir` that holds its checkpoints resumes exactly where it stopped. Outputs:
`model.safetensors`, `summary.json`, `metrics.csv`, TensorBoard logs, `training_curves.png`.

Methods take part through hooks (`distill.method`, in the order documented there): `setup` with a
`MethodContext` once the model and optimizer exist, `loss` for every batch, `after_step` after every
optimizer step, `evaluate`, `finish`. The trainer gathers and restores its own checkpoints (`save`, `load`);
`distill.checkpoint` writes and reads the files.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from logit_store.locks import RangeLock

from .checkpoint import (
    SUMMARY_FILE,
    keep_last_checkpoint,
    lock_output_dir,
    public,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
    write_file,
    write_recipe,
)
from .errors import DivergedError
from .evaluate import teacher_accuracy
from .export import export_model
from .loader import TrainBatchSampler, replay_loader
from .method import MethodContext
from .plan import STORE_PIN, Plan
from .plots import plot_training_curves
from .recipe import Recipe, to_dict
from .record import Recorder
from .syncbn import convert_sync_batchnorm, has_batchnorm
from .threads import cpu_threads, launch_warning
from .tracking import CsvTracker, RunLog, writer_thread_errors
from .views import MIX_KEYS, mix_batch

__all__ = ["TrainState", "Trainer", "create_schedule"]

# Weights shared between modules (MiniViT) are written once per checkpoint by design and tied again by
# load_state (tested); accelerate would warn about it at every checkpoint.
logging.getLogger("accelerate.utils.other").addFilter(lambda r: "Removed shared tensor" not in r.getMessage())

DIVERGED_HINT = (
    "the run diverged and stopped; its checkpoints hold no non-finite weights. Lower optimizer.lr or set "
    "optimizer.clip_grad, and train in another output_dir"
)

# A deterministic fault for the kill-and-resume tests: "N" kills the process right after step N of a run,
# "NAME:N" after step N of the run whose output_dir is named NAME (a follow-up under `then`).
FAULT_AFTER_STEPS = "DISTILL_FAULT_AFTER_STEPS"


@dataclass
class TrainState:
    """Where the run stands; checkpointed with the model, so a resumed run continues exactly."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    global_step: int = 0
    images: int = 0  # training images seen, all processes
    train_seconds: float = 0.0  # time in training steps (not eval or checkpoints)
    wall_seconds: float = 0.0  # the run's wall time up to its last checkpoint, over every process that ran it
    best_top1: float = -1.0  # the best validation top-1 so far (checkpoints/best holds that state)
    teacher_top1: float | None = None  # a live classifier teacher's validation top-1 (measured once)
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


class Trainer:
    """Trains the plan's student by its method: `fit()` runs the whole run and returns its summary."""

    def __init__(self, plan: Plan) -> None:
        recipe = plan.recipe
        self.csv_tracker = CsvTracker(plan.out)
        self.plan = plan
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # gloo for several CPU processes is set up only when asked
            mixed_precision=recipe.mixed_precision,  # None: the launcher's setting (accelerate config, env)
            gradient_accumulation_steps=recipe.grad_accum,
            log_with=[*recipe.trackers, self.csv_tracker],
            project_dir=str(plan.out),
        )
        self.log = RunLog(plan.out, self.accelerator.is_main_process)
        self.recipe, self.method, self.teacher = plan.recipe, plan.method, plan.teacher
        self.recorder: Recorder | None = None  # `teacher.record`: the teacher's outputs kept as the run goes
        if plan.record is not None:
            self.recorder = Recorder(plan.record, plan.train_data, recipe.data.workers, str(plan.out))
            self.teacher = self.recorder.wrap(plan.teacher)
        self.state = TrainState()
        self.lock: RangeLock | None = None
        self.thread_errors: list[BaseException] = []  # of TensorBoard's writer threads (see fit, end_trackers)
        self.loader: torch.utils.data.DataLoader | None = None  # built at the first epoch, kept for the run
        # Sums and counts of the logged values since the last log, on the device: no sync per step.
        self.running: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}

    # ---- setup ---------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """The output dir held (locked by the plan); optimizer, schedule, EMA, trackers; the run's recipe
        written; a checkpoint loaded when resuming."""
        recipe, acc = self.recipe, self.accelerator
        if acc.is_main_process:  # held since the plan checked the folder (a plan made otherwise takes it now)
            self.lock = self.plan.lock or lock_output_dir(self.plan.out)
        self.first_bad_step = torch.zeros((), dtype=torch.long, device=acc.device)  # see watch_loss
        student = self.plan.student
        self.sync_bn = bool(recipe.sync_bn) or (recipe.sync_bn is None and acc.num_processes > 1)
        if self.sync_bn and has_batchnorm(student):
            student = self.plan.student = convert_sync_batchnorm(student, acc.device)
        else:
            self.sync_bn = False
        opt = recipe.optimizer
        optimizer = create_optimizer_v2(
            self.method.optimized_module(self.plan.student), opt=opt.name, lr=opt.lr,
            weight_decay=opt.weight_decay, momentum=opt.momentum, **opt.kwargs,
        )  # fmt: skip
        self.scheduler = create_schedule(optimizer, recipe, self.plan.steps_per_epoch)
        acc.wait_for_everyone()
        self.unwritten_extension = self.plan.extends  # see take_over_finished_run
        if acc.is_main_process and not self.plan.extends:
            write_recipe(self.plan.out, to_dict(recipe), fresh=self.plan.resume_from is None)
        if acc.is_main_process and self.plan.store_pin is not None and (not self.plan.resume_from or self.plan.extends):
            pin = json.dumps(self.plan.store_pin, indent=1).encode()  # an extension's: its new epochs too
            write_file(self.plan.out / STORE_PIN, lambda fh: fh.write(pin))
        self.model, self.optimizer = acc.prepare(self.plan.student, optimizer)
        self.ema = ModelEmaV3(acc.unwrap_model(self.model), decay=recipe.ema.decay) if recipe.ema else None
        self.method.setup(self.method_context())
        self.banner()
        if self.plan.resume_from:
            self.load(self.plan.resume_from)
            self.scheduler.step_update(self.state.global_step)  # (an extension's new schedule, where it stands)
            what = "extending" if self.plan.extends else "resuming"
            self.log(f"{what} from {self.plan.resume_from} (epoch {self.state.epoch}, step {self.state.global_step})")
        if not self.plan.resume_from:
            self.state.teacher_top1 = self.teacher_top1()
        self.started, self.wall_before = time.perf_counter(), self.state.wall_seconds
        step = self.state.global_step
        self.csv_tracker.resume_step = step  # drops rows logged after the checkpoint
        purge = {"tensorboard": {"purge_step": step + 1}} if step and "tensorboard" in recipe.trackers else {}
        acc.init_trackers(
            "tensorboard", config=_flat(public(to_dict(recipe))), init_kwargs=purge
        )  # no step logged twice

    def method_context(self) -> MethodContext:
        """What the method may use of this run (`MethodContext`): progress read-only, through callables."""
        plan, state = self.plan, self.state
        return MethodContext(
            accelerator=self.accelerator, model=self.model, param_groups=lambda: self.optimizer.param_groups,
            teacher=self.teacher, train_data=plan.train_data, train_ids=plan.train_ids, val_data=plan.val_data,
            view_epoch=plan.view_epoch, global_step=lambda: state.global_step, epoch=lambda: state.epoch,
            log=self.log,
        )  # fmt: skip

    def teacher_top1(self) -> float | None:
        """A live teacher that classifies the data's classes, scored once on the evaluation views (for the
        curves' reference line); None for a store (its views are the training ones) or an embeddings teacher."""
        teacher = self.teacher
        if teacher is None or teacher.store is not None or teacher.outputs != "logits":
            return None
        if not self.plan.val_set.has_labels:
            return None
        top1 = teacher_accuracy(teacher, self.plan.val_data, self.recipe.eval.batch_size, self.accelerator)["top1"]
        self.log(f"teacher {teacher.spec}: validation top-1 {top1:.2f}")
        return top1

    def banner(self) -> None:
        """What this run is: device, processes, precision, data, steps, parameters, output dir."""
        acc, plan, recipe = self.accelerator, self.plan, self.recipe
        source = "the recipe" if recipe.mixed_precision is not None else "the launcher"
        sizes = f"train {len(plan.train_ids)} (of {len(plan.train_set)}), val {len(plan.val_set)}"
        dropped = len(plan.train_ids) - plan.steps_per_epoch * recipe.batch_size
        params = sum(p.numel() for p in plan.student.parameters())
        self.log(f"run {plan.out}: method {recipe.method}, student {recipe.student.model} ({params:,} parameters), "
                 f"teacher {self.teacher.source if self.teacher else 'none'}")  # fmt: skip
        self.log(f"  {acc.device.type} x {acc.num_processes} process(es), precision {acc.mixed_precision} "
                 f"(from {source}){', SyncBatchNorm' if self.sync_bn else ''}; images {sizes}; "
                 f"{plan.steps_per_epoch} steps of {recipe.batch_size} per epoch, {recipe.epochs} epochs")  # fmt: skip
        for line in (cpu_threads(acc.num_processes, acc.device.type), launch_warning(acc.num_processes)):
            if line:
                self.log(f"  {line}")
        if dropped / max(len(plan.train_ids), 1) > 0.05:
            self.log(f"  warning: the last partial batch drops {dropped} of {len(plan.train_ids)} training images "
                     f"every epoch ({100 * dropped / len(plan.train_ids):.0f}%): a batch_size dividing the data "
                     "uses them all")  # fmt: skip

    # ---- the loop ------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train for the recipe's epochs (from where a resumed run stopped); returns the summary. The output
        dir is held from setup to the end (released here too, when the run fails, for a caller that goes on)."""
        try:
            with writer_thread_errors() as self.thread_errors:  # kept, not printed (see end_trackers)
                return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self) -> dict[str, Any]:
        self.setup()
        recipe, acc, state = self.recipe, self.accelerator, self.state
        steps = self.plan.steps_per_epoch
        self.progress = tqdm(
            total=steps * recipe.epochs, initial=state.global_step, unit="step", dynamic_ncols=True,
            disable=not acc.is_main_process, desc="training",
        )  # fmt: skip
        self.model.train()
        while state.epoch < recipe.epochs:
            self.progress.set_description(f"epoch {state.epoch + 1}/{recipe.epochs}")  # from 1, as train.log
            self.tick = time.perf_counter()
            if self.recorder is not None:
                self.recorder.begin_epoch(state.epoch)
            for batch in self.batches(state.epoch):
                if self.train_step(batch):
                    self.after_step(steps)
            if self.recorder is not None:  # committed whole before the epoch's checkpoint
                computed = self.recorder.end_epoch(self.accelerator)
                if computed is not None:
                    self.log(f"epoch {state.epoch + 1}: teacher outputs recorded in {self.recorder.store.location} "
                             f"({computed} of them computed at the epoch's end)")  # fmt: skip
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            if state.epoch % recipe.eval.every == 0 or state.epoch == recipe.epochs:
                self.evaluate()
            self.checkpoint()
        self.progress.close()
        return self.finish()

    def batches(self, epoch: int) -> torch.utils.data.DataLoader:
        """This process's micro-batches of `epoch`, from the step a resumed run stopped at. One DataLoader serves
        the whole run (its workers persist); its sampler is moved on to each epoch (the epoch travels with every
        index, so the workers need no state)."""
        acc, recipe = self.accelerator, self.recipe
        if self.loader is None:
            data = self.plan.train_data
            self.sampler = TrainBatchSampler(
                self.plan.train_ids, recipe.batch_size, epoch, self.plan.view_epoch(epoch), recipe.seed,
                acc.process_index, acc.num_processes, recipe.grad_accum, self.state.step_in_epoch, data.partners,
            )  # fmt: skip
            self.loader = replay_loader(data, self.sampler, recipe.data.workers, persistent=True)
        else:
            self.sampler.set_epoch(epoch, self.plan.view_epoch(epoch), self.state.step_in_epoch)
        return self.loader

    def train_step(self, batch: dict[str, torch.Tensor]) -> bool:
        """Forward, backward and (at the end of an accumulation) an optimizer step; True after a step."""
        acc, clip = self.accelerator, self.recipe.optimizer.clip_grad
        # the views are mixed on the device; how they mix (MIX_KEYS) is read on the host
        batch = mix_batch({k: v if k in MIX_KEYS else v.to(acc.device, non_blocking=True) for k, v in batch.items()})
        self.batch = batch
        if self.recorder is not None:
            self.recorder.batch = batch
        with acc.accumulate(self.model), acc.autocast():
            losses = self.method.loss(self.model, batch, self.teacher)
            self.watch_loss(losses["loss"])
            acc.backward(losses["loss"])
            if acc.sync_gradients and clip:
                acc.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()
            self.optimizer.zero_grad()
        self._add(losses, 1 / self.recipe.grad_accum)
        return acc.sync_gradients

    def after_step(self, steps_per_epoch: int) -> None:
        """Bookkeeping after an optimizer step: schedule, EMA, the method's hook, logs, checkpoints."""
        state, recipe = self.state, self.recipe
        state.global_step += 1
        state.step_in_epoch += 1
        state.images += recipe.batch_size
        self.scheduler.step_update(state.global_step)
        if self.ema:
            self.ema.update(self.accelerator.unwrap_model(self.model), step=state.global_step)
        self._add(self.method.after_step(self.model, self.batch), 1.0)
        state.train_seconds += time.perf_counter() - self.tick
        if state.global_step % recipe.log_every == 0 or state.step_in_epoch == steps_per_epoch:
            self.log_training()
        self.progress.update(1)
        every = recipe.checkpoint_every
        if every and state.global_step % every == 0 and state.step_in_epoch < steps_per_epoch:
            self.checkpoint()  # (epoch ends are saved anyway)
        run, _, step = os.environ.get(FAULT_AFTER_STEPS, "").rpartition(":")
        if step == str(state.global_step) and run in ("", self.plan.out.name):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a kill at a known step
        self.tick = time.perf_counter()

    def checkpoint(self) -> None:
        self.check_finite(self.accelerator.unwrap_model(self.model))  # a checkpoint never holds a diverged run
        self.state.wall_seconds = self.wall_before + time.perf_counter() - self.started
        self.take_over_finished_run()
        self.save(self.state.global_step)

    def take_over_finished_run(self) -> None:
        """An extension leaves the finished run's folder as it was until it has a checkpoint of its own (or
        finishes): its recipe written then, the finished summary kept under its epochs. Stopped before that, the
        folder still holds the finished run, which the same command extends again."""
        if not self.unwritten_extension:
            return
        self.unwritten_extension = False
        if self.accelerator.is_main_process:
            out = self.plan.out
            previous = json.loads((out / SUMMARY_FILE).read_text())
            (out / SUMMARY_FILE).rename(out / f"summary.epochs_{previous['epochs']}.json")
            write_recipe(out, to_dict(self.recipe), fresh=False)

    def save(self, step: int | None = None) -> None:
        """The run into checkpoints/step_N, or checkpoints/best with no step (`distill.checkpoint`)."""
        acc = self.accelerator
        save_checkpoint(acc, self.plan.out, acc.unwrap_model(self.model), self.state_dict(), step)

    def state_dict(self) -> dict[str, Any]:
        """The run's state beside the weights and RNG: tensors and plain data only (read back weights_only)."""
        acc = self.accelerator
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "train": self.state.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "method": self.method.state_dict(),
        }

    def load(self, path: Path) -> None:
        """Restore the run `save` wrote into `path`; every file is read before anything is restored."""
        acc = self.accelerator
        weights, state, rng = read_checkpoint(path, acc)
        acc.unwrap_model(self.model).load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        if not self.plan.extends:  # an extension runs the schedule made for its new length
            self.scheduler.load_state_dict(state["scheduler"])
        self.state.load_state_dict(state["train"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        restore_rng(rng)

    def watch_loss(self, loss: torch.Tensor) -> None:
        """Remember the first step whose loss is not finite. Kept on the device (no sync per step) and checked
        by `check_finite` wherever the run logs, evaluates or writes, so nothing of a diverged run is kept."""
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad_step == 0)
        self.first_bad_step = self.first_bad_step.masked_fill(bad, self.state.global_step + 1)

    def check_finite(self, model: torch.nn.Module | None = None) -> None:
        """Stop the run (DivergedError, naming the step) once a loss, or a weight of `model`, is not finite."""
        firsts = [s for s in self.accelerator.gather(self.first_bad_step.reshape(1)).tolist() if s]
        if firsts:
            raise DivergedError(f"step {min(firsts)}: the loss is not finite (nan or inf): {DIVERGED_HINT}")
        if model is not None and not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
            raise DivergedError(
                f"step {self.state.global_step}: the student's weights are not finite (nan or inf): {DIVERGED_HINT}"
            )

    def _add(self, values: dict[str, Any], weight: float) -> None:
        """Add one micro-batch's (weight 1 / grad_accum) or one step's (weight 1) values to the sums."""
        for name, value in values.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            self.running[name] = self.running.get(name, 0.0) + value * weight
            self.counts[name] = self.counts.get(name, 0.0) + weight

    def log_training(self) -> None:
        """Log the mean of each value since the last log, per step it was given at (over processes too)."""
        acc, state = self.accelerator, self.state
        self.check_finite()
        names = sorted(self.running)
        sums = acc.reduce(torch.stack([self.running[n].to(acc.device) for n in names]), "mean")
        values = {n: v / self.counts[n] for n, v in zip(names, sums.tolist(), strict=True)}
        lr = self.optimizer.param_groups[0]["lr"]
        state.history.append({"epoch": state.epoch, "step": state.global_step, "lr": lr, **values})
        img_s = state.images / max(state.train_seconds, 1e-9)
        acc.log({**{f"train/{n}": v for n, v in values.items()}, "train/lr": lr, "train/images_per_s": img_s},
                step=state.global_step)  # fmt: skip
        self.progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{img_s:.0f}")
        if self.log.enabled:
            with self.log.path.open("a") as f:  # the progress bar shows these; the file keeps them
                parts = " ".join(f"{n} {v:.4g}" for n, v in values.items())
                epoch = state.epoch + 1  # counted from 1, as the validation lines, summary.json and the curves do
                f.write(f"epoch {epoch} step {state.global_step}: {parts} lr {lr:.3g} img/s {img_s:.0f}\n")
        self.running, self.counts = {}, {}

    def evaluate(self) -> dict[str, float]:
        state = self.state
        self.check_finite(self.accelerator.unwrap_model(self.model))  # before a diverged model is kept as the best
        model = self.ema.module if self.ema else self.model
        metrics = self.method.evaluate(model, self.plan.val_data, self.recipe.eval.batch_size, self.accelerator)
        state.history.append({"epoch": state.epoch, "step": state.global_step, **metrics})
        self.accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=state.global_step)
        self.progress.set_postfix(top1=f"{metrics['top1']:.2f}", img_s=f"{state.images / state.train_seconds:.0f}")
        self.log(f"epoch {state.epoch}: " + ", ".join(f"val {k} {v:.4g}" for k, v in metrics.items()))
        if metrics["top1"] > state.best_top1:
            state.best_top1, state.best_epoch = metrics["top1"], state.epoch
            self.take_over_finished_run()
            self.save()  # checkpoints/best: weights and state, to fine-tune or compare
        return metrics

    # ---- the end -------------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Write the final weights, summary, curves; remove the checkpoints; end the trackers."""
        acc, recipe, state, out = self.accelerator, self.recipe, self.state, self.plan.out
        final = self.ema.module if self.ema else acc.unwrap_model(self.model)
        self.check_finite(final)  # a diverged model is never written as a finished run
        summary = {
            "method": recipe.method,
            "student": recipe.student.model,
            "params": sum(p.numel() for p in final.parameters()),
            "teacher_source": self.teacher.source if self.teacher else "none",
            "teacher_top1": state.teacher_top1,
            "epochs": recipe.epochs,
            "top1": state.history[-1]["top1"],
            "top5": state.history[-1]["top5"],
            "images_per_s": state.images / state.train_seconds,
            "train_seconds": state.train_seconds,
            "wall_seconds": self.wall_before + time.perf_counter() - self.started,  # over every resume
            "steps": state.global_step,
            "batch_size": recipe.batch_size,
            "processes": acc.num_processes,
            "ema": bool(self.ema),
            "best_top1": state.best_top1,
            "best_epoch": state.best_epoch,
        }
        self.take_over_finished_run()
        if acc.is_main_process:
            summary |= self.method.finish(final, out)
            summary["result_student"] = self.method.result_student(out, summary)
            export_model(final, out, to_dict(recipe), self.plan.val_data.augment, self.plan.val_set.classes)
            title = f"{recipe.student.model} ({recipe.method})"
            plot_training_curves(state.history, out / "training_curves.png", title, self.plan.train_set.num_classes,
                                 state.teacher_top1)  # fmt: skip
        self.end_trackers()
        if acc.is_main_process:
            # written last and whole: its presence is what marks the run finished
            write_file(out / SUMMARY_FILE, lambda fh: fh.write((json.dumps(public(summary), indent=2) + "\n").encode()))
            self.log(f"finished: top-1 {summary['top1']:.2f}, top-5 {summary['top5']:.2f}, "
                     f"{summary['images_per_s']:.0f} images/s, {summary['wall_seconds']:.0f} s; weights {out / 'model.safetensors'}")  # fmt: skip
            keep_last_checkpoint(out)
        acc.wait_for_everyone()
        return summary

    def end_trackers(self) -> None:
        """End the trackers before the summary is written: a tracker's failed write (a full disk) stops the run
        before the mark of a finished one. An error of a TensorBoard writer thread that its writer did not raise
        again (one closed without a flush) is raised here."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        if self.thread_errors:
            raise self.thread_errors[0]


def create_schedule(optimizer: torch.optim.Optimizer, recipe: Recipe, updates_per_epoch: int) -> Scheduler:
    """The recipe's timm scheduler, stepped per optimizer update (`schedule.kwargs` go to timm as they are)."""
    sched = recipe.schedule
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched.name, num_epochs=recipe.epochs, warmup_epochs=sched.warmup_epochs,
        warmup_lr=sched.warmup_lr, min_lr=sched.min_lr, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch, **sched.kwargs,
    )  # fmt: skip
    return scheduler


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
