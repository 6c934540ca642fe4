"""Replayed views in batches: a dataset indexed by (epoch, id) and samplers that yield those pairs.

The epoch travels with every index, so DataLoader workers (persistent or not) need no
state to replay a view. With mixing, a batch also holds the view of every sample's partner
(`with_partners`: the training sampler keeps pairs together, so it rarely needs one more);
`collate` keeps the views unmixed and `distill.views.mix_batch` mixes them, on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import ImageDataset
from .views import EvalView, ReplayAugment, mix_batch, pixel_box


class ReplayDataset(Dataset):
    """`dataset[(epoch, id)]` -> the replayed view of sample `id` in `epoch`, with its label,
    and the mixing partner's label and lambda; with a `tokenizer` (image-text data) also the
    caption's tokens as "text"."""

    def __init__(
        self,
        images: ImageDataset,
        augment: ReplayAugment | EvalView,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> None:
        self.images, self.augment, self.tokenizer = images, augment, tokenizer

    def __len__(self) -> int:
        return len(self.images)

    def partners(self, epoch: int) -> np.ndarray | None:
        """Every id's mixing partner in `epoch`; None when the views are not mixed."""
        return self.augment.partners(epoch, len(self.images))

    def batch(self, indices: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """The collated batch of `indices` with its views mixed (on the CPU): as training and the save see them."""
        return mix_batch(collate([self[i] for i in with_partners(indices, self.partners)]))

    def __getitem__(self, index: tuple[int, int] | tuple[int, int, bool]) -> dict[str, Any]:
        """Index (epoch, id), or (epoch, id, True) for a partner's view that a batch only mixes in (`with_partners`)."""
        epoch, sample_id, *extra = index
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
            "box": mix.box,
            "extra": bool(extra and extra[0]),
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


def with_partners(
    batch: Sequence[tuple[int, int]], partners: Callable[[int], np.ndarray | None]
) -> list[tuple[int, int] | tuple[int, int, bool]]:
    """`batch` followed by (epoch, id, True) for each mixing partner that is not in it (once each, in order of
    need); `partners(epoch)` gives every id's partner, or None when the views are not mixed."""
    batch = [tuple(index) for index in batch]
    present, extras = set(batch), []
    for epoch, sample_id in batch:
        table = partners(epoch)
        if table is None:
            continue
        partner = (epoch, int(table[sample_id]))
        if partner not in present:
            present.add(partner)
            extras.append((*partner, True))
    return [*batch, *extras]


class PairedBatches(Sampler[list[tuple[int, int] | tuple[int, int, bool]]]):
    """The batches of `batches` (any batch sampler of (epoch, id) lists), each with its partners' views added
    (`with_partners`). It iterates `batches` afresh each time, so a sampler moved on by `set_epoch` serves a
    DataLoader built once."""

    def __init__(self, batches: Sampler | Sequence, partners: Callable[[int], np.ndarray | None]) -> None:
        self.batches, self.partners = batches, partners

    def __iter__(self) -> Iterator[list[tuple[int, int] | tuple[int, int, bool]]]:
        for batch in self.batches:
            yield with_partners(batch, self.partners)

    def __len__(self) -> int:
        return len(self.batches)


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A batch of the samples among `items`, then the views of partners only mixed in ("extra" items).

    "image" holds every item's unmixed view, the samples' first. Where a sample is mixed, the batch also says
    how (`distill.views.mix_batch` does it): "partner_row", "cutmix" and the CutMix "box" in pixels."""
    members = [it for it in items if not it.get("extra")]
    rows = members + [it for it in items if it.get("extra")]
    out = {"image": torch.stack([it["image"] for it in rows])}
    if "text" in members[0]:
        out["text"] = torch.stack([it["text"] for it in members])
    for key in ("id", "epoch", "label", "partner", "partner_label"):
        out[key] = torch.tensor([it[key] for it in members], dtype=torch.int64)
    out["lam"] = torch.tensor([it["lam"] for it in members], dtype=torch.float32)
    if any(it["partner"] != it["id"] for it in members):
        row_of = {(it["epoch"], it["id"]): r for r, it in reversed(list(enumerate(rows)))}
        missing = [it["partner"] for it in members if (it["epoch"], it["partner"]) not in row_of]
        if missing:
            raise ValueError(
                f"collate: the views of mixing partners {missing[:5]} are not in the batch; "
                "batch ids with distill.loader.with_partners (replay_loader and ReplayDataset.batch do)"
            )
        size = rows[0]["image"].shape[-1]
        out["partner_row"] = torch.tensor([row_of[(it["epoch"], it["partner"])] for it in members])
        out["cutmix"] = torch.tensor([it.get("box") is not None for it in members])
        out["box"] = torch.tensor(
            [pixel_box(it["box"], size) if it.get("box") is not None else (0, 0, 0, 0) for it in members]
        )
    return out


def replay_loader(
    dataset: ReplayDataset, batch_sampler: Sampler | Sequence, workers: int, persistent: bool = False
) -> DataLoader:
    """A DataLoader of `batch_sampler`'s batches of `dataset`, with the partners' views they mix. `persistent`: keep
    the worker processes between epochs (the batch sampler then moves on by itself: `TrainBatchSampler.set_epoch`);
    batches go to pinned memory where there is a GPU."""
    return DataLoader(
        dataset,
        batch_sampler=PairedBatches(batch_sampler, dataset.partners),
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=persistent and workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator(),  # its own: drawing worker seeds from the global RNG would shift a resume
    )


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's micro-batches of one training epoch, as (view epoch, id) pairs.

    The epoch's order is a permutation of the training ids drawn from (seed, epoch); optimizer
    step s takes positions order[s*B:(s+1)*B] for the global batch size B, cut into `accum`
    micro-batches, each split across the processes. So the samples of every step are the same
    for any process count, and a resumed run starts at `start_step` with exactly the batches it
    would have had. The last incomplete global batch is dropped. `ids` are the training ids (an
    int: all of range(ids)).

    With mixing, `partners(view_epoch)` gives every id's partner (`ReplayDataset.partners`) and the order is a
    permutation of pairs: both members of a pair are adjacent, so an even micro-batch holds whole pairs (an odd
    one, e.g. 6 over 2 processes, splits at most one pair, whose partner view `with_partners` adds). Ids whose
    partner is not trained are paired with each other in id order; an odd one out comes last (dropped with the
    last incomplete batch, as B must be even). `set_epoch` moves the sampler to another epoch, so one DataLoader
    serves the whole run.
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
        partners: Callable[[int], np.ndarray | None] | None = None,
    ) -> None:
        if batch_size % (world * accum):
            raise ValueError(f"batch_size {batch_size} is not divisible by processes x grad_accum = {world * accum}")
        self.ids = np.arange(ids) if isinstance(ids, int) else np.asarray(ids)
        self.micro = batch_size // (world * accum)
        self.steps = len(self.ids) // batch_size
        self.batch_size, self.seed, self.rank, self.world, self.accum = batch_size, seed, rank, world, accum
        self.partners = partners
        self.set_epoch(epoch, view_epoch, start_step)

    def set_epoch(self, epoch: int, view_epoch: int, start_step: int = 0) -> None:
        """Serve training epoch `epoch` (views of `view_epoch`) from optimizer step `start_step`."""
        self.epoch, self.view_epoch, self.start_step = epoch, view_epoch, start_step
        table = self.partners(view_epoch) if self.partners is not None else None
        if table is not None and self.batch_size % 2:
            raise ValueError(f"batch_size {self.batch_size} is odd: mixed views come in pairs, a batch holds both")
        self.order = epoch_order(self.ids, self.seed, epoch, table)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for m in range(self.start_step * self.accum, self.steps * self.accum):
            first = (m * self.world + self.rank) * self.micro
            yield [(self.view_epoch, int(i)) for i in self.order[first : first + self.micro]]

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum


def epoch_order(ids: np.ndarray, seed: int, epoch: int, partners: np.ndarray | None) -> np.ndarray:
    """`ids` in training epoch `epoch`'s order, a permutation drawn from (seed, epoch). With mixing (`partners`:
    every id's partner in the epoch's views) a permutation of pairs, both members adjacent; ids whose partner is
    not among `ids` are paired with each other in id order, an odd one out last (`TrainBatchSampler`)."""
    rng = np.random.default_rng([seed, epoch])
    if partners is None:
        return ids[rng.permutation(len(ids))]
    trained = np.zeros(len(partners), bool)
    trained[ids] = True
    partner = partners[ids]
    paired = (partner != ids) & trained[partner]
    first = ids[paired & (partner > ids)]
    alone = np.sort(ids[~paired])
    even = len(alone) // 2 * 2
    units = np.concatenate([np.stack([first, partners[first]], 1), alone[:even].reshape(-1, 2)])
    return np.concatenate([units[rng.permutation(len(units))].reshape(-1), alone[even:]])
