"""The plan of one run: everything it needs, built and checked before anything is written.

`make_plan` validates the output dir (resume or refuse), loads the datasets, builds the method, the
teacher and the student, and checks a store against the data, augmentation, seed and epochs it
will replay. A recipe that cannot run is refused here, naming its key; only then does the
`Trainer` write a file. (A plan to train takes `output_dir/.lock` first, and removes the folder again
if it made it and the plan is refused.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from timm.data import DEFAULT_CROP_PCT
from torch import nn

from logit_store import LogitStore
from logit_store.pin import make_pin, manifest_changes, pin_reads
from teachers import Teacher, create_teacher
from teachers.registry import split_spec

from .augment import Augmentation, load_augmentation
from .checkpoint import LAST, OutputDirLock, check_output_dir, lock_output_dir
from .data import ImageDataset, create_dataset
from .errors import RecipeError
from .loader import ReplayDataset
from .method import Method, create_method
from .recipe import Recipe, to_dict
from .record import check_fallback, open_record_store, top_up
from .views import EvalView, ReplayAugment

__all__ = ["Plan", "check_store", "eval_view", "make_plan", "store_difference"]


@dataclass
class Plan:
    """A run's parts (see the module docstring); `student` is None in a plan made without one."""

    recipe: Recipe
    out: Path
    resume_from: Path | None
    augmentation: Augmentation
    train_set: ImageDataset
    val_set: ImageDataset
    train_ids: np.ndarray
    method: Method
    teacher: Teacher | None
    student: nn.Module | None
    train_data: ReplayDataset
    val_data: ReplayDataset
    store_pin: dict[str, Any] | None  # what the run pins of a store teacher (see `pin_store`)
    extends: bool  # the run continues a finished run of fewer epochs (from its checkpoints/last)
    lock: OutputDirLock | None = None  # output_dir held since before it was checked (main process; see make_plan)
    record: LogitStore | None = None  # where the live teacher's outputs are recorded (`teacher.record`)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_ids) // self.recipe.batch_size

    def view_epoch(self, epoch: int) -> int:
        """The epoch whose views (and stored outputs) training epoch `epoch` replays."""
        if self.teacher is not None and self.teacher.store is not None and self.recipe.teacher.epochs == "cycle":
            return epoch % self.teacher.store.manifest.epochs
        return epoch


def make_plan(recipe: Recipe, num_processes: int, device: torch.device, build_student: bool = True) -> Plan:
    """Check and build a run of `recipe` on `num_processes` processes (see the module docstring).

    A plan to train (`build_student`) takes `output_dir/.lock` before it checks the folder and hands it to the
    Trainer, which holds it to the run's end: a run that finished or started there after a check made without
    the lock would otherwise be overwritten. A refused plan lets the folder go (removed again if it made it)."""
    out = Path(recipe.output_dir)
    lock = lock_output_dir(out) if build_student and PartialState().is_main_process else None
    try:
        return _make_plan(recipe, out, num_processes, device, build_student, lock)
    except BaseException:
        if lock is not None:
            lock.abandon()
        raise


def _make_plan(
    recipe: Recipe, out: Path, num_processes: int, device: torch.device, build_student: bool, lock: OutputDirLock | None
) -> Plan:
    resume_from = check_output_dir(out, to_dict(recipe))
    if recipe.batch_size % (num_processes * recipe.grad_accum):
        raise RecipeError(
            f"batch_size: {recipe.batch_size} images per step do not split evenly over "
            f"{num_processes} process(es) x grad_accum {recipe.grad_accum}"
        )
    set_seed(recipe.seed)
    augmentation = load_augmentation(recipe.augmentation)
    if augmentation.mixing and recipe.batch_size % 2:
        raise RecipeError(
            f"batch_size: {recipe.batch_size} is odd, but the augmentation mixes views in pairs (Mixup/CutMix "
            "partners share a batch); use an even batch_size"
        )
    train_set = create_dataset(recipe.data.train, "train", recipe.data.skip_unreadable)
    val_set = create_dataset(recipe.data.val, "val", recipe.data.skip_unreadable)
    if train_set.has_labels and val_set.has_labels and val_set.classes != train_set.classes:
        raise RecipeError(f"data.val: its classes {val_set.classes} differ from data.train's {train_set.classes}")
    if not val_set.has_labels and not val_set.has_captions:
        raise RecipeError(f"data.val: evaluation needs labelled images; {recipe.data.val} has none")
    method = create_method(recipe, num_classes(train_set, val_set))
    method.check_run(num_processes, augmentation)
    with torch.random.fork_rng(devices=[]):  # a live teacher's init must not shift the student's
        teacher = build_teacher(recipe, method, train_set, augmentation.manifest_entry(), device)
        fallback = build_fallback(recipe, teacher, device)
    train_ids = method.training_ids(train_set, val_set)
    if len(train_ids) < recipe.batch_size:
        raise RecipeError(f"batch_size: {recipe.batch_size} is larger than the {len(train_ids)} training samples")
    student = method.build_student(recipe.student, recipe.data.img_size, teacher) if build_student else None
    if student is not None and method.tokenizer is not None and not train_set.has_captions:
        raise RecipeError(f"data.train: method {recipe.method!r} trains on captions; {recipe.data.train} has none")
    train_data = ReplayDataset(
        train_set, ReplayAugment(augmentation, recipe.data.img_size, recipe.seed), method.tokenizer
    )
    val_data = ReplayDataset(val_set, eval_view(recipe, augmentation))
    record = None
    if build_student and recipe.teacher.record is not None:
        record = open_record_store(recipe, train_set, teacher, augmentation)
    if build_student and fallback is not None:
        teacher = top_up(teacher, fallback, recipe, train_set, augmentation, str(out))
        check_store(teacher, recipe, train_set, augmentation.manifest_entry(), method.num_classes)
    pin = pin_store(teacher, recipe, out, resume_from) if teacher is not None and teacher.store is not None else None
    return Plan(
        recipe, out, resume_from, augmentation, train_set, val_set, train_ids, method, teacher, student,
        train_data, val_data, pin, resume_from is not None and resume_from.name == LAST, lock, record,
    )  # fmt: skip


