"""Benchmark the logit store against a raw numpy memmap, on the same records, in one run.

    uv run python tools/bench_store.py [--samples 200000] [--classes 1000] [--k 10]

Measures write and random-batch read throughput (records/s; batches of 256 ids in
shuffled order; 1 and 2 processes) for zarr, lmdb and a memmap of packed raw records,
and bytes per record against the raw floor (2k + 2k + 4 seed bytes) and TinyViT's
layout (4 + 4k bytes). Prints a markdown table; ratios matter, absolute figures are noisy.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from logit_store import Manifest, Records, create_store, open_store, record_seeds
from logit_store.sparse import sparsify

BATCH = 256
WARM_PASSES = 5  # a warm pass takes ~20 ms: keep the best of several
EPOCH = 0


def peaked_records(n: int, classes: int, k: int, seed: int = 0) -> tuple[Records, np.ndarray, np.ndarray]:
    """Teacher-like records: one confident class, a few plausible ones, noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    parts = []
    for start in range(0, n, 8192):
        lab = labels[start : start + 8192]
        logits = torch.randn(len(lab), classes, generator=g) * 1.5
        logits[torch.arange(len(lab)), lab] += 12.0
        near = (lab[:, None] + torch.randint(1, 20, (len(lab), 3), generator=g)) % classes
        logits.scatter_add_(1, near, torch.full(near.shape, 6.0))
        parts.append(sparsify(logits, k))
    values = torch.cat([p.values for p in parts]).numpy()
    indices = torch.cat([p.indices for p in parts]).numpy().astype(np.uint16)
    tail = torch.cat([p.tail_lse for p in parts]).numpy()
    kl = torch.cat([p.kl for p in parts]).numpy()
    ids = np.arange(n)
    return Records(values, indices, tail, record_seeds(0, EPOCH, ids)), labels.numpy(), kl


def raw_dtype(k: int) -> np.dtype:
    return np.dtype([("values", "<f2", (k,)), ("indices", "<u2", (k,)), ("seed", "<u4")])


# ---- one process's share of the work; run in forked children so both start together ----


def store_write(path: str, records: Records, shards: list[int]) -> None:
    store = open_store(path)
    with store.writer(EPOCH, shards) as writer:
        ids = np.concatenate([np.arange(*store.manifest.shard_range(s)) for s in shards])
        np.random.default_rng(len(shards)).shuffle(ids)
        for start in range(0, len(ids), BATCH):
            batch = ids[start : start + BATCH]
            writer.write(batch, Records(**{k: v[batch] for k, v in records.as_dict().items()}))


def memmap_write(path: str, records: Records, rows_range: tuple[int, int]) -> None:
    k = records.values.shape[1]
    out = np.memmap(path, dtype=raw_dtype(k), mode="r+")
    ids = np.arange(*rows_range)
    np.random.default_rng(1).shuffle(ids)
    for start in range(0, len(ids), BATCH):
        batch = ids[start : start + BATCH]
        rows = np.empty(len(batch), dtype=out.dtype)
        rows["values"], rows["indices"], rows["seed"] = (
            records.values[batch],
            records.indices[batch],
            records.seed[batch],
        )
        out[batch] = rows
    out.flush()


def store_read(path: str, ids: np.ndarray, pass_times: list) -> None:
    """Passes over the same shuffled ids: the first opens the store and decodes the epoch's
    shards (cold), the others are the steady state of a training epoch (warm)."""
    store = open_store(path)
    for _ in range(1 + WARM_PASSES):
        start_t = time.perf_counter()
        for start in range(0, len(ids), BATCH):
            store.read(EPOCH, ids[start : start + BATCH])
        pass_times.append(time.perf_counter() - start_t)


def memmap_read(path: str, ids: np.ndarray, k: int, pass_times: list) -> None:
    dtype = raw_dtype(k)
    # Gathered as opaque rows, numpy's fastest path for fixed-size records: the strongest baseline.
    rows = np.memmap(path, dtype=(np.void, dtype.itemsize), mode="r")
    for _ in range(1 + WARM_PASSES):
        start_t = time.perf_counter()
        for start in range(0, len(ids), BATCH):
            batch = rows[ids[start : start + BATCH]].view(dtype)
            batch["values"], batch["indices"], batch["seed"]
        pass_times.append(time.perf_counter() - start_t)


