"""A logit-store round trip with its figures (the README's first command, until the
end-to-end distillation demo replaces it).

Writes two epochs of teacher-like top-k logits into a zarr store from shuffled
batches, reads them back in random order, verifies, converts zarr -> lmdb -> zarr,
checks that the content hashes survive, and prints sizes and speeds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_store import peaked_records

from logit_store import Manifest, Records, convert_store, create_store, open_store
from logit_store.cli import main as store_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--out", default=None, help="where to keep the stores (default: a temporary directory)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="store-demo-"))
    n, classes, k, epochs = args.samples, 1000, 10, 2
    manifest = Manifest(
        num_samples=n,
        num_classes=classes,
        k=k,
        epochs=epochs,
        teacher={"spec": "synthetic:peaked", "weights_sha256": None},
    )
    store = create_store(root / "demo.zarr", manifest)

    write_s = 0.0
    for epoch in range(epochs):
        records, labels, kl = peaked_records(n, classes, k, seed=epoch)  # stands in for a teacher
        order = np.random.default_rng(epoch).permutation(n)
        start = time.perf_counter()
        with store.writer(epoch) as writer:
            for i in range(0, n, 256):
                ids = order[i : i + 256]
                writer.write(
                    ids, Records(**{f: v[ids] for f, v in records.as_dict().items()}), labels=labels[ids], kl=kl[ids]
                )
        write_s += time.perf_counter() - start
    store.refresh_statistics()

    reader = open_store(root / "demo.zarr")
    ids = np.random.default_rng(9).permutation(n)
    start = time.perf_counter()
    for i in range(0, n, 256):
        reader.read(1, ids[i : i + 256])
    read_s = time.perf_counter() - start

    print("== distill-store info")
    store_cli(["info", str(root / "demo.zarr")])
    print("== distill-store verify")
    store_cli(["verify", str(root / "demo.zarr")])
    print("== distill-store convert zarr -> lmdb -> zarr")
    lmdb_store = convert_store(reader, root / "demo.lmdb", "lmdb")
    back = convert_store(lmdb_store, root / "back.zarr", "zarr")
    hashes = [s.info()["content_hashes"] for s in (reader, lmdb_store, back)]
    same = hashes[0] == hashes[1] == hashes[2]
    print(f"content hashes equal across zarr, lmdb, zarr: {same}")

    info = reader.info()
    print("\n== figures")
    print(f"write  {epochs * n / write_s:12,.0f} records/s (shuffled batches of 256, one process)")
    print(f"read   {n / read_s:12,.0f} records/s (random batches of 256, first pass, decoding included)")
    print(
        f"size   {info['bytes_per_record']:12.1f} bytes/record (raw floor {4 * k + 4}; lmdb copy {lmdb_store.info()['bytes_per_record']:.1f})"
    )
    print(f"kept   {info['statistics']['mean_topk_mass']:12.4f} mean top-{k} probability mass")
    print(f"stores under {root}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
