"""tools/store_views.py: a store's teacher scored on its stored views, against the softmax written out here."""

import importlib.util

import numpy as np
import pytest
from store_helpers import EPOCHS, C, N, manifest, write_epoch
from train_helpers import ROOT

from logit_store import create_store, open_store

spec = importlib.util.spec_from_file_location("store_views", ROOT / "tools" / "store_views.py")
store_views = importlib.util.module_from_spec(spec)
spec.loader.exec_module(store_views)


def test_view_figures_match_the_full_softmax(tmp_path):
    store = create_store(tmp_path / "s.zarr", manifest(k=C))  # every class kept: the figures are exact
    for epoch in range(EPOCHS):
        write_epoch(store, epoch, order_seed=epoch)
    ids = np.arange(N)
    labels = ids % C  # the class each record boosts ...
    labels[::7] = (labels[::7] + 1) % C  # ... but for these, a wrong label
    labels[::11] = -1  # and these have none
    known = labels >= 0
    hits, p_true, entropy = [], [], []
    for epoch in range(EPOCHS):
        logits = np.stack([np.random.default_rng([epoch, int(i)]).normal(0.0, 1.0, C) for i in ids])
        logits[ids, ids % C] += 9.0  # store_helpers.peaked_logits, written out
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        hits.append((p.argmax(1) == labels)[known])
        p_true.append(p[ids, np.maximum(labels, 0)][known])
        entropy.append(-(p * np.log(p)).sum(1))
    got = store_views.view_figures(open_store(tmp_path / "s.zarr"), labels)
    assert got["top1"] == pytest.approx(100 * np.concatenate(hits).mean())
    assert got["top1"] < 100  # the wrong labels count as misses
    assert got["p_true"] == pytest.approx(np.concatenate(p_true).mean(), abs=1e-3)
    assert got["entropy"] == pytest.approx(np.concatenate(entropy).mean(), abs=1e-3)


def test_a_dataset_of_another_size_is_one_line(tmp_path, capsys):
    store = create_store(tmp_path / "s.zarr", manifest())
    write_epoch(store, 0, order_seed=0)
    with pytest.raises(SystemExit) as exit_:
        store_views.main([str(tmp_path / "s.zarr"), "--labels", "digits"])
    assert exit_.value.code == 2
    assert f"{N} samples, but digits has 1437" in capsys.readouterr().err