def timed(jobs: list[tuple[Callable, tuple]]) -> float:
    """Wall time for all jobs, each in its own forked process, started together."""
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=fn, args=args) for fn, args in jobs]
    start = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"benchmark worker failed with exit code {p.exitcode}")
    return time.perf_counter() - start


def split(items: list, parts: int) -> list[list]:
    return [items[r::parts] for r in range(parts)]


def timed_reads(fn: Callable, path: str, ids: np.ndarray, procs: int, *extra: object) -> tuple[float, float]:
    """records/s of the cold and the warm pass, all processes reading at once."""
    with mp.get_context("fork").Manager() as manager:
        times = [manager.list() for _ in range(procs)]
        timed([(fn, (path, part, *extra, t)) for part, t in zip(np.array_split(ids, procs), times, strict=True)])
        cold = max(t[0] for t in times)
        warm = min(max(t[i] for t in times) for i in range(1, 1 + WARM_PASSES))
    return len(ids) / cold, len(ids) / warm


def bench(args: argparse.Namespace, root: Path) -> dict[str, dict[str, float]]:
    n, k = args.samples, args.k
    records, _, _ = peaked_records(n, args.classes, k)
    results: dict[str, dict[str, float]] = {}
    read_ids = np.random.default_rng(2).permutation(n)
    for procs in (1, 2):
        mm = root / f"raw-{procs}.bin"
        np.memmap(mm, dtype=raw_dtype(k), mode="w+", shape=(n,)).flush()
        bounds = np.linspace(0, n, procs + 1).astype(int)
        w = timed([(memmap_write, (str(mm), records, (bounds[r], bounds[r + 1]))) for r in range(procs)])
        cold, warm = timed_reads(memmap_read, str(mm), read_ids, procs, k)
        results[f"memmap/{procs}"] = {"write": n / w, "cold": cold, "warm": warm, "bytes": os.path.getsize(mm) / n}
        for backend in ("zarr", "lmdb"):
            path = str(root / f"{backend}-{procs}")
            m = create_store(path, Manifest(num_samples=n, num_classes=args.classes, k=k, epochs=1, backend=backend))
            shards = split(list(range(m.manifest.num_shards)), procs)
            w = timed([(store_write, (path, records, s)) for s in shards])
            cold, warm = timed_reads(store_read, path, read_ids, procs)
            used = open_store(path).location.bytes_used()
            results[f"{backend}/{procs}"] = {"write": n / w, "cold": cold, "warm": warm, "bytes": used / n}
    return results


def report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    k = args.k
    floor, tinyvit = 2 * k + 2 * k + 4, 4 + 4 * k
    lines = [
        f"{args.samples:,} records, {args.classes} classes, k={k}, batches of {BATCH} shuffled ids",
        "",
        "| store / processes | write rec/s | vs memmap | read, 1st pass | vs memmap | read, steady | vs memmap | bytes/rec | vs raw floor | vs TinyViT |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        base = results[f"memmap/{name.split('/')[1]}"]
        lines.append(
            f"| {name} | {res['write']:,.0f} | {res['write'] / base['write']:.2f}x | {res['cold']:,.0f} | "
            f"{res['cold'] / base['cold']:.2f}x | {res['warm']:,.0f} | {res['warm'] / base['warm']:.2f}x | "
            f"{res['bytes']:.1f} | {res['bytes'] / floor:.2f}x | {res['bytes'] / tinyvit:.2f}x |"
        )
    lines.append("")
    lines.append(
        f"1st pass: a fresh process opens the store and decodes the epoch while reading; steady: the same ids again (best of {WARM_PASSES})."
    )
    lines.append(
        f"raw floor: {floor} bytes/record (2k fp16 values + 2k uint16 indices + 4 seed); TinyViT layout: {tinyvit}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-store-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(report(bench(args, root), args))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
