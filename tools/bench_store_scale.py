"""The logit store at ImageNet-21k's shape (k = 100 of 21,841 classes) on a synthetic store that
fits this machine: writes, reader memory and speed, precision and size, each against a baseline
measured in the same run, and the extrapolation to 14.2M images x 90 epochs.

    uv run python tools/bench_store_scale.py [--samples 1000000] [--classes 21841] [--k 100]
                                             [--baseline-rev 5ca19f0] [--cache-mib 64]

Baselines: the store as it was before this format (`--baseline-rev`, format version 2, run
from a copy of its `logit_store/` taken out of git, in the same run on the same records),
and a numpy memmap of raw packed records. Every measurement runs in a fresh process; the
record figures are records/s of the store's own work (validation, encoding, checksums,
compression, fsync and commit; reads: decode, checks and the gather of batches of 256).
Memory is the growth of the reading process's private resident memory (RssAnon) over its
value after opening the store and reading one batch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH = 256
STEADY_PASSES = 3
TINYVIT_ROW = 4  # + 4k bytes: seed, int16 index and fp16 probability per class
IMAGENET21K = {"images": 14_200_000, "epochs": 90, "node_processes": 8}
ROOT = Path(__file__).resolve().parents[1]


# ---- records ------------------------------------------------------------------------------


def teacher_pool(rows: int, classes: int, k: int, seed: int) -> tuple[np.ndarray, ...]:
    """Full teacher-like logits for `rows` samples, kept as their top-k (float32, sorted), the
    log-sum-exp of the rest, and the logits themselves for the precision figures: uncentred
    (offset 15, spread 3) with one class well ahead and a few related ones, as a trained
    classifier's logits look."""
    import torch

    g = torch.Generator().manual_seed(seed)
    values, indices, tails, full = [], [], [], []
    for start in range(0, rows, 512):
        n = min(512, rows - start)
        logits = torch.randn(n, classes, generator=g) * 3 + 15
        label = torch.randint(0, classes, (n,), generator=g)
        logits[torch.arange(n), label] += 12
        near = (label[:, None] + torch.randint(1, 50, (n, 8), generator=g)) % classes
        logits.scatter_add_(1, near, torch.full(near.shape, 6.0))
        top, idx = logits.topk(k, dim=1)
        values.append(top.numpy())
        indices.append(idx.numpy())
        tails.append(logits.scatter(1, idx, float("-inf")).logsumexp(dim=1).numpy())
        full.append(logits.numpy() if start < 4096 else None)
    return (
        np.concatenate(values),
        np.concatenate(indices),
        np.concatenate(tails),
        np.concatenate([f for f in full if f is not None]),
    )


def make_records(args: argparse.Namespace, root: Path) -> dict[str, str]:
    """1 record per sample from a pool of full-logit rows: each gets its own jitter (re-sorted)
    and its own class offset, so no two records repeat. Saved as .npy for the workers."""
    pool_v, pool_i, pool_t, full = teacher_pool(args.pool, args.classes, args.k, seed=0)
    rng = np.random.default_rng(1)
    n, paths = args.samples, {}
    pick = rng.integers(0, args.pool, n)
    values = np.empty((n, args.k), np.float32)
    indices = np.empty((n, args.k), np.uint16)
    for a in range(0, n, 65536):
        b = min(a + 65536, n)
        jitter = rng.normal(0, 0.05, (b - a, args.k)).astype(np.float32)
        v = pool_v[pick[a:b]] + jitter
        order = np.argsort(-v, axis=1)
        values[a:b] = np.take_along_axis(v, order, axis=1)
        shift = rng.integers(0, args.classes, (b - a, 1))
        indices[a:b] = (np.take_along_axis(pool_i[pick[a:b]], order, axis=1) + shift) % args.classes
    arrays = {
        "values": values,
        "indices": indices,
        "tail": pool_t[pick] + rng.normal(0, 0.05, n).astype(np.float32),
        "seed": np.arange(n, dtype=np.uint32),
        "full": full,
    }
    for name, arr in arrays.items():
        paths[name] = str(root / f"{name}.npy")
        np.save(paths[name], arr)
    return paths


