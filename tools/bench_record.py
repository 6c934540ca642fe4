"""The cost of recording a live teacher while a student trains (`teacher.record`).

In one process, the same live-teacher `distill-train` run (TinyViT-5M student, a ResNet teacher, the digits)
with and without `teacher.record`, alternating A, B, B, A, ... so machine noise hits both alike; each run's wall
time counts everything the recording adds (sparsifying every batch, the epoch-end gather, the computed dropped
batch, the writes and commits, the store's creation). Reports the per-pair ratios (recording / not): median
and spread; and, less sensitive to a shared machine's load, the share of each recording run's time spent in the
recording's own code (`Recorder.keep`, `Recorder.end_epoch`, `open_record_store`).

    python tools/bench_record.py [--teacher resnet18] [--epochs 1] [--pairs 3]

Target: median ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from distill.recipe import load_recipe_file
from distill.run import run_recipe

ROOT = Path(__file__).resolve().parent.parent


SPENT = {"seconds": 0.0}  # time inside the recording's own code in the current run (see `timed`)


def timed(owner: object, name: str) -> None:
    """Count the time spent in `owner.name` (a recording step) into SPENT."""
    inner = getattr(owner, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SPENT["seconds"] += time.perf_counter() - started

    setattr(owner, name, wrapper)


def one_run(base: dict, work: Path, name: str, record: bool, k: int) -> float:
    """Wall seconds of one whole run (plan, training, evaluation, its recording)."""
    recipe = {**base, "output_dir": str(work / name), "teacher": dict(base["teacher"])}
    if record:
        recipe["teacher"]["record"] = {"path": str(work / f"{name}.zarr"), "k": k}
    SPENT["seconds"] = 0.0
    started = time.perf_counter()
    run_recipe(recipe)
    seconds = time.perf_counter() - started
    shutil.rmtree(work / name)
    shutil.rmtree(work / f"{name}.zarr", ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_record_"))
    try:
        torch.manual_seed(0)
        checkpoint = work / "teacher.safetensors"
        save_file(timm.create_model(args.teacher, num_classes=10).state_dict(), str(checkpoint))
        base = load_recipe_file(ROOT / "recipes/configs/tinyvit_digits.yaml")
        base |= {"epochs": args.epochs, "trackers": [], "log_every": 1000, "eval": {**base["eval"], "every": 1000}}
        base["teacher"] = {"source": f"timm:{args.teacher}", "checkpoint": str(checkpoint)}
        one_run(base, work, "warmup", False, args.k)  # the digits cached, the first imports paid
        import distill.plan
        from distill.record import Recorder

        for owner, name in ((Recorder, "keep"), (Recorder, "end_epoch"), (distill.plan, "open_record_store")):
            timed(owner, name)
        ratios, plain, recorded, shares = [], [], [], []
        for pair in range(args.pairs):
            order = (False, True) if pair % 2 == 0 else (True, False)
            seconds = {}
            for flag in order:
                seconds[flag] = one_run(base, work, f"p{pair}_{int(flag)}", flag, args.k)
                if flag:
                    shares.append(SPENT["seconds"] / seconds[flag])
            plain.append(seconds[False])
            recorded.append(seconds[True])
            ratios.append(seconds[True] / seconds[False])
            print(f"pair {pair}: without {seconds[False]:.1f} s, recording {seconds[True]:.1f} s, "
                  f"ratio {ratios[-1]:.3f}; the recording's own code {100 * shares[-1]:.2f}% of its run",
                  flush=True)  # fmt: skip
        print(
            f"\nrecording / not: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max "
            f"{max(ratios):.3f}) over {len(ratios)} pairs; median run {statistics.median(plain):.1f} s without, "
            f"{statistics.median(recorded):.1f} s recording ({args.teacher} teacher, {args.epochs} epoch(s), "
            f"k={args.k}, torch threads {torch.get_num_threads()})"
        )
        print(f"time in the recording's own code (keep, end_epoch, opening the store): median "
              f"{100 * statistics.median(shares):.2f}% of a recording run (min {100 * min(shares):.2f}%, "
              f"max {100 * max(shares):.2f}%)")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
