"""Deterministic synthetic records for store tests; numpy only, so worker processes start fast.

Run as a script it is a store writer: `python tests/store_helpers.py STORE --epochs 2
--shards 0,2 [--backend lmdb] [--hold]`, used by the multi-process and kill tests (which stop it at a
known commit with the store's fault hook, DISTILL_FAULT_COMMIT). With --hold it claims its shards of
epoch 0, prints "held" and keeps them until its standard input closes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from logit_store import Manifest, Records, create_store, record_seeds

N, C, K, EPOCHS = 3000, 50, 5, 2
# The version-3 code step and clamps, written out from docs/STORE_FORMAT.md (not imported from the store).
STEP, MAX_CODE, TAIL_CLAMP, NO_TAIL = 2.0**-11, 65_535, 32_767, -65504.0


def manifest(backend: str = "zarr", **overrides: object) -> Manifest:
    fields = {"num_samples": N, "num_classes": C, "k": K, "epochs": EPOCHS, "backend": backend, "global_seed": 7}
    fields.update(overrides)
    return Manifest(**fields)


def peaked_logits(epoch: int, ids: np.ndarray, num_classes: int = C) -> np.ndarray:
    """Teacher-like logits that depend only on (epoch, id): one class far ahead of the rest."""
    out = np.empty((len(ids), num_classes), dtype=np.float32)
    for row, i in enumerate(ids):
        rng = np.random.default_rng([epoch, int(i)])
        out[row] = rng.normal(0.0, 1.0, num_classes)
        out[row, int(i) % num_classes] += 9.0
    return out


def raw_records(logits: np.ndarray, k: int, seeds: np.ndarray) -> Records:
    """Top-k float64 logits (sorted descending) and the log-sum-exp of the rest, unshifted."""
    logits = logits.astype(np.float64)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(logits, order, axis=1)
    if k == logits.shape[1]:  # nothing left out: the sentinel, as sparsify gives it
        return Records(values, order.astype(np.uint16), np.full(len(values), NO_TAIL), seeds)
    rest = logits.copy()
    np.put_along_axis(rest, order, -np.inf, axis=1)
    top = rest.max(axis=1)
    tail = top + np.log(np.exp(rest - top[:, None]).sum(axis=1))
    return Records(values, order.astype(np.uint16), tail, seeds)


def stored_form(records: Records) -> Records:
    """What a version-3 store gives back for these records, by the format's formula:
    logits minus the top one, rounded to multiples of STEP (at most MAX_CODE steps), and the
    tail minus the top logit rounded alike (within +-TAIL_CLAMP steps), as float32."""
    top = records.values[:, :1].astype(np.float64)
    codes = np.minimum(np.rint((top - records.values) / STEP), MAX_CODE)
    tail_codes = np.clip(
        np.rint((np.asarray(records.tail_lse, np.float64) - top[:, 0]) / STEP), -TAIL_CLAMP, TAIL_CLAMP
    )
    tail = np.where(np.asarray(records.tail_lse) == NO_TAIL, NO_TAIL, tail_codes * STEP).astype(np.float32)
    return Records((codes * -STEP).astype(np.float32), records.indices, tail, records.seed)


def sparse_records(logits: np.ndarray, k: int, seeds: np.ndarray) -> Records:
    return stored_form(raw_records(logits, k, seeds))


def records_for(store_manifest: Manifest, epoch: int, ids: np.ndarray) -> Records:
    """The records of (epoch, ids), already in the form the store gives back (so a round
    trip is exact)."""
    logits = peaked_logits(epoch, ids, store_manifest.num_classes)
    return sparse_records(logits, store_manifest.k, record_seeds(store_manifest.global_seed, epoch, ids))


def synthetic_records(m: Manifest, epoch: int, ids: np.ndarray) -> Records:
    """Cheap records that depend only on (epoch, id), vectorised, in stored form: sorted logits
    with random gaps, distinct classes, for stores too big for `peaked_logits`."""
    ids = np.asarray(ids, dtype=np.int64)
    u = record_seeds(m.global_seed, epoch, (ids[:, None] * m.k + np.arange(m.k)).ravel()).reshape(len(ids), m.k)
    gaps = -np.log((u.astype(np.float64) + 1) / 2.0**32) * 0.2
    values = -np.cumsum(gaps, axis=1)
    indices = ((ids[:, None] * 7 + np.arange(m.k)) % m.num_classes).astype(np.uint16)
    seeds = record_seeds(m.global_seed, epoch, ids)
    return stored_form(Records(values, indices, values[:, -1] - 1.0, seeds))


def write_in_order(store, epoch: int, make=synthetic_records, batch: int = 4096) -> None:
    """Write a whole epoch in id order (one writer, large batches): the fast way to fill a big store."""
    n = store.manifest.num_samples
    with store.writer(epoch) as writer:
        for start in range(0, n, batch):
            ids = np.arange(start, min(start + batch, n))
            writer.write(ids, make(store.manifest, epoch, ids))


def rss_anon() -> int:
    """This process's private resident memory in bytes (file-backed pages, the page cache's, excluded)."""
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def probe_reader(
    path: str, cache_bytes: int, cache_dir: str, epoch: int = 0, batch: int = 256, hold: bool = False
) -> None:
    """Read a whole epoch in random batches (run in a fresh process) and print, as JSON, the
    peak growth of private memory over the baseline after a first batch from shard 0, the
    most decoded bytes the reader accounted for, and how many backend ranges it decoded.
    With `hold`, wait for stdin to close before returning."""
    from logit_store import open_store

    store = open_store(path, cache_bytes=cache_bytes, cache_dir=cache_dir)
    decodes = []
    read_rows = store.backend.read_rows
    store.backend.read_rows = lambda *a, **kw: decodes.append(a[1:3]) or read_rows(*a, **kw)
    first = store.manifest.shard_records  # warm up on shard 0 alone: every other shard is decoded in the loop
    store.read(epoch, np.arange(min(batch, first)))
    ids = first + np.random.default_rng(epoch).permutation(store.manifest.num_samples - first)
    base, peak, held = rss_anon(), 0, 0
    for start in range(0, len(ids), batch):
        store.read(epoch, ids[start : start + batch])
        peak, held = max(peak, rss_anon() - base), max(held, store.private_cache_bytes)
    print(json.dumps({"growth": peak, "held": held, "decodes": len(decodes)}), flush=True)
    if hold:  # keep the store open (and its shared files in use) until stdin closes
        sys.stdin.read()


def legacy_records(m: Manifest, epoch: int, ids: np.ndarray) -> Records:
    """Records as a version-1/2 writer kept them: float16 logits and tail, unshifted."""
    raw = raw_records(peaked_logits(epoch, ids, m.num_classes), m.k, record_seeds(m.global_seed, epoch, ids))
    return Records(raw.values.astype(np.float16), raw.indices, raw.tail_lse.astype(np.float16), raw.seed)


def write_legacy_store(path: Path, version: int, epochs: list[int]) -> Manifest:
    """A zarr logits store of format version 1 or 2, built by hand the way those versions laid
    it out (float16 values and tail, blake2b of packed rows per block), with `epochs` complete.
    Independent of this toolkit's writer; returns the manifest of the same content as it
    reads it."""
    import zarr
    from zarr.codecs import BloscCodec, BloscShuffle

    m = manifest()
    data = m.to_dict() | {"format_version": version}
    data["dtypes"] = {"values": "float16", "indices": "uint16", "tail_lse": "float16", "seed": "uint32"}
    if version == 1:
        del data["kind"], data["embed_dim"]
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True))
    row = np.dtype([("values", "<f2", (K,)), ("indices", "<u2", (K,)), ("tail_lse", "<f2"), ("seed", "<u4")])
    group = zarr.open_group(str(path), mode="a", zarr_format=3)
    arrays = {}
    for name in row.names:
        width = row[name].shape
        arrays[name] = group.create_array(
            name,
            shape=(m.epochs, N, *width),
            dtype=row[name].base,
            shards=(1, m.shard_records, *width),
            chunks=(1, m.chunk_records, *width),
            compressors=[BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle)],
            fill_value=0,
        )
    (path / "commits").mkdir()
    for epoch in epochs:
        rows = np.empty(N, dtype=row)
        for name, value in legacy_records(m, epoch, np.arange(N)).as_dict().items():
            rows[name] = value
        for name, array in arrays.items():
            array[epoch] = rows[name]
        for shard in range(m.num_shards):
            start, stop = m.shard_range(shard)
            blocks = [rows[a : min(a + m.chunk_records, stop)] for a in range(start, stop, m.chunk_records)]
            marker = {
                "epoch": epoch, "shard": shard, "start": start, "stop": stop,
                "digests": [hashlib.blake2b(b.tobytes(), digest_size=16).hexdigest() for b in blocks],
                "statistics": {"records": stop - start, "topk_mass_sum": 0.9 * (stop - start), "kl_sum": 0.0,
                               "kl_records": 0, "labeled": 0, "top1_agree": 0},
            }  # fmt: skip
            (path / "commits" / f"e{epoch:05d}-s{shard:06d}.json").write_text(json.dumps(marker, sort_keys=True))
    return m


def write_epoch(store, epoch: int, shards: list[int] | None = None, batch: int = 256, order_seed: int = 0) -> None:
    """Write the given shards of an epoch in shuffled batches, as a saving run would."""
    m = store.manifest
    with store.writer(epoch, shards) as writer:
        claimed = sorted(writer.locks)
        ids = np.concatenate([np.arange(*m.shard_range(s)) for s in claimed]) if claimed else np.array([], int)
        np.random.default_rng(order_seed).shuffle(ids)
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            writer.write(chunk, records_for(m, epoch, chunk), labels=chunk % m.num_classes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--backend", default="zarr")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--shards", default=None, help="comma-separated shard indices (default: all pending)")
    parser.add_argument("--hold", action="store_true", help="claim the shards of epoch 0 until stdin closes")
    args = parser.parse_args()
    store = create_store(args.store, manifest(args.backend))
    shards = [int(s) for s in args.shards.split(",")] if args.shards else None
    if args.hold:
        with store.writer(0, shards):
            print("held", flush=True)
            sys.stdin.read()
        return
    for epoch in range(args.epochs):
        pending = set(store.pending_shards(epoch))
        todo = sorted(pending if shards is None else pending & set(shards))
        write_epoch(store, epoch, todo)
    print("done", flush=True)


if __name__ == "__main__":
    main()