# ---- workers: each runs in its own process (the old store's from its own copy of the code) ----


def rss_anon() -> int:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith("RssAnon:")).split()[1]) * 1024


def worker_write(job: dict) -> dict:
    from logit_store import Manifest, Records, create_store

    if job["impl"] == "inline":  # v3 with each shard committed on the caller's thread
        from logit_store import ShardWriter

        ShardWriter.MAX_SEALED = 0

    data = {name: np.load(job["data"][name], mmap_mode="r") for name in ("values", "indices", "tail", "seed")}
    n = len(data["seed"])
    old = job["impl"] == "old"
    store = create_store(job["path"], Manifest(num_samples=n, num_classes=job["classes"], k=job["k"], epochs=1))
    ids = np.arange(n)
    if job["order"] == "shuffled":
        ids = np.random.default_rng(2).permutation(n)
    batches = []
    for a in range(0, n, BATCH):  # prepared before the clock starts: a teacher would hand these over
        b = np.sort(ids[a : a + BATCH]) if job["order"] == "in order" else ids[a : a + BATCH]
        v, t = np.asarray(data["values"][b]), np.asarray(data["tail"][b])
        if old:  # what the old sparsify gave: float16 logits and tail
            v, t = v.astype(np.float16), t.astype(np.float16)
        batches.append((b, Records(v, np.asarray(data["indices"][b]), t, np.asarray(data["seed"][b]))))
    start, cpu = time.perf_counter(), time.process_time()
    with store.writer(0) as writer:
        for b, records in batches:
            writer.write(b, records)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    store.refresh_statistics()
    return {"records_per_s": n / seconds, "cpu_us": cpu / n * 1e6, "bytes_per_record": store.location.bytes_used() / n}


def worker_read(job: dict) -> dict:
    """Passes over this process's ids in batches of 256: the first decodes (cold), the others
    are the steady state. Prints when done, then waits for stdin to close (so processes that
    share a decoded file all hold it until all are measured)."""
    from logit_store import open_store

    kwargs = {} if job["impl"] == "old" else {"cache_bytes": job["cache_bytes"], "cache_dir": job["cache_dir"]}
    if job["impl"] == "memmap":
        rows = np.memmap(job["path"], dtype=np.dtype((np.void, job["row_bytes"])), mode="r")

        def read(b: np.ndarray) -> object:
            return rows[b]

        n = len(rows)
    else:
        store = open_store(job["path"], **kwargs)
        n = store.manifest.num_samples

        def read(b: np.ndarray) -> object:
            return store.read(0, b)

    ids = np.array_split(np.random.default_rng(3).permutation(n), job["procs"])[job["rank"]]
    read(ids[:1])
    base, peak, times, cpu = rss_anon(), 0, [], []
    for _ in range(1 + STEADY_PASSES):
        start, start_cpu = time.perf_counter(), time.process_time()
        for a in range(0, len(ids), BATCH):
            read(ids[a : a + BATCH])
            if not times:
                peak = max(peak, rss_anon() - base)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    held = 0 if job["impl"] != "new" else store.private_cache_bytes
    steady_cpu = min(cpu[1:]) / len(ids) * 1e6
    return {"cold": len(ids) / times[0], "steady": len(ids) / min(times[1:]), "growth": peak, "held": held} | {
        "steady_cpu_us": steady_cpu
    }


def run_workers(kind: str, jobs: list[dict], pythonpath: str | None = None) -> list[dict]:
    """Start one process per job at once; collect their JSON; then let them all exit."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath  # ahead of the editable install: the old code
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, json.dumps(job)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=tempfile.gettempdir(),
            text=True,
        )
        for job in jobs
    ]
    results = [json.loads(p.stdout.readline()) for p in procs]
    for p in procs:
        p.communicate("")
        if p.returncode:
            raise RuntimeError(f"benchmark worker failed ({p.returncode})")
    return results


# ---- the measurements ---------------------------------------------------------------------


def old_code(rev: str, root: Path) -> str:
    """The baseline's logit_store package, taken out of git into root/old-code."""
    target = root / "old-code"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "logit_store"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return str(target)


