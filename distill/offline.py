"""Train from a store in your own loop: `StoreDataset` turns (an image dataset, a logits store) into batches of
the store's replayed views and the teacher's targets, for a plain PyTorch loop (no recipe, no Trainer).

    from distill.offline import StoreDataset

    data = StoreDataset("my_images/train", "runs/my_teacher.zarr")   # the images the store was saved for
    for epoch in range(4):
        for batch in data.loader(epoch, batch_size=64, shuffle=True, num_workers=2):
            images, log_p = batch["image"], data.log_targets(batch, temperature=4.0)

- A batch is `distill.loader.collate`'s, mixed as the store mixed (`distill.views.mix_batch`, on the CPU):
  "image" [B, 3, S, S] the views the teacher saw (S: the store's img_size), "id", "epoch" (the stored epoch
  the views are of), "label", and for mixed stores "partner", "partner_label" and "lam".
- `targets` / `log_targets` are the teacher's (log-)probabilities at a temperature, rebuilt from the stored top-k
  (`logit_store.sparse.rebuild_log_probs`; `StoreTeacher` reads them), on the images' device.
- Training epoch e replays stored epoch e % (the store's epochs), as `teacher.epochs: cycle` does in a recipe.
- Each process takes its own part of an epoch, as torch's DistributedSampler does: the epoch's order (shuffled
  from (seed, epoch) as distill-train shuffles, mixing pairs adjacent) cut into `world_size` contiguous parts
  that differ by at most one sample; rank and world_size come from torch.distributed when it is initialised.
  The parts are disjoint and cover the epoch; with `drop_last` every process takes the same number of batches.
- The same (store, epoch, batch size, shuffle, rank) gives the same batches for any number of DataLoader workers.

Bad input is one line, a `DistillError`: a dataset that is not the one the store was saved for (its fingerprint),
an embeddings store, a negative epoch, ids out of range, a rank outside the world, and an epoch not yet committed
(a store still being written: the line names the epoch and the record ranges still missing).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from logit_store import LogitStore, NotCommittedError, StoreInputError, open_store
from teachers.base import TeacherError
from teachers.store_teacher import StoreTeacher

from .augment import Augmentation
from .data import ImageDataset, create_dataset
from .errors import DatasetError
from .loader import PairedBatches, ReplayDataset, collate, epoch_order
from .views import ReplayAugment, mix_batch

__all__ = ["StoreDataset"]


class StoreDataset:
    """A store's views of `data` (a dataset spec or an `ImageDataset`) and its teacher's targets, in batches
    (see the module docstring). `data` must be the dataset the store was saved for (its fingerprint is checked);
    the views are made at the store's img_size unless `img_size` says otherwise."""

    def __init__(
        self,
        data: str | os.PathLike[str] | ImageDataset,
        store: str | os.PathLike[str] | LogitStore,
        *,
        img_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.teacher = StoreTeacher(store if isinstance(store, LogitStore) else open_store(store, read_only=True))
        self.store, m = self.teacher.store, self.teacher.store.manifest
        if m.kind != "logits":
            raise StoreInputError(f"store {self.store.location} holds {m.kind}; StoreDataset reads a logits store")
        self.images = data if isinstance(data, ImageDataset) else create_dataset(os.fspath(data), "train")
        mode = m.dataset.get("fingerprint_mode", "fast")
        if len(self.images) != m.num_samples or self.images.fingerprint(mode) != m.dataset.get("fingerprint"):
            from .plan import store_difference  # the plan's wording; imported only here, as it loads accelerate

            raise DatasetError(
                f"{self.images.spec}: not the dataset store {self.store.location} was saved for (store field "
                f"dataset.fingerprint differs){store_difference('dataset.fingerprint', m, self.images, {})}"
            )
        img_size = img_size or m.teacher.get("img_size")
        if not img_size or m.augmentation.get("recipe") is None:
            raise StoreInputError(
                f"store {self.store.location}: its manifest names no {'img_size' if not img_size else 'augmentation'}"
                "; StoreDataset replays a store saved by distill-save-logits"
            )
        augmentation = Augmentation.from_manifest(m.augmentation, f"store {self.store.location}")
        self.views = ReplayDataset(self.images, ReplayAugment(augmentation, img_size, m.global_seed))
        self.rank, self.world_size = _process(rank, world_size)
        self.num_classes, self.epochs, self.seed = m.num_classes, m.epochs, m.global_seed

    def __len__(self) -> int:
        return len(self.images)

    def view_epoch(self, epoch: int) -> int:
        """The stored epoch that training epoch `epoch` replays: epoch % the store's epochs."""
        if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer) or epoch < 0:
            raise StoreInputError(f"epoch {epoch!r}: training epochs are integers counted from 0")
        return int(epoch) % self.epochs

    def loader(
        self, epoch: int, batch_size: int, shuffle: bool = True, num_workers: int = 0, drop_last: bool = False
    ) -> DataLoader:
        """This process's batches of training epoch `epoch` (refused unless its stored epoch is committed)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise StoreInputError(f"batch_size {batch_size!r}: expected an integer >= 1")
        sampler = PartSampler(self, self._committed(self.view_epoch(epoch)), batch_size, shuffle, drop_last, epoch)
        return DataLoader(
            self.views,
            batch_sampler=PairedBatches(sampler, self.views.partners),
            num_workers=num_workers,
            collate_fn=collate_mixed,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator(),
        )

    def batch(self, epoch: int, ids: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of `ids` in training epoch `epoch`, as `loader` makes it."""
        ids_np = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids).reshape(-1)
        if ids_np.size == 0 or ids_np.dtype.kind not in "iu" or ids_np.min() < 0 or ids_np.max() >= len(self):
            raise StoreInputError(f"ids {_summary(ids_np)}: expected integers in [0, {len(self)}) ({self.images.spec})")
        view = self._committed(self.view_epoch(epoch))
        return self.views.batch([(view, int(i)) for i in ids_np])

    def log_targets(self, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """[B, num_classes] float32 log-probabilities of the teacher at `temperature` for the batch's (epoch, ids)."""
        if not temperature > 0:
            raise StoreInputError(f"temperature {temperature!r}: expected a number > 0")
        epochs = batch["epoch"].unique().tolist()
        if len(epochs) != 1:
            raise StoreInputError(f"a batch of one epoch holds its targets; this one holds epochs {epochs}")
        try:
            log_p = self.teacher.logits(batch["image"], epochs[0], batch["id"])
        except TeacherError as err:
            raise StoreInputError(str(err)) from None
        return (log_p / temperature).log_softmax(dim=1)

    def targets(self, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """[B, num_classes] float32 probabilities of the teacher at `temperature` (rows sum to 1)."""
        return self.log_targets(batch, temperature).exp()

    def _committed(self, view_epoch: int) -> int:
        pending = self.store.pending_shards(view_epoch)
        if pending:
            m = self.store.manifest
            ranges = ", ".join(f"[{a}, {b})" for a, b in map(m.shard_range, pending[:4]))
            more = f" and {len(pending) - 4} more shard(s)" if len(pending) > 4 else ""
            raise NotCommittedError(
                f"store {self.store.location}: epoch {view_epoch} is not committed yet (records {ranges}{more} of "
                f"[0, {m.num_samples}) are missing); let its distill-save-logits finish, or train on committed epochs"
            )
        return view_epoch


class PartSampler(Sampler[list[tuple[int, int]]]):
    """One process's batches of (stored epoch, id) of a training epoch (the module docstring says which)."""

    def __init__(
        self, data: StoreDataset, view_epoch: int, batch_size: int, shuffle: bool, drop_last: bool, epoch: int
    ) -> None:
        ids = np.arange(len(data))
        order = epoch_order(ids, data.seed, epoch, data.views.partners(view_epoch)) if shuffle else ids
        bounds = [len(ids) * r // data.world_size for r in range(data.world_size + 1)]
        self.part = order[bounds[data.rank] : bounds[data.rank + 1]]
        self.view_epoch, self.batch_size = view_epoch, batch_size
        self.batches = (len(ids) // data.world_size) // batch_size if drop_last else -(-len(self.part) // batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in range(self.batches):
            yield [(self.view_epoch, int(i)) for i in self.part[b * self.batch_size : (b + 1) * self.batch_size]]

    def __len__(self) -> int:
        return self.batches


def collate_mixed(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """`collate`, then `mix_batch`: the batch as the teacher saw it (a module-level function, for workers)."""
    return mix_batch(collate(items))


def _process(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): those given, else torch.distributed's when it is initialised, else (0, 1)."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = world_size if world_size is not None else torch.distributed.get_world_size() if initialised else 1
    rank = rank if rank is not None else torch.distributed.get_rank() if initialised else 0
    if not (isinstance(world, int) and isinstance(rank, int) and world >= 1 and 0 <= rank < world):
        raise StoreInputError(f"rank {rank!r} of world_size {world!r}: expected 0 <= rank < world_size")
    return rank, world


def _summary(ids: np.ndarray) -> str:
    return str(ids.tolist()) if ids.size <= 8 else f"[{ids.min()}..{ids.max()}] ({ids.size} ids)"
