"""The save pipeline of `distill-save-logits`: run a teacher once over replayed views, keep its outputs.

A logits teacher's top-k logits per (epoch, sample) go to a logits store; a CLIP teacher's image
embedding per view and text embedding per caption to an embeddings store. Each process computes and
commits its own shards, so several processes (`accelerate launch`, `torchrun`) split the work and a
re-run resumes after the last committed shard. The command line is `distill.cli.save_logits`.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from logit_store import Embeddings, LogitStore, Manifest, StoreDamagedError, StoreError, create_store, record_seeds
from logit_store.sparse import sparsify
from teachers import Teacher, create_teacher

from .augment import Augmentation, load_augmentation
from .checkpoint import public
from .data import CAPTION_SPEC_FORMS, ImageDataset, create_dataset
from .errors import RecipeError
from .loader import ReplayDataset, ShardBatchSampler, replay_loader
from .save_config import SaveConfig
from .threads import cpu_threads, launch_warning
from .views import MIX_KEYS, ReplayAugment, mix_batch

__all__ = ["build_manifest", "check_replay", "run"]


def build_manifest(
    cfg: SaveConfig,
    dataset: ImageDataset,
    teacher: Teacher,
    augmentation: Augmentation,
) -> Manifest:
    if teacher.outputs == "embeddings":
        if teacher.store is not None:
            raise StoreError(f"--teacher {cfg.teacher}: an embeddings store is copied with distill-store convert")
        if cfg.k is not None:
            raise StoreError(f"--k: teacher {cfg.teacher} gives embeddings, not logits; drop --k")
        if not dataset.has_captions:
            raise StoreError(
                f"--data {cfg.data}: a CLIP teacher needs image-caption data ({', '.join(CAPTION_SPEC_FORMS)})"
            )
        if augmentation.mixing:
            raise StoreError(f"--aug {cfg.aug}: mixes images, but a mixed image has no caption of its own")
        shape = {"kind": "embeddings", "embed_dim": teacher.embed_dim, "num_classes": 0, "k": 0}
    else:
        if cfg.k is None:
            raise StoreError(f"--k: teacher {cfg.teacher} gives logits; say how many to keep per record")
        classes = dataset.num_classes or teacher.num_classes  # unlabelled data: the teacher's classes
        if cfg.k > classes:
            raise StoreError(f"--k {cfg.k} is larger than the {classes} classes of {cfg.data} and the teacher")
        shape = {"num_classes": classes, "k": cfg.k}
    return Manifest(
        num_samples=len(dataset),
        **shape,
        epochs=cfg.epochs,
        backend=cfg.backend,
        mixing=augmentation.mixing,
        global_seed=cfg.seed,
        # Batches are part of the teacher's numerics: a resume with another batch size is refused.
        teacher=teacher.describe() | {"img_size": cfg.img_size, "batch_size": cfg.batch_size},
        dataset=public(dataset.describe(cfg.fingerprint)),  # a spec may be a URL: no credentials in it
        augmentation=augmentation.manifest_entry(),
    )


def my_shards(shards: list[int], state: PartialState) -> list[int]:
    """This process's part of a plane's pending shards: every num_processes-th, from its index."""
    return [s for s in shards if s % state.num_processes == state.process_index]


def records_of(manifest: Manifest, shards: list[int]) -> int:
    """The records the shards hold (the last shard of a plane may be short)."""
    return sum(stop - start for start, stop in map(manifest.shard_range, shards))


class PlaneProgress:
    """The bar's count of one plane (an epoch, or the text plane) that several processes save, each its own
    shards, the bar shown by the main process only: this process has saved `done` of its `mine` records and the
    plane's pending ones number `total`. The others are taken to progress alike, so the bar shows
    `done * total // mine`. Invariant: the bar never passes the plane's `total` and ends it at exactly `total`,
    each record counted once, whatever the shares (a process may hold one shard more than another, and the
    last shard may be short); a process with no shard of the plane counts it done at once."""

    def __init__(self, bar: tqdm, total: int, mine: int) -> None:
        self.bar, self.total, self.mine, self.done, self.shown = bar, total, mine, 0, 0
        if mine == 0:
            self._show(total)

    def add(self, records: int) -> None:
        """This process has saved `records` more of its own."""
        self.done += records
        self._show(self.total if self.done >= self.mine else self.done * self.total // self.mine)

    def _show(self, count: int) -> None:
        self.bar.update(count - self.shown)
        self.shown = count


def save_epoch(
    store: LogitStore,
    epoch: int,
    pending: list[int],
    teacher: Teacher,
    data: ReplayDataset,
    cfg: SaveConfig,
    state: PartialState,
    progress: tqdm,
) -> None:
    """Compute and commit this process's pending shards of one epoch."""
    m = store.manifest
    mine = my_shards(pending, state)
    share = PlaneProgress(progress, records_of(m, pending), records_of(m, mine))
    if not mine:
        return
    sampler = ShardBatchSampler(epoch, [m.shard_range(s) for s in mine], cfg.batch_size)
    with store.writer(epoch, mine) as writer:
        for batch in replay_loader(data, sampler, cfg.workers):
            ids = batch["id"].numpy()
            # The views mixed as training mixes them (`mix_batch`): the record is of the student's mixed view.
            images = mix_batch({k: v if k in MIX_KEYS else v.to(state.device) for k, v in batch.items()})["image"]
            seeds = record_seeds(m.global_seed, epoch, ids)
            if m.kind == "embeddings":
                embedding = teacher.image_embeddings(images, epoch, batch["id"])
                writer.write(ids, Embeddings(embedding.cpu().numpy().astype(np.float16), seeds))
            else:
                sparse = sparsify(teacher.logits(images, epoch, batch["id"]), m.k)
                mixing = (
                    {"partner": batch["partner"].numpy().astype(np.int32), "lam": batch["lam"].numpy()}
                    if m.mixing
                    else {}
                )
                records = sparse.to_records(m.num_classes, seeds, **mixing)
                writer.write(ids, records, labels=batch["label"].numpy(), kl=sparse.kl.cpu().numpy())
            share.add(len(ids))