def bench_writes(args: argparse.Namespace, root: Path, data: dict, old: str) -> dict:
    """Each (store, order) written `repeats` times, old and new alternating; the best wall rate
    and the least CPU time per record are kept (other work on the machine only slows a run)."""
    out: dict = {}
    base = {"data": data, "classes": args.classes, "k": args.k}
    for _ in range(args.repeats):
        for order in ("in order", "shuffled"):
            for impl in ("old", "inline", "new"):
                path = root / f"{impl}-{order.replace(' ', '-')}"
                shutil.rmtree(path, ignore_errors=True)
                job = base | {"impl": impl, "order": order, "path": str(path)}
                got = run_workers("write", [job], old if impl == "old" else None)[0]
                best = out.setdefault((impl, order), got)
                best["records_per_s"] = max(best["records_per_s"], got["records_per_s"])
                best["cpu_us"] = min(best["cpu_us"], got["cpu_us"])
    return out


def memmap_file(root: Path, data: dict) -> tuple[str, int]:
    """Raw packed v3-sized rows (codes, indices, tail code, seed) of the same records."""
    values = np.load(data["values"], mmap_mode="r")
    n, k = values.shape
    row = np.dtype([("values", "<u2", (k,)), ("indices", "<u2", (k,)), ("tail", "<i2"), ("seed", "<u4")])
    mm = np.memmap(root / "raw.bin", dtype=row, mode="w+", shape=(n,))
    indices = np.load(data["indices"], mmap_mode="r")
    for a in range(0, n, 65536):
        mm["indices"][a : a + 65536] = indices[a : a + 65536]
    mm.flush()
    return str(root / "raw.bin"), row.itemsize


def bench_reads(args: argparse.Namespace, root: Path, data: dict, old: str, stores: dict) -> dict:
    out = {}
    raw, row_bytes = memmap_file(root, data)
    for procs in (1, 2):
        cache_dir = str(root / f"cache-{procs}")
        for impl in ("memmap", "old", "new"):
            path = raw if impl == "memmap" else stores[impl]
            jobs = [
                {"impl": impl, "path": path, "procs": procs, "rank": r, "row_bytes": row_bytes}
                | {"cache_bytes": args.cache_mib << 20, "cache_dir": cache_dir}
                for r in range(procs)
            ]
            out[(impl, procs)] = run_workers("read", jobs, old if impl == "old" else None)
    return out


def bench_precision(data: dict, k: int) -> dict:
    """Relative error of the kept probabilities against the float64 softmax, for the float16
    logits of version 2 and the codes of version 3, and KL(full || rebuilt) at T = 1, 2, 4."""
    import torch

    from logit_store.sparse import sparsify

    full = torch.from_numpy(np.load(data["full"]))
    issue = torch.randn(len(full), full.shape[1], generator=torch.Generator().manual_seed(5)) * 3 + 15
    out = {}
    for name, logits in (("teacher-like", full), ("offset 15, spread 3", issue)):
        true = torch.softmax(logits.double(), dim=1)
        top, idx = logits.topk(k, dim=1)
        tail = logits.scatter(1, idx, float("-inf")).logsumexp(dim=1)
        sp = sparsify(logits, k)
        for fmt, (v, t) in {
            "v2 float16 logits": (top.half(), tail.half()),
            "v3 codes": (sp.values, sp.tail_lse),
        }.items():
            v, t = v.double(), t.double()
            kept = torch.exp(v - v[:, :1]) / (torch.exp(v - v[:, :1]).sum(1) + torch.exp(t - v[:, 0]))[:, None]
            err = ((kept - true.gather(1, idx)).abs() / true.gather(1, idx)).flatten()
            out[(name, fmt)] = {"max": float(err.max()), "median": float(err.median())}
        out[(name, "kl")] = sp.kl.double().mean(0).tolist()
        out[(name, "mass")] = float(true.gather(1, idx).sum(1).mean())
    return out


