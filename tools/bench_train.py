"""Training throughput of one student: (a) label-only, (b) from a logit store, (c) with a live teacher.

All three are `distill-train` runs of the same student on the same data, views and
batches; only the teacher source differs. Rounds interleave a, b, c so machine noise
hits all three alike; the figures are medians of the per-round ratios.

    python tools/bench_train.py [--student tiny_vit_5m_224] [--teacher resnet50] [--epochs 2] [--rounds 3]

Target: (b)/(a) >= 0.95 (the store costs almost nothing); (c)/(a) is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

from teachers import create_teacher

ROOT = Path(__file__).resolve().parent.parent


def distill(program: str, *args: str) -> None:
    """A console script of the environment: distill-train or distill-save-logits."""
    script = str(Path(sys.executable).parent / program)
    subprocess.run([script, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def train(recipe: str, out: Path, sets: dict[str, object]) -> float:
    """images/s of one run (time in training steps: data, forward, teacher, backward, update)."""
    args = [a for k, v in (sets | {"output_dir": str(out)}).items() for a in ("--set", f"{k}={v}")]
    distill("distill-train", f"recipes/configs/{recipe}", *args)
    return json.loads((out / "summary.json").read_text())["images_per_s"]


def store_batch_ms(store: Path, batch_size: int, epochs: int) -> float:
    """What the store adds to a step: read + rebuild of one batch of shuffled ids (epochs warm, as in training)."""
    teacher = create_teacher(f"store:{store}")
    n = teacher.store.manifest.num_samples
    images = torch.zeros(batch_size, 3, 1, 1)
    batches = [torch.randperm(n)[:batch_size] for _ in range(200)]
    for epoch in range(epochs):
        teacher.logits(images, epoch, batches[0])
    started = time.perf_counter()
    for i, ids in enumerate(batches):
        teacher.logits(images, i % epochs, ids)
    return (time.perf_counter() - started) / len(batches) * 1e3


def in_process_step_ratio(store: Path, student: str, kwargs: dict, batch_size: int, rounds: int = 6) -> float:
    """Median time ratio of training steps with the store's KD loss vs the label loss: one process, one model,
    alternating blocks of 10 steps on random batches of one epoch (as in training), so only the loss path differs."""
    from distill.method import create_method
    from distill.recipe import load_recipe_file, parse_recipe

    teacher = create_teacher(f"store:{store}")
    n, classes = teacher.store.manifest.num_samples, teacher.num_classes
    model = timm.create_model(student, num_classes=classes, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters())
    methods = [
        parse_recipe(load_recipe_file(ROOT / "recipes/configs" / f"{name}_digits.yaml"))
        for name in ("supervised", "tinyvit")
    ]
    modes = [(create_method(recipe, classes), source) for recipe, source in zip(methods, (None, teacher), strict=True)]
    seconds: list[list[float]] = [[], []]
    for _ in range(rounds):
        for (method, source), spent in zip(modes, seconds, strict=True):
            started = time.perf_counter()
            for _ in range(10):
                batch = {"image": torch.randn(batch_size, 3, 32, 32), "id": torch.randperm(n)[:batch_size],
                         "epoch": torch.zeros(batch_size, dtype=torch.int64),
                         "label": torch.randint(0, classes, (batch_size,)), "lam": torch.ones(batch_size)}  # fmt: skip
                batch["partner_label"] = batch["label"]
                method.loss(model, batch, source)["loss"].backward()
                optimizer.step()
                optimizer.zero_grad()
            spent.append(time.perf_counter() - started)
    return statistics.median(a / b for a, b in zip(*seconds, strict=True))


def params(name: str) -> float:
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name, num_classes=10).parameters()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="tiny_vit_5m_224")
    parser.add_argument("--teacher", default="resnet50", help="a timm model several times the student's size")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ab-rounds", type=int, default=6, help="rounds of the in-process A/B (blocks of 10 steps)")
    parser.add_argument("--ab-only", action="store_true", help="the store and the in-process A/B only, no whole runs")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    store = root / "teacher.zarr"
    # Throughput only: the teacher's weights do not matter, so it is saved from its random init.
    distill("distill-save-logits", "--teacher", f"timm:{args.teacher}", "--data", "digits", "--out", str(store),
            "--epochs", str(args.epochs), "--k", "5", "--aug", "basic", "--img-size", "32")  # fmt: skip
    kwargs = {"window_sizes": (8, 4, 2, 1)} if args.student.startswith("tiny_vit") else {}
    if args.ab_only:
        ratio = in_process_step_ratio(store, args.student, kwargs, args.batch_size, args.ab_rounds)
        print(
            f"one process, same model and batches, {args.ab_rounds} rounds: label-loss steps / store-KD steps = "
            f"{ratio:.3f}"
        )
        shutil.rmtree(root, ignore_errors=True)
        return
    window = "{window_sizes: [8, 4, 2, 1]}" if args.student.startswith("tiny_vit") else "{}"
    common = {"student.model": args.student, "student.kwargs": window, "epochs": args.epochs,
              "batch_size": args.batch_size, "data.img_size": 32, "eval.every": args.epochs}  # fmt: skip
    modes = {
        "a_labels": ("supervised_digits.yaml", common),
        "b_store": ("tinyvit_digits.yaml", common | {"teacher.source": f"store:{store}"}),
        "c_live": ("tinyvit_digits.yaml", common | {"teacher.source": f"timm:{args.teacher}"}),
    }
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode, (recipe, sets) in modes.items():
            rates[mode].append(train(recipe, root / f"{mode}_{r}", sets))
            print(f"round {r + 1}/{args.rounds} {mode}: {rates[mode][-1]:.1f} images/s", flush=True)
    per_round = [f"{b / a:.3f}" for a, b in zip(rates["a_labels"], rates["b_store"], strict=True)]
    store_ratio = statistics.median(b / a for a, b in zip(rates["a_labels"], rates["b_store"], strict=True))
    live_ratio = statistics.median(c / a for a, c in zip(rates["a_labels"], rates["c_live"], strict=True))
    print(
        f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"student {args.student} ({params(args.student):.1f}M), teacher {args.teacher} ({params(args.teacher):.1f}M), "
          f"digits 32 px, batch {args.batch_size}, {args.epochs} epochs x {args.rounds} rounds")  # fmt: skip
    print("| run | images/s (median) |\n|---|---|")
    for mode in modes:
        print(f"| {mode} | {statistics.median(rates[mode]):.1f} |")
    step_ms = 1e3 * args.batch_size / statistics.median(rates["b_store"])
    print(f"\nstore read + rebuild: {store_batch_ms(store, args.batch_size, args.epochs):.3f} ms per batch "
          f"of {args.batch_size}, against a {step_ms:.0f} ms training step")  # fmt: skip
    print(f"(b)/(a) store / label-only = {store_ratio:.3f}  (target >= 0.95); per round {', '.join(per_round)}")
    ratio = in_process_step_ratio(store, args.student, kwargs, args.batch_size, args.ab_rounds)
    print(f"one process, same model and batches: label-loss steps / store-KD steps = {ratio:.3f}")
    print(f"(c)/(a) live / label-only  = {live_ratio:.3f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