def save_text_plane(
    store: LogitStore,
    teacher: Teacher,
    dataset: ImageDataset,
    cfg: SaveConfig,
    state: PartialState,
    progress: tqdm,
) -> None:
    """Compute and commit this process's pending shards of the text plane: one embedding per caption."""
    m, pending = store.manifest, store.pending_shards(store.text_plane)
    mine = my_shards(pending, state)
    share = PlaneProgress(progress, records_of(m, pending), records_of(m, mine))
    if not mine:
        return
    with store.writer(store.text_plane, mine) as writer:
        for start, stop in map(m.shard_range, mine):
            for first in range(start, stop, cfg.batch_size):
                ids = np.arange(first, min(first + cfg.batch_size, stop))
                tokens = teacher.tokenize([dataset.caption(int(i)) for i in ids]).to(state.device)
                embedding = teacher.text_embeddings(tokens).cpu().numpy().astype(np.float16)
                writer.write(ids, Embeddings(embedding, np.zeros(len(ids), np.uint32)))
                share.add(len(ids))


def check_replay(
    store: LogitStore, teacher: Teacher, data: ReplayDataset, n: int, device: torch.device
) -> dict[str, float]:
    """Re-run the teacher on n stored records (spread over epochs and ids) and compare."""
    m = store.manifest
    rng = np.random.default_rng(0)
    epochs = rng.integers(0, m.epochs, n)
    ids = rng.choice(m.num_samples, n, replace=n > m.num_samples)
    if m.kind == "embeddings":
        return _check_embeddings(store, teacher, data, epochs, ids, device)
    max_diff, agree = 0.0, 0
    for epoch, sample_id in zip(epochs.tolist(), ids.tolist(), strict=True):
        batch = data.batch([(epoch, sample_id)])
        sparse = sparsify(teacher.logits(batch["image"].to(device), epoch, batch["id"]), m.k)
        stored = store.read(epoch, [sample_id])
        max_diff = max(
            max_diff,
            float(np.abs(sparse.values.cpu().numpy().astype(np.float32) - stored.values.astype(np.float32)).max()),
        )
        agree += bool(np.array_equal(sparse.indices.cpu().numpy(), stored.indices.astype(np.int64)))
    return {"records": n, "max_abs_logit_diff": max_diff, "topk_index_agreement": agree / n}