# ---- report -------------------------------------------------------------------------------


def mib(x: float) -> str:
    return f"{x / 2**20:,.1f} MiB"


def report(args: argparse.Namespace, writes: dict, reads: dict, precision: dict) -> str:
    n, k = args.samples, args.k
    load = ", ".join(f"{x:.1f}" for x in args.load)
    lines = [
        f"{n:,} records, k={k} of {args.classes:,} classes, batches of {BATCH}; baseline: {args.baseline_rev}; "
        f"load average at start (1, 5, 15 min): {load} on {os.cpu_count()} cores",
        "",
    ]
    lines += [
        f"### Writes (1 process, best of {args.repeats})",
        "",
        "| order | v2 (baseline) rec/s | v3, inline commits | v3 | v3 / v2 | CPU us/rec: v2 | v3 inline | v3 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for order in ("in order", "shuffled"):
        o, i, v = writes[("old", order)], writes[("inline", order)], writes[("new", order)]
        lines.append(
            f"| {order} | {o['records_per_s']:,.0f} | {i['records_per_s']:,.0f} | {v['records_per_s']:,.0f} "
            f"| {v['records_per_s'] / o['records_per_s']:.2f}x | {o['cpu_us']:.2f} | {i['cpu_us']:.2f} | {v['cpu_us']:.2f} |"
        )
    old_b, new_b = writes[("old", "in order")]["bytes_per_record"], writes[("new", "in order")]["bytes_per_record"]
    tinyvit = TINYVIT_ROW + 4 * k
    lines += [
        "",
        f"bytes/record on disk: v2 {old_b:.1f}, v3 {new_b:.1f} ({new_b / old_b:.2f}x v2, {new_b / tinyvit:.2f}x TinyViT's {tinyvit})",
    ]
    if reads:
        lines += read_lines(args, reads)
    if precision:
        lines += precision_lines(precision)
    if reads:
        lines += ["", extrapolate(args, writes, reads)]
    return "\n".join(lines)


def read_lines(args: argparse.Namespace, reads: dict) -> list[str]:
    lines = [
        "",
        "### Reads: whole epoch, random batches",
        "",
        "| reader / processes | 1st pass rec/s (per process) | steady rec/s (per process) | steady vs memmap | steady CPU us/rec | private memory growth per process | decoded rows held (reader's count) |",
        "|---|---|---|---|---|---|---|",
    ]
    for procs in (1, 2):
        base = np.mean([r["steady"] for r in reads[("memmap", procs)]])
        for impl, label in (
            ("memmap", "memmap"),
            ("old", "v2 reader"),
            ("new", f"v3 reader, cache {args.cache_mib} MiB"),
        ):
            rs = reads[(impl, procs)]
            cold, steady = np.mean([r["cold"] for r in rs]), np.mean([r["steady"] for r in rs])
            growth, held = max(r["growth"] for r in rs), max(r["held"] for r in rs)
            cpu = max(r["steady_cpu_us"] for r in rs)
            lines.append(
                f"| {label} / {procs} | {cold:,.0f} | {steady:,.0f} | {steady / base:.2f}x | {cpu:.3f} | {mib(growth)} "
                f"| {mib(held) if impl == 'new' else '-'} |"
            )
    return lines


def precision_lines(precision: dict) -> list[str]:
    lines = ["", "### Precision of the kept probabilities (relative error against the float64 softmax)", ""]
    lines += ["| logits | format | max | median | mean kept mass |", "|---|---|---|---|---|"]
    for name in ("teacher-like", "offset 15, spread 3"):
        for fmt in ("v2 float16 logits", "v3 codes"):
            e = precision[(name, fmt)]
            lines.append(
                f"| {name} | {fmt} | {e['max'] * 100:.3f}% | {e['median'] * 100:.3f}% | {precision[(name, 'mass')]:.3f} |"
            )
    for name in ("teacher-like", "offset 15, spread 3"):
        kl = precision[(name, "kl")]
        lines.append(f"\nKL(full || rebuilt), {name}: T=1 {kl[0]:.4f}, T=2 {kl[1]:.4f}, T=4 {kl[2]:.4f} nats")
    return lines


def extrapolate(args: argparse.Namespace, writes: dict, reads: dict) -> str:
    """Measured per-record figures scaled to ImageNet-21k: 14.2M images x 90 epochs at this k."""
    from logit_store.records import row_dtype

    images, epochs, procs = IMAGENET21K["images"], IMAGENET21K["epochs"], IMAGENET21K["node_processes"]
    row = row_dtype(args.k, args.classes, False).itemsize
    epoch_decoded = images * row
    v3_bytes = writes[("new", "in order")]["bytes_per_record"]
    rate = writes[("new", "in order")]["records_per_s"]
    old_rate = writes[("old", "in order")]["records_per_s"]
    growth = max(r["growth"] for r in reads[("new", 2)])
    decode = min(r["cold"] for r in reads[("new", 1)])
    return "\n".join(
        [
            f"### Extrapolation to ImageNet-21k: {images:,} images x {epochs} epochs at k={args.k}",
            "",
            f"- on disk: {v3_bytes:.1f} B/record x {images * epochs:,} records = {v3_bytes * images * epochs / 1e9:,.0f} GB "
            f"(TinyViT's layout: {(TINYVIT_ROW + 4 * args.k) * images * epochs / 1e9:,.0f} GB)",
            f"- decoded epoch: {row} B/record x {images:,} = {epoch_decoded / 1e9:.2f} GB; the v2 reader held it in every "
            f"process, twice (2 epochs): {2 * epoch_decoded / 1e9:.1f} GB per process, {2 * epoch_decoded * procs / 1e9:.0f} GB per {procs}-process node",
            f"- v3 reader: private memory <= cache_bytes ({args.cache_mib} MiB here; measured growth {mib(growth)} per process), "
            f"i.e. <= {procs * args.cache_mib / 1024:.1f} GiB per {procs}-process node; the decoded epoch lives once per node in the "
            f"page cache / local disk: {epoch_decoded / 1e9:.2f} GB per epoch held (<= {2 * epoch_decoded / 1e9:.1f} GB with the previous one)",
            f"- decoding an epoch once per node: {images / decode / 60:.1f} min of one process at the measured first-pass rate "
            f"({decode:,.0f} rec/s), shared by the node's processes as they race for shards",
            f"- writing: {images * epochs / rate / 3600:,.1f} process-hours at {rate:,.0f} rec/s "
            f"(v2: {images * epochs / old_rate / 3600:,.1f}); one epoch is {images / rate / 60:.1f} process-minutes",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=21_841)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--pool", type=int, default=8192, help="full-logit teacher rows the records are drawn from")
    parser.add_argument("--baseline-rev", default="5ca19f0", help="git revision of the baseline store (format v2)")
    parser.add_argument("--cache-mib", type=int, default=64, help="the v3 reader's cache_bytes, in MiB")
    parser.add_argument("--repeats", type=int, default=2, help="writes of each kind; the best is kept")
    parser.add_argument("--parts", default="writes,reads,precision", help="which of writes,reads,precision to run")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, job = args.worker
        result = {"write": worker_write, "read": worker_read}[kind](json.loads(job))
        print(json.dumps(result), flush=True)
        sys.stdin.read()
        return
    args.load = os.getloadavg()  # other work on the machine: the wall figures shrink with it, CPU us/rec does not
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        parts = set(args.parts.split(","))
        old = old_code(args.baseline_rev, root)
        data = make_records(args, root)
        writes = bench_writes(args, root, data, old)  # the reads need its stores
        stores = {"old": str(root / "old-in-order"), "new": str(root / "new-in-order")}
        reads = bench_reads(args, root, data, old, stores) if "reads" in parts else {}
        precision = bench_precision(data, args.k) if "precision" in parts else {}
        print(report(args, writes, reads, precision))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