def num_classes(train_set: ImageDataset, val_set: ImageDataset) -> int:
    """The classes a student outputs: data.train's, or data.val's when data.train is unlabelled."""
    return train_set.num_classes or val_set.num_classes


def eval_view(recipe: Recipe, augmentation: Augmentation) -> EvalView:
    """The run's evaluation transform (`EvalConfig`): recipe.eval's crop_pct and interpolation, else the
    student's timm defaults, else timm's (0.875, bicubic); normalised as the training views are."""
    try:
        defaults = timm.models.get_pretrained_cfg(recipe.student.model)
    except RuntimeError:  # a name with a tag timm does not know: the student's build names the error
        defaults = None
    crop_pct = recipe.eval.crop_pct or (defaults and defaults.crop_pct) or DEFAULT_CROP_PCT
    interpolation = recipe.eval.interpolation or (defaults and defaults.interpolation) or "bicubic"
    return EvalView(recipe.data.img_size, crop_pct, interpolation, augmentation.mean, augmentation.std)


def build_teacher(
    recipe: Recipe, method: Method, train_set: ImageDataset, aug_entry: dict[str, Any], device: torch.device
) -> Teacher | None:
    """The recipe's teacher (a store or a live model), checked against the method and the data."""
    source = recipe.teacher.source
    if not source:
        method.check_teacher(None)
        return None
    fallback = recipe.teacher.fallback is not None and split_spec(source)[0] == "store"
    checkpoint = None if fallback else recipe.teacher.checkpoint  # then the fallback's
    teacher = create_teacher(source, method.num_classes or None, checkpoint, device)
    if teacher.outputs != method.spec.outputs:
        raise RecipeError(
            f"teacher.source: method {recipe.method!r} learns from a teacher's {method.spec.outputs}; "
            f"{teacher.spec} gives {teacher.outputs}"
        )
    method.check_teacher(teacher)
    if teacher.store is not None:
        check_store(teacher, recipe, train_set, aug_entry, method.num_classes, whole=not fallback)
    elif recipe.teacher.epochs != "strict":
        raise RecipeError("teacher.epochs: cycle maps epochs onto a store's; a live teacher takes none")
    return teacher


def build_fallback(recipe: Recipe, teacher: Teacher | None, device: torch.device) -> Teacher | None:
    """The live teacher `teacher.fallback` names, seeded as distill-save-logits seeds its teacher, and checked to
    be the store's own teacher (`distill.record.check_fallback`)."""
    if recipe.teacher.fallback is None or teacher is None or teacher.store is None:
        return None
    if teacher.store.manifest.kind != "logits":
        raise RecipeError(f"teacher.fallback: {teacher.source} is an embeddings store; only logits are topped up")
    torch.manual_seed(recipe.seed)
    fallback = create_teacher(recipe.teacher.fallback, teacher.num_classes, recipe.teacher.checkpoint, device)
    check_fallback(teacher, fallback)
    return fallback


