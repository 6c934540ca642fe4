"""The teacher runs once, whichever run comes first: a live teacher's outputs recorded while a student trains
(`teacher.record`), and a store topped up by its own teacher (`teacher.fallback`) before a run reads it.

Recording: the run's live teacher is wrapped (`RecordingTeacher`); every output it gives on a training batch's
own views is sparsified as `distill-save-logits` does and kept until the epoch ends. Then (`Recorder.end_epoch`)
the processes gather what they kept, each takes the rows of its own pending shards (`distill.save.my_shards`),
computes with the live teacher the ids it lacks (a dropped last batch, or the part of an epoch a killed run
trained before its last checkpoint), and commits those shards whole, before the epoch's checkpoint. Views depend
only on (seed, epoch, id), so what is recomputed equals what was lost, and a resumed run never finds a record of a
view it will train on differently. The store is the one `distill-save-logits` would write for those views:
same manifest fields (its `batch_size` is the run's), records, checksums and commits.

Topping up: before training, a store source with a fallback teacher (checked to be the store's own: spec and
weights hash) gets the epochs it lacks (the store grown to the run's epochs, unless `teacher.epochs: cycle`) and
its uncommitted shards, computed exactly as a save computes them (`distill.save.save_epoch`, the store's own
image size and batch size), so the next student finds them there.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from tqdm.auto import tqdm

from logit_store import LogitStore, create_store, open_store, record_seeds
from logit_store.sparse import SparseLogits, sparsify
from teachers import Teacher, create_teacher

from .augment import Augmentation
from .data import ImageDataset
from .errors import RecipeError
from .loader import ReplayDataset, replay_loader
from .recipe import Recipe
from .save import build_manifest, my_shards, records_of, save_epoch
from .save_config import SaveConfig
from .views import MIX_KEYS, ReplayAugment, mix_batch

__all__ = ["RECORDED_BY", "TOPPED_UP_BY", "Recorder", "RecordingTeacher", "open_record_store", "top_up"]

RECORDED_BY = "distill-train (recorded)"
TOPPED_UP_BY = "distill-train (topped up)"


# ---- recording -----------------------------------------------------------------------------------------------


def record_config(recipe: Recipe, teacher: Teacher) -> SaveConfig:
    """The save a recording stands for: the run's teacher, data, views, epochs and seed."""
    record = recipe.teacher.record
    return SaveConfig(
        teacher=teacher.spec, data=recipe.data.train, out=record.path, epochs=recipe.epochs, k=record.k,
        backend=record.backend, checkpoint=recipe.teacher.checkpoint, aug=recipe.augmentation,
        img_size=recipe.data.img_size, batch_size=recipe.batch_size, workers=recipe.data.workers, seed=recipe.seed,
    )  # fmt: skip


def open_record_store(
    recipe: Recipe, dataset: ImageDataset, teacher: Teacher, augmentation: Augmentation
) -> LogitStore:
    """The store `teacher.record` names: created, or an existing one of this teacher, data and views (resumed;
    grown when the run has more epochs). One of another teacher or views is refused naming the field."""
    cfg = record_config(recipe, teacher)
    manifest = build_manifest(cfg, dataset, teacher, augmentation)
    state = PartialState()
    if state.is_main_process:  # create_store resumes a store of this manifest, growing one of fewer epochs
        create_store(cfg.out, manifest).close()
    state.wait_for_everyone()
    return open_store(cfg.out)