def _check_embeddings(
    store: LogitStore,
    teacher: Teacher,
    data: ReplayDataset,
    epochs: np.ndarray,
    ids: np.ndarray,
    device: torch.device,
) -> dict[str, float]:
    """Largest difference between recomputed and stored image (per view) and text embeddings."""
    image_diff = 0.0
    for epoch, sample_id in zip(epochs.tolist(), ids.tolist(), strict=True):
        batch = data.batch([(epoch, sample_id)])
        fresh = teacher.image_embeddings(batch["image"].to(device), epoch).cpu().numpy()
        image_diff = max(image_diff, float(np.abs(fresh - store.read(epoch, [sample_id]).embedding).max()))
    tokens = teacher.tokenize([data.images.caption(int(i)) for i in ids]).to(device)
    fresh_text = teacher.text_embeddings(tokens).cpu().numpy()
    text_diff = float(np.abs(fresh_text - store.read_text(ids).embedding.astype(np.float32)).max())
    return {"records": len(ids), "max_abs_image_embedding_diff": image_diff, "max_abs_text_embedding_diff": text_diff}


def check_committed(store: LogitStore) -> None:
    """Refuse to resume over damaged committed shards (they would stay damaged, and the save say it is done):
    every committed shard is read back against its marker's block digests."""
    damaged = store.damaged_commits()
    if damaged:
        raise StoreDamagedError(
            f"{store.location}: committed records are damaged: {'; '.join(map(str, damaged))}; "
            f"run distill-store repair {store.location}, then this save again (it rewrites them)"
        )


def run(cfg: SaveConfig) -> LogitStore:
    # accelerate sets up gloo for several CPU processes only when told the run is on the CPU.
    state = PartialState(cpu=not torch.cuda.is_available())
    said = (cpu_threads(state.num_processes, state.device.type), launch_warning(state.num_processes))
    torch.manual_seed(cfg.seed)  # a teacher without a checkpoint gets the same weights on every process
    dataset = create_dataset(cfg.data, split="train", skip_unreadable=cfg.skip_unreadable)
    teacher = create_teacher(
        cfg.teacher, num_classes=dataset.num_classes or None, checkpoint=cfg.checkpoint, device=state.device
    )
    try:
        augmentation = load_augmentation(cfg.aug)
    except RecipeError as err:
        raise RecipeError(f"--aug: {err}") from None
    manifest = build_manifest(cfg, dataset, teacher, augmentation)
    if state.is_main_process:
        create_store(cfg.out, manifest)
    state.wait_for_everyone()
    store = create_store(cfg.out, manifest)
    check_committed(store)
    for line in said:  # once the inputs are checked: an input error stays the one line printed
        if line and state.is_main_process:
            print(line, file=sys.stderr)
    data = ReplayDataset(dataset, ReplayAugment(augmentation, cfg.img_size, cfg.seed))

    pending = {epoch: store.pending_shards(epoch) for epoch in range(manifest.planes)}
    done = manifest.planes * manifest.num_shards - sum(map(len, pending.values()))
    total = sum(records_of(manifest, shards) for shards in pending.values())
    if state.is_main_process and done:
        print(f"resuming {store.location}: {done} shard(s) already committed", file=sys.stderr)
    started = time.perf_counter()
    with tqdm(
        total=total, unit="rec", unit_scale=True, disable=not state.is_main_process, desc="saving", dynamic_ncols=True
    ) as progress:
        for epoch in range(cfg.epochs):
            progress.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}")
            save_epoch(store, epoch, pending[epoch], teacher, data, cfg, state, progress)
        if manifest.kind == "embeddings":
            progress.set_postfix(epoch="text")
            save_text_plane(store, teacher, dataset, cfg, state, progress)
    state.wait_for_everyone()
    if state.is_main_process:
        stats = store.refresh_statistics()
        store.add_provenance(range(manifest.planes), {"by": "distill-save-logits", "teacher": cfg.teacher})
        elapsed = time.perf_counter() - started
        print(
            f"saved {total:,} records in {elapsed:.1f} s ({total / max(elapsed, 1e-9):,.0f} records/s) to {store.location}"
        )
        print("statistics: " + ", ".join(f"{k}={_fmt(v)}" for k, v in stats.items() if v is not None))
        if cfg.check_replay:
            report = check_replay(store, teacher, data, cfg.check_replay, state.device)
            print("check-replay: " + ", ".join(f"{k}={_fmt(v)}" for k, v in report.items()))
    return store


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) and not math.isnan(value) else str(value)
