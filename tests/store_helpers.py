"""Deterministic synthetic records for store tests; numpy only, so worker processes start fast.

Run as a script it is a store writer: `python tests/store_helpers.py STORE --epochs 2
--shards 0,2 [--backend lmdb] [--hold]`, used by the multi-process and kill tests (which stop it at a
known commit with the store's fault hook, DISTILL_FAULT_COMMIT). With --hold it claims its shards of
epoch 0, prints "held" and keeps them until its standard input closes.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from logit_store import Manifest, Records, create_store, record_seeds

N, C, K, EPOCHS = 3000, 50, 5, 2


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


def sparse_records(logits: np.ndarray, k: int, seeds: np.ndarray) -> Records:
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(logits, order, axis=1)
    rest = logits.copy()
    np.put_along_axis(rest, order, -np.inf, axis=1)
    top = rest.max(axis=1)
    tail = top + np.log(np.exp(rest - top[:, None]).sum(axis=1))
    return Records(values.astype(np.float16), order.astype(np.uint16), tail.astype(np.float16), seeds)


def records_for(store_manifest: Manifest, epoch: int, ids: np.ndarray) -> Records:
    logits = peaked_logits(epoch, ids, store_manifest.num_classes)
    return sparse_records(logits, store_manifest.k, record_seeds(store_manifest.global_seed, epoch, ids))


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
