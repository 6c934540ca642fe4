"""Replayed views in batches: a dataset indexed by (epoch, id) and samplers that yield those pairs.

The epoch travels with every index, so DataLoader workers (persistent or not) need no
state to replay a view.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import ImageDataset
from .views import ReplayAugment


class ReplayDataset(Dataset):
    """`dataset[(epoch, id)]` -> the replayed view of sample `id` in `epoch`, with its label,
    and the mixing partner's label and lambda; with a `tokenizer` (image-text data) also the
    caption's tokens as "text"."""

    def __init__(
        self,
        images: ImageDataset,
        augment: ReplayAugment,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> None:
        self.images, self.augment, self.tokenizer = images, augment, tokenizer

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: tuple[int, int]) -> dict[str, Any]:
        epoch, sample_id = index
        x, mix = self.augment(self.images.load, sample_id, epoch, len(self.images))
        text = {} if self.tokenizer is None else {"text": self.tokenizer([self.images.caption(sample_id)])[0]}
        return text | {
            "image": x,
            "id": sample_id,
            "epoch": epoch,
            "label": int(self.images.labels[sample_id]),
            "partner": mix.partner,
            "partner_label": int(self.images.labels[mix.partner]),
            "lam": mix.lam,
        }


class ShardBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (epoch, id) that never cross a shard boundary, each shard cut from its start.

    So a shard's batches are the same whichever process computes it and whether or not
    the save was resumed: the teacher sees identical batches, hence identical numbers.
    """

    def __init__(self, epoch: int, shard_ranges: Sequence[tuple[int, int]], batch_size: int) -> None:
        self.epoch, self.shard_ranges, self.batch_size = epoch, list(shard_ranges), batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for start, stop in self.shard_ranges:
            for first in range(start, stop, self.batch_size):
                yield [(self.epoch, i) for i in range(first, min(first + self.batch_size, stop))]

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for start, stop in self.shard_ranges)


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    out = {"image": torch.stack([it["image"] for it in items])}
    if "text" in items[0]:
        out["text"] = torch.stack([it["text"] for it in items])
    for key in ("id", "epoch", "label", "partner", "partner_label"):
        out[key] = torch.tensor([it[key] for it in items], dtype=torch.int64)
    out["lam"] = torch.tensor([it["lam"] for it in items], dtype=torch.float32)
    return out


def replay_loader(dataset: ReplayDataset, batch_sampler: Sampler, workers: int) -> DataLoader:
    return DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate, persistent_workers=False
    )


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's micro-batches of one training epoch, as (view epoch, id) pairs.

    The epoch's order is a permutation of the training ids drawn from (seed, epoch); optimizer
    step s takes positions order[s*B:(s+1)*B] for the global batch size B, cut into `accum`
    micro-batches, each split across the processes. So the samples of every step are the same
    for any process count, and a resumed run starts at `start_step` with exactly the batches it
    would have had. The last incomplete global batch is dropped. `ids` are the training ids (an
    int: all of range(ids)).
    """

    def __init__(
        self,
        ids: int | np.ndarray,
        batch_size: int,
        epoch: int,
        view_epoch: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        accum: int = 1,
        start_step: int = 0,
    ) -> None:
        if batch_size % (world * accum):
            raise ValueError(f"batch_size {batch_size} is not divisible by processes x grad_accum = {world * accum}")
        ids = np.arange(ids) if isinstance(ids, int) else np.asarray(ids)
        self.micro = batch_size // (world * accum)
        self.steps = len(ids) // batch_size
        self.order = ids[np.random.default_rng([seed, epoch]).permutation(len(ids))]
        self.view_epoch, self.rank, self.world, self.accum, self.start_step = view_epoch, rank, world, accum, start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for m in range(self.start_step * self.accum, self.steps * self.accum):
            first = (m * self.world + self.rank) * self.micro
            yield [(self.view_epoch, int(i)) for i in self.order[first : first + self.micro]]

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum
