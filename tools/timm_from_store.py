"""Train a timm model from a logit store with timm's own building blocks: `timm.create_model`,
`timm.optim.create_optimizer_v2`, `timm.scheduler.create_scheduler_v2` (stepped per update) and
`timm.utils.accuracy`; the batches and the teacher's targets come from `distill.offline.StoreDataset`.

The loss is KL(teacher || student) at --temperature times T^2, plus --ce-weight times cross-entropy on the labels
(mixed as the views are: lam on the sample's label, 1 - lam on its partner's). timm's own
`timm.task.LogitDistillationTask` is not used: it runs a teacher module on every batch's images, while a store
answers by (epoch, sample ids) and holds no module to run.

    python tools/timm_from_store.py --data my_images/train --store runs/my_teacher.zarr --val my_images/val

prints a progress line per epoch (stderr) and, last, one JSON line (stdout): the student's top-1 on --val (if
given) and where its weights went (--out, safetensors). Bad input is one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads after the arguments are parsed: --help and their errors come first
    import torch

    from distill.offline import StoreDataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="the images the store was saved for (a folder, csv:FILE, digits)")
    p.add_argument("--store", required=True, help="the logit store (a path or an fsspec URL)")
    p.add_argument("--val", help="labelled images to score the student on, at the store's size (whole image)")
    p.add_argument("--model", default="resnet18", help="any timm model name (default: resnet18)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs; past the store's they cycle (10)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step and process (64)")
    p.add_argument("--opt", default="adamw", help="timm optimizer name (adamw)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (0.001)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="weight decay (0.05)")
    p.add_argument("--sched", default="cosine", help="timm scheduler name (cosine)")
    p.add_argument("--warmup-epochs", type=int, default=0, help="epochs of linear warm-up (0)")
    p.add_argument("--temperature", type=float, default=4.0, help="KD temperature T (4)")
    p.add_argument("--ce-weight", type=float, default=0.5, help="weight of cross-entropy on the labels (0.5)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the student's initial weights (0)")
    p.add_argument("--out", default="timm_student.safetensors", help="the student's weights (safetensors)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature <= 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    return args


def train(args: argparse.Namespace) -> dict[str, float | str]:
    import timm
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from distill.offline import StoreDataset

    data = StoreDataset(args.data, args.store)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, num_classes=data.num_classes)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    steps = len(data.loader(0, args.batch_size))
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        step_on_epochs=False, updates_per_epoch=steps,
    )  # fmt: skip
    T = args.temperature
    for epoch in range(args.epochs):
        model.train()
        total = 0.0
        for i, batch in enumerate(data.loader(epoch, args.batch_size, shuffle=True, num_workers=args.workers)):
            logits = model(batch["image"])
            kd = F.kl_div(
                F.log_softmax(logits / T, dim=1), data.log_targets(batch, T), log_target=True, reduction="batchmean"
            )
            lam = batch["lam"]
            ce = lam * F.cross_entropy(logits, batch["label"], reduction="none") + (1 - lam) * F.cross_entropy(
                logits, batch["partner_label"], reduction="none"
            )
            loss = kd * T * T + args.ce_weight * ce.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step_update(epoch * steps + i + 1)
            total += loss.item()
        scheduler.step(epoch + 1)
        print(f"epoch {epoch}: loss {total / max(steps, 1):.4f}", file=sys.stderr)
    save_file(model.state_dict(), args.out)
    result: dict[str, float | str] = {"model": args.model, "weights": args.out}
    if args.val:
        result["top1"] = evaluate(model, data, args.val)
    return result


def evaluate(model: torch.nn.Module, data: StoreDataset, val: str) -> float:
    """Top-1 (percent) on `val`, each image whole at the store's size, normalised as the store's views."""
    import torch
    from timm.utils import accuracy
    from torch.utils.data import DataLoader

    from distill.data import create_dataset
    from distill.loader import ReplayDataset, collate
    from distill.views import EvalView

    replay = data.views.augment
    aug = replay.augmentation
    view = EvalView(replay.img_size, 1.0, "bilinear", aug.mean, aug.std)
    images = ReplayDataset(create_dataset(val, "val"), view)
    loader = DataLoader(images, batch_size=128, sampler=[(0, i) for i in range(len(images))], collate_fn=collate)
    model.eval()
    correct, seen = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            top1 = accuracy(model(batch["image"]), batch["label"], topk=(1,))[0]
            correct, seen = correct + top1.item() * len(batch["id"]), seen + len(batch["id"])
    return round(correct / seen, 2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from logit_store.errors import DistillError

    try:
        result = train(args)
    except DistillError as err:
        print(f"timm_from_store: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