class RecordingTeacher(Teacher):
    """A live teacher whose outputs on the current training batch's views are kept by its `Recorder`; anything
    else (evaluation views, another tensor) passes through unrecorded."""

    def __init__(self, live: Teacher, recorder: Recorder) -> None:
        self.live, self.recorder = live, recorder
        for name in ("spec", "outputs", "num_classes", "embed_dim", "weights_sha256", "model", "context_length"):
            setattr(self, name, getattr(live, name))

    def describe(self) -> dict[str, Any]:
        return self.live.describe()

    def logits(self, images: torch.Tensor, epoch: int | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
        out = self.live.logits(images, epoch, ids)
        batch = self.recorder.batch
        if batch is not None and images is batch["image"] and self.recorder.active:
            self.recorder.keep(out, batch)
        return out


class Recorder:
    """Keeps one epoch's teacher outputs (sparsified, on the device) and commits the epoch whole at its end.

    Invariant: a shard of the store is committed only with every record of its ids for that epoch, each the
    teacher's output on the view of (seed, epoch, id), whether kept from training or computed at the end."""

    def __init__(self, store: LogitStore, data: ReplayDataset, workers: int, run: str) -> None:
        self.store, self.data, self.workers, self.run = store, data, workers, run
        self.batch: dict[str, torch.Tensor] | None = None  # the training batch being computed (set by the Trainer)
        self.kept: list[dict[str, torch.Tensor]] = []
        self.epoch, self.active = 0, False

    def wrap(self, live: Teacher) -> RecordingTeacher:
        self.live = live
        return RecordingTeacher(live, self)

    def begin_epoch(self, epoch: int) -> None:
        """Keep outputs of `epoch` from now on, unless the store holds it whole already (a rerun's epoch)."""
        m = self.store.manifest
        self.epoch, self.kept = epoch, []
        self.active = epoch < m.epochs and bool(self.store.pending_shards(epoch))

    def keep(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Sparsify a training batch's teacher outputs (as the save does, outside the run's autocast)."""
        with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
            sparse = sparsify(logits.detach(), self.store.manifest.k)
        parts = {"values": sparse.values, "indices": sparse.indices, "tail_lse": sparse.tail_lse, "kl": sparse.kl}
        for key in ("id", "label", "partner", "lam"):
            parts[key] = batch[key].to(logits.device)
        self.kept.append(parts)

    def end_epoch(self, acc: Accelerator) -> int | None:
        """Commit this process's pending shards of the epoch (kept rows, the rest computed); returns the records
        computed anew here, over all processes, or None when the epoch was committed already (a rerun's). Every
        process calls it (the rows are gathered)."""
        store, m, epoch = self.store, self.store.manifest, self.epoch
        if epoch >= m.epochs:
            return None
        pending = store.pending_shards(epoch)
        if not pending:
            self.kept = []
            return None
        rows = _gather(acc, self.kept, m.k)
        self.kept = []
        mine = my_shards(pending, acc.state)
        computed = 0
        if mine:
            ours = np.isin(rows["id"] // m.shard_records, mine)
            rows = {key: value[ours] for key, value in rows.items()}
            _, first = np.unique(rows["id"], return_index=True)  # one record per id
            rows = {key: value[first] for key, value in rows.items()}
            wanted = np.concatenate([np.arange(*m.shard_range(s)) for s in mine])
            missing = np.setdiff1d(wanted, rows["id"])
            with store.writer(epoch, mine) as writer:
                if len(rows["id"]):
                    self._write(writer, rows)
                for batch in replay_loader(self.data, _batches(epoch, missing, m.teacher["batch_size"]), self.workers):
                    images = mix_batch({k: v if k in MIX_KEYS else v.to(acc.device) for k, v in batch.items()})["image"]
                    with acc.autocast():  # as the run's steps compute it
                        logits = self.live.logits(images, epoch, batch["id"])
                    sparse = sparsify(logits, m.k)
                    self._write(writer, _rows(sparse, batch))
                    computed += len(batch["id"])
        acc.wait_for_everyone()
        if acc.is_main_process:
            store.add_provenance([epoch], {"by": RECORDED_BY, "run": self.run, "teacher": self.live.spec})
            store.refresh_statistics()
        return int(acc.reduce(torch.tensor(computed, device=acc.device), "sum"))

    def _write(self, writer: Any, rows: dict[str, np.ndarray]) -> None:
        m = self.store.manifest
        ids = rows["id"]
        sparse = SparseLogits(*(torch.from_numpy(rows[key]) for key in ("values", "indices", "tail_lse", "kl")))
        mixing = {"partner": rows["partner"].astype(np.int32), "lam": rows["lam"]} if m.mixing else {}
        records = sparse.to_records(m.num_classes, record_seeds(m.global_seed, self.epoch, ids), **mixing)
        writer.write(ids, records, labels=rows["label"], kl=rows["kl"])


def _rows(sparse: SparseLogits, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    parts = {"values": sparse.values, "indices": sparse.indices, "tail_lse": sparse.tail_lse, "kl": sparse.kl}
    return {key: value.cpu().numpy() for key, value in parts.items()} | {
        key: batch[key].numpy() for key in ("id", "label", "partner", "lam")
    }


def _batches(epoch: int, ids: np.ndarray, size: int) -> list[list[tuple[int, int]]]:
    return [[(epoch, int(i)) for i in ids[first : first + size]] for first in range(0, len(ids), size)]


KEYS = ("values", "indices", "tail_lse", "kl", "id", "label", "partner", "lam")


def _gather(acc: Accelerator, kept: list[dict[str, torch.Tensor]], k: int) -> dict[str, np.ndarray]:
    """Every process's kept rows, on every process (host arrays)."""
    local = {key: torch.cat([part[key] for part in kept]) for key in KEYS} if kept else _empty(acc.device, k)
    if acc.num_processes == 1:
        return {key: value.cpu().numpy() for key, value in local.items()}
    counts = acc.gather(torch.tensor([len(local["id"])], device=acc.device)).tolist()
    most = max(counts)
    out: dict[str, np.ndarray] = {}
    for key, value in local.items():
        padded = torch.zeros((most, *value.shape[1:]), dtype=value.dtype, device=value.device)
        padded[: len(value)] = value
        every = acc.gather(padded).cpu().numpy().reshape(len(counts), most, *value.shape[1:])
        out[key] = np.concatenate([every[p, :n] for p, n in enumerate(counts)])
    return out


def _empty(device: torch.device, k: int) -> dict[str, torch.Tensor]:
    """No rows kept (all of this process's batches were before a resume): the shapes the others gather."""
    return {
        "values": torch.zeros((0, k), device=device), "indices": torch.zeros((0, k), dtype=torch.int64, device=device),
        "tail_lse": torch.zeros(0, device=device), "kl": torch.zeros((0, 3), device=device),
        "id": torch.zeros(0, dtype=torch.int64, device=device), "label": torch.zeros(0, dtype=torch.int64, device=device),
        "partner": torch.zeros(0, dtype=torch.int64, device=device), "lam": torch.zeros(0, device=device),
    }  # fmt: skip


# ---- topping up ------------------------------------------------------------------------------------------------


def check_fallback(teacher: Teacher, fallback: Teacher) -> None:
    """Refuse a fallback that is not the store's teacher: its spec, weights hash or outputs differ from the
    manifest's teacher entry (the image and batch size are the store's, and the top-up uses them)."""
    stored = {k: v for k, v in teacher.store.manifest.teacher.items() if k not in ("img_size", "batch_size")}
    ours = fallback.describe()
    if fallback.weights_sha256 is None:
        raise RecipeError(
            f"teacher.fallback {fallback.spec}: its weights have no hash to check against the store's teacher; "
            "give them as a file (teacher.checkpoint or ?file=)"
        )
    for key in sorted(set(stored) | set(ours)):
        if stored.get(key) != ours.get(key):
            raise RecipeError(
                f"teacher.fallback {fallback.spec}: not the teacher of {teacher.store.location}: its {key} is "
                f"{ours.get(key)!r}, the store's manifest says {stored.get(key)!r}"
            )


def top_up(teacher: Teacher, fallback: Teacher, recipe: Recipe, dataset: ImageDataset, augmentation: Augmentation,
           run: str) -> Teacher:  # fmt: skip
    """Compute and commit what the store lacks for `recipe` with `fallback` (see the module docstring); returns
    the store teacher reopened (a grown store has more epochs)."""
    state = PartialState()
    store, m = teacher.store, teacher.store.manifest
    if recipe.epochs > m.epochs and recipe.teacher.epochs == "strict":
        if state.is_main_process:
            store.grow(recipe.epochs)
        state.wait_for_everyone()
        teacher = create_teacher(recipe.teacher.source)
        store, m = teacher.store, teacher.store.manifest
    epochs = range(min(recipe.epochs, m.epochs))
    pending = {epoch: store.pending_shards(epoch) for epoch in epochs}
    planes = [epoch for epoch, shards in pending.items() if shards]
    if not planes:
        return teacher
    cfg = SaveConfig(
        teacher=fallback.spec, data=recipe.data.train, out=str(store.location), epochs=m.epochs, k=m.k,
        img_size=m.teacher["img_size"], batch_size=m.teacher["batch_size"], workers=recipe.data.workers,
        seed=m.global_seed,
    )  # fmt: skip
    data = ReplayDataset(dataset, ReplayAugment(augmentation, cfg.img_size, cfg.seed))
    total = sum(records_of(m, pending[epoch]) for epoch in planes)
    if state.is_main_process:
        print(f"topping up {store.location} with {fallback.spec}: epoch(s) {planes}", file=sys.stderr)
    with tqdm(total=total, unit="rec", disable=not state.is_main_process, desc="topping up") as progress:
        for epoch in planes:
            save_epoch(store, epoch, pending[epoch], fallback, data, cfg, state, progress)
    state.wait_for_everyone()
    if state.is_main_process:
        store.add_provenance(planes, {"by": TOPPED_UP_BY, "run": run, "teacher": fallback.spec})
        store.refresh_statistics()
    return create_teacher(recipe.teacher.source)