def check_store(
    teacher: Teacher,
    recipe: Recipe,
    dataset: ImageDataset,
    aug_entry: dict[str, Any],
    classes: int,
    whole: bool = True,
) -> None:
    """Refuse a store that was not saved for this data, augmentation, seed and epoch count; name the field.
    Not `whole` (a fallback teacher tops it up first): its missing epochs and shards are not refused."""
    store = teacher.store
    m, where = store.manifest, f"teacher.source {teacher.source}"
    checks = [
        *([("num_classes", m.num_classes, classes, "the data's class count")] if m.k and classes else []),
        (
            "dataset.fingerprint",
            m.dataset.get("fingerprint"),
            dataset.fingerprint(m.dataset.get("fingerprint_mode", "fast")),  # older stores: the fast mode
            f"data.train ({recipe.data.train})",
        ),
        ("augmentation.hash", m.augmentation.get("hash"), aug_entry["hash"], "the recipe's augmentation"),
        ("global_seed", m.global_seed, recipe.seed, "the recipe's seed (the replayed views would differ)"),
    ]
    for name, stored, ours, what in checks:
        if stored != ours:
            raise RecipeError(
                f"{where}: store field {name} is {stored!r} but {what} gives {ours!r}"
                f"{store_difference(name, m, dataset, aug_entry)}"
            )
    if not whole:
        return
    if recipe.epochs > m.epochs and recipe.teacher.epochs == "strict":
        raise RecipeError(
            f"epochs: {recipe.epochs} training epochs but the store {store.location} holds {m.epochs}; "
            "set teacher.epochs: cycle to reuse its epochs, or train for fewer"
        )
    planes = [*range(min(recipe.epochs, m.epochs)), *([m.epochs] if m.kind == "embeddings" else [])]
    for epoch in planes:
        missing = store.pending_shards(epoch)
        if missing:
            what = "the text plane" if epoch == m.epochs else f"epoch {epoch}"
            raise RecipeError(
                f"{where}: {what} is incomplete ({len(missing)} of {m.num_shards} shards not committed); "
                "finish it by re-running its distill-save-logits command"
            )


STORE_PIN = "teacher_store.json"


def pin_store(teacher: Teacher, recipe: Recipe, out: Path, resume_from: Path | None) -> dict[str, Any]:
    """The store's identity as this run reads it: its manifest's identity and a digest of the commits of every
    plane the run replays. A resumed run must find the same (the run pinned it at its start, in STORE_PIN):
    a store saved again at the same path by another teacher would mix two teachers in one run. Planes the
    saved pin does not cover (an extension's new epochs, committed since) are pinned now. The store checks
    the pin again at every plane it loads while the run goes on (`logit_store.pin`)."""
    m = teacher.store.manifest
    planes = [*range(min(recipe.epochs, m.epochs)), *([m.epochs] if m.kind == "embeddings" else [])]
    pin = make_pin(teacher.store, planes)
    saved = out / STORE_PIN
    if resume_from is not None and saved.exists():
        before = json.loads(saved.read_text())
        common = set(before["planes"]) & set(pin["planes"])  # those pinned before must be as they were
        before, now = _restricted(before, common), _restricted(pin, common)
        difference = _pin_difference(before, now, cycle=recipe.teacher.epochs == "cycle")
        if difference:
            raise RecipeError(f"teacher.source {teacher.source} changed since this run started in {out}: "
                              f"{difference}; resume with the store it started with, or train in another "
                              "output_dir")  # fmt: skip
    pin_reads(teacher.store, pin)
    return pin


def _restricted(pin: dict[str, Any], planes: set[str]) -> dict[str, Any]:
    return {"manifest": pin["manifest"], "planes": {p: d for p, d in pin["planes"].items() if p in planes}}


def _pin_difference(before: dict[str, Any], now: dict[str, Any], cycle: bool) -> str:
    """What changed in the store between two pins of the same planes ("" if nothing). A store grown since (more
    epochs: `LogitStore.grow`) is no change, except to a `cycle` run, whose epoch e % (store epochs) it moves."""
    old, new = before["manifest"], now["manifest"]
    fields = manifest_changes(old, new)
    if cycle and old.get("epochs") != new.get("epochs"):
        fields = [f"epochs (was {old.get('epochs')!r}, now {new.get('epochs')!r}; teacher.epochs: cycle replays "
                  "epoch e % the store's epochs)", *fields]  # fmt: skip
    if fields:
        return "its manifest differs in " + ", ".join(dict.fromkeys(fields))
    planes = [p for p in sorted(set(before["planes"]) | set(now["planes"]), key=int)
              if before["planes"].get(p) != now["planes"].get(p)]  # fmt: skip
    return f"the records of epoch(s) {', '.join(planes)} were written again" if planes else ""


def store_difference(name: str, m: Any, dataset: ImageDataset, aug_entry: dict[str, Any]) -> str:
    """What lies behind a differing hash: the augmentation fields, or the dataset's count, classes and spec."""
    if name == "augmentation.hash":
        stored, ours = m.augmentation.get("recipe", {}), aug_entry["recipe"]
        where = "recipe"
    elif name == "dataset.fingerprint":
        stored = {k: m.dataset.get(k) for k in ("num_samples", "classes", "spec")}
        ours = {"num_samples": len(dataset), "classes": dataset.classes, "spec": dataset.spec}
        where = "data.train"
        if stored == ours:
            return " (same count, classes and spec: file names, sizes, labels or captions differ)"
    else:
        return ""
    keys = sorted(k for k in set(stored) | set(ours) if stored.get(k) != ours.get(k))
    differs = f" (differs in {', '.join(f'{k}: store {stored.get(k)!r}, {where} {ours.get(k)!r}' for k in keys)})"
    if name == "augmentation.hash" and "pairing" in keys:
        differs += (
            "; the store's mixed views paired samples by another rule (before pairs per epoch: a partner drawn "
            "per sample), so its records are of other views: save it again with distill-save-logits"
        )
    return differs
