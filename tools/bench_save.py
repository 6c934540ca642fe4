"""Wall time of `distill-save-logits` against the same teacher's forward passes alone.

    uv run python tools/bench_save.py [--teacher timm:resnet18] [--img-size 64] [--epochs 2] [--repeats 3]

Both sides build the dataset and the teacher, load the same replayed views in the same
batches and run the teacher; the save also sparsifies, checks, writes, checksums and
commits the records. The ratio save / forward-only is the cost of keeping the logits
(target <= 1.05x). Runs alternate and the best of each is kept, since the machine is noisy.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from distill.augment import load_augmentation
from distill.data import create_dataset
from distill.loader import ReplayDataset, ShardBatchSampler, replay_loader
from distill.save import run
from distill.save_config import SaveConfig
from distill.views import ReplayAugment, mix_batch
from logit_store import Manifest
from teachers import create_teacher


def forward_only(cfg: SaveConfig) -> int:
    """The teacher over the same views and batches as the save, keeping nothing."""
    torch.manual_seed(cfg.seed)
    dataset = create_dataset(cfg.data, split="train")
    teacher = create_teacher(cfg.teacher, num_classes=dataset.num_classes, checkpoint=cfg.checkpoint)
    layout = Manifest(num_samples=len(dataset), num_classes=dataset.num_classes, k=cfg.k, epochs=cfg.epochs)
    data = ReplayDataset(dataset, ReplayAugment(load_augmentation(cfg.aug), cfg.img_size, cfg.seed))
    records = 0
    for epoch in range(cfg.epochs):
        sampler = ShardBatchSampler(epoch, [layout.shard_range(s) for s in range(layout.num_shards)], cfg.batch_size)
        for batch in replay_loader(data, sampler, cfg.workers):
            teacher.logits(mix_batch(batch)["image"], epoch, batch["id"])
            records += len(batch["id"])
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="timm:resnet18")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-save-"))
    base = dict(
        teacher=args.teacher,
        data="digits",
        epochs=args.epochs,
        k=args.k,
        img_size=args.img_size,
        batch_size=args.batch_size,
        aug="tinyvit",
    )
    create_dataset("digits")  # build the digits folder once, outside the timings
    forward, save = [], []
    try:
        for i in range(args.repeats):
            start = time.perf_counter()
            records = forward_only(SaveConfig(out="", **base))
            forward.append(time.perf_counter() - start)
            start = time.perf_counter()
            run(SaveConfig(out=str(root / f"store-{i}.zarr"), **base))
            save.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    f, s = min(forward), min(save)
    print(
        f"\n{records:,} records ({args.epochs} epochs of digits), {args.teacher} at {args.img_size} px, batch {args.batch_size}, k={args.k}"
    )
    print("| run | best wall s | records/s | vs forward-only |")
    print("|---|---|---|---|")
    print(f"| teacher forward passes alone | {f:.2f} | {records / f:,.0f} | 1.00x |")
    print(f"| distill-save-logits | {s:.2f} | {records / s:,.0f} | {s / f:.3f}x |")


if __name__ == "__main__":
    main()
