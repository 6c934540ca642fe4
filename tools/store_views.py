"""How good is a store's teacher on the views a student trains on? Per store: its top-1 against the labels of
DATA on every stored (epoch, sample), the top-1 of its probabilities averaged over each sample's views (the
target a student fitting every epoch's views is pulled toward), the mean probability of the true class, and
the mean entropy.

    python tools/store_views.py STORE [STORE ...] --labels DATA

The labels come from DATA (any dataset spec, the one the store was saved from or the same images with more
labels: a diagnosis may use labels no training run saw); unlabelled samples are left out of the top-1 and the
true-class probability. Probabilities are the stored top-k and tail's: the true class counts 0 where the cut
left it out, and the entropy takes the tail as one outcome (exact when k = num_classes, whose tail of -65504
has probability 0; a lower bound otherwise); in the average over views a class outside a view's top-k counts 0
there. A logits store, complete and without mixing (a mixed view has no single label to score against).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from distill.data import create_dataset
from logit_store import DistillError, LogitStore, open_store


def view_figures(store: LogitStore, labels: np.ndarray) -> dict[str, float]:
    """Top-1 (%) against `labels` (NO_LABEL, -1: left out), mean true-class probability and mean entropy (nats)
    over every record of every epoch; top-1 (%) of each sample's probabilities averaged over its epochs."""
    ids = np.arange(store.manifest.num_samples)
    known = labels >= 0
    hits, p_true, entropy = [], [], []
    view_sum = np.zeros((len(ids), store.manifest.num_classes))
    for epoch in range(store.manifest.epochs):
        r = store.read(epoch, ids)
        kept = np.concatenate([r.values, r.tail_lse[:, None]], axis=1).astype(np.float64)
        log_p = kept - np.logaddexp.reduce(kept, axis=1, keepdims=True)
        p = np.exp(log_p)
        entropy.append(-(p * np.where(p > 0, log_p, 0.0)).sum(axis=1))
        hits.append((r.indices[:, 0] == labels)[known])
        p_true.append(np.where(r.indices == labels[:, None], p[:, :-1], 0.0).sum(axis=1)[known])
        np.add.at(view_sum, (ids[:, None], r.indices.astype(np.int64)), p[:, :-1])
    return {
        "top1": 100 * float(np.concatenate(hits).mean()),
        "top1_view_mean": 100 * float((view_sum.argmax(axis=1) == labels)[known].mean()),
        "p_true": float(np.concatenate(p_true).mean()),
        "entropy": float(np.concatenate(entropy).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="+", metavar="STORE")
    parser.add_argument("--labels", required=True, metavar="DATA", help="dataset spec whose labels score the views")
    args = parser.parse_args(argv)
    try:  # every input checked before the first line of the table
        labels = create_dataset(args.labels).labels
        stores = {path: open_store(path) for path in args.stores}
    except DistillError as e:
        parser.error(str(e))
    for path, store in stores.items():
        m = store.manifest
        if m.kind != "logits" or m.mixing:
            parser.error(f"{path}: a {'mixing ' if m.mixing else ''}{m.kind} store; expected logits without mixing")
        if any(store.pending_shards(epoch) for epoch in range(m.epochs)):
            parser.error(f"{path}: not complete (finish it with distill-save-logits); expected every epoch committed")
        if len(labels) != m.num_samples:
            parser.error(f"{path}: {m.num_samples} samples, but {args.labels} has {len(labels)}")
    width = max(len(p) for p in stores)
    print(f"{'store':<{width}} {'top-1 on views':>14} {'of view mean':>12} {'p(true)':>8} {'entropy':>8}")
    for path, store in stores.items():
        figures = view_figures(store, labels)
        print(
            f"{path:<{width}} {figures['top1']:14.2f} {figures['top1_view_mean']:12.2f} "
            f"{figures['p_true']:8.4f} {figures['entropy']:8.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
