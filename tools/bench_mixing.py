"""Per-image cost of the training input pipeline with Mixup/CutMix: ours against timm's, on real photos.

The photos are scikit-learn's two sample images (`sklearn.datasets.load_sample_images()`, 427 x 640),
cut into ImageNet-sized JPEG files (500 x 375 crops at shifted offsets, alternately mirrored). One
thread. Each mode decodes and augments every image of a batch of `--batch-size`, then mixes the batch:

    timm        timm's `create_transform(224, is_training=True, auto_augment=rand-m9-mstd0.5-inc1,
                re_prob=0.25, re_mode=pixel, interpolation=bicubic)` per image, timm's `Mixup(0.8, 1.0)`
                on the batch (the TinyViT reference's training pipeline)
    ours        replayed views of the tinyvit-mix preset (the same views): `TrainBatchSampler` pairs,
                `replay_loader` (views made once, unmixed), `mix_batch` and `mixed_targets` on the batch
    ours-nomix  the tinyvit preset: the same views, not mixed
    per-sample  what ours did before pairs: each sample's view mixed with a partner drawn from the whole
                dataset, whose image is decoded and augmented again (emulated with today's views)

Both mixings run on the CPU here (on a GPU machine both would run on the device). Modes interleave
round by round; figures are medians over rounds, in ms per image; the ratios are timm's time over
the mode's (throughput relative to timm: the target for `ours` is >= 0.9).

    python tools/bench_mixing.py [--files 64] [--rounds 5] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = 224
CROP = (500, 375)  # width, height: ImageNet-like


def make_photos(root: Path, files: int) -> Path:
    """`files` JPEGs cut from scikit-learn's sample photos, in one class folder per photo."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    per_photo = files // len(photos.images)
    for name, array in zip(photos.filenames, photos.images, strict=True):
        image = Image.fromarray(array)
        (root / Path(name).stem).mkdir(parents=True, exist_ok=True)
        h, w = array.shape[:2]
        for k in range(per_photo):
            left = round(k * (w - CROP[0]) / max(per_photo - 1, 1))
            top = round((k * 7 % per_photo) * (h - CROP[1]) / max(per_photo - 1, 1))
            crop = image.crop((left, top, left + CROP[0], top + CROP[1]))
            if k % 2:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(root / Path(name).stem / f"{k:04d}.jpg", quality=90)
    return root


def timm_pipeline(root: Path, batch_size: int) -> Callable[[int], int]:
    from timm.data import Mixup, create_transform
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(root))
    transform = create_transform(
        SIZE, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel",
        interpolation="bicubic",
    )  # fmt: skip
    folder.transform = transform
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=len(folder.classes))
    order = np.random.default_rng(0).permutation(len(folder))

    def run(epoch: int) -> int:
        done = 0
        for first in range(0, len(order) - batch_size + 1, batch_size):
            items = [folder[int(i)] for i in order[first : first + batch_size]]
            x = torch.stack([img for img, _ in items])  # (ImageFolder decodes and transforms)
            y = torch.tensor([label for _, label in items])
            x, y = mixup(x, y)
            done += len(x)
        return done

    return run


def ours_pipeline(root: Path, batch_size: int, preset: str) -> Callable[[int], int]:
    from distill.augment import PRESETS
    from distill.data import create_dataset
    from distill.loader import ReplayDataset, TrainBatchSampler, replay_loader
    from distill.losses import mixed_targets
    from distill.views import ReplayAugment, mix_batch

    dataset = create_dataset(str(root), "train")
    data = ReplayDataset(dataset, ReplayAugment(PRESETS[preset], SIZE, 0))
    sampler = TrainBatchSampler(len(dataset), batch_size, 0, 0, seed=0, partners=data.partners)
    loader = replay_loader(data, sampler, workers=0)

    def run(epoch: int) -> int:
        sampler.set_epoch(epoch, epoch)
        done = 0
        for batch in loader:
            batch = mix_batch(batch)
            mixed_targets(batch, dataset.num_classes)
            done += len(batch["image"])
        return done

    return run


def per_sample_pipeline(root: Path, batch_size: int) -> Callable[[int], int]:
    """Before pairs: every sample decoded and augmented its partner (drawn from the whole dataset) again."""
    from distill.augment import PRESETS, draw_mix, draw_view
    from distill.data import create_dataset
    from distill.views import ReplayAugment

    dataset = create_dataset(str(root), "train")
    recipe = PRESETS["tinyvit-mix"]
    augment = ReplayAugment(recipe, SIZE, 0)
    n = len(dataset)

    def view(i: int, epoch: int) -> torch.Tensor:
        image = dataset.load(i)
        return augment.view(image, draw_view(recipe, augment.seed(epoch, i), *image.size))

    def run(epoch: int) -> int:
        done = 0
        rng = np.random.default_rng(epoch)
        for first in range(0, n - batch_size + 1, batch_size):
            rows = []
            for i in range(first, first + batch_size):
                partner = int((i + 1 + rng.integers(n - 1)) % n)
                mix = draw_mix(recipe, augment.seed(epoch, i), i, partner)
                x = view(i, epoch)
                if mix.partner != i:
                    x = x.mul_(mix.lam).add_(view(mix.partner, epoch), alpha=1 - mix.lam)
                rows.append(x)
            torch.stack(rows)
            done += len(rows)
        return done

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = make_photos(Path(tempfile.mkdtemp(prefix="bench-mixing-")), args.files)
    modes = {
        "timm": timm_pipeline(root, args.batch_size),
        "ours": ours_pipeline(root, args.batch_size, "tinyvit-mix"),
        "ours-nomix": ours_pipeline(root, args.batch_size, "tinyvit"),
        "per-sample": per_sample_pipeline(root, args.batch_size),
    }
    for run in modes.values():
        run(0)  # warm: imports, file cache
    ms: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode, run in modes.items():
            started = time.perf_counter()
            images = run(r + 1)
            ms[mode].append((time.perf_counter() - started) * 1e3 / images)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {v[-1]:.2f} ms" for m, v in ms.items()), flush=True)
    print(f"\n{platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}; {args.files} JPEGs "
          f"{CROP[0]}x{CROP[1]} from sklearn's sample photos, {SIZE} px, batches of {args.batch_size}, "
          f"{args.rounds} rounds")  # fmt: skip
    print("| pipeline | ms per image (median) | timm / it (median of rounds) |\n|---|---|---|")
    for mode in modes:
        ratio = statistics.median(t / o for t, o in zip(ms["timm"], ms[mode], strict=True))
        print(f"| {mode} | {statistics.median(ms[mode]):.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
