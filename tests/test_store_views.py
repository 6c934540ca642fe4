"""tools/store_views.py: a store's teacher scored on its stored views, against the softmax written out here."""

import importlib.util

import numpy as np
import pytest
from store_helpers import EPOCHS, C, N, manifest, sparse_records, write_epoch
from train_helpers import ROOT

from logit_store import create_store, open_store, record_seeds

spec = importlib.util.spec_from_file_location("store_views", ROOT / "tools" / "store_views.py")
store_views = importlib.util.module_from_spec(spec)
spec.loader.exec_module(store_views)


def written_out(epoch: int, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """store_helpers.peaked_logits written out, as probabilities: the k largest classes' and, as one more
    column, the rest's summed (all C columns and a zero column when k = C); and the top-k classes."""
    logits = np.stack([np.random.default_rng([epoch, int(i)]).normal(0.0, 1.0, C) for i in ids])
    logits[ids, ids % C] += 9.0
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    order = np.argsort(-p, axis=1)[:, :k]
    top = np.take_along_axis(p, order, axis=1)
    return np.concatenate([top, 1 - top.sum(1, keepdims=True)], axis=1), order


@pytest.mark.parametrize("k", [C, 5], ids=["every class kept", "top-5 and the tail"])
def test_view_figures_match_the_softmax_written_out(tmp_path, k):
    store = create_store(tmp_path / "s.zarr", manifest(k=k))
    for epoch in range(EPOCHS):
        write_epoch(store, epoch, order_seed=epoch)
    ids = np.arange(N)
    labels = ids % C  # the class each record boosts ...
    labels[::7] = (labels[::7] + 1) % C  # ... but for these, a wrong label
    labels[::11] = -1  # and these have none
    known = labels >= 0
    hits, p_true, entropy = [], [], []
    view_sum = np.zeros((N, C))  # each sample's kept probabilities, summed over its epochs, class by class
    for epoch in range(EPOCHS):
        p, order = written_out(epoch, ids, k)
        for i in range(N):
            for j in range(k):
                view_sum[i, order[i, j]] += p[i, j]
        hits.append((order[:, 0] == labels)[known])
        p_true.append((p[:, :-1] * (order == labels[:, None]))[known].sum(1))
        q = np.clip(p, 1e-300, 1)  # 0 log 0 = 0
        entropy.append(-(p * np.log(q)).sum(1))
    got = store_views.view_figures(open_store(tmp_path / "s.zarr"), labels)
    assert got["top1"] == pytest.approx(100 * np.concatenate(hits).mean())
    assert got["top1"] < 100  # the wrong labels count as misses
    assert got["top1_view_mean"] == pytest.approx(100 * (view_sum.argmax(1) == labels)[known].mean())
    assert got["p_true"] == pytest.approx(np.concatenate(p_true).mean(), abs=1e-3)
    assert got["entropy"] == pytest.approx(np.concatenate(entropy).mean(), abs=1e-3)


def test_the_view_mean_is_not_the_vote_nor_one_view(tmp_path):
    """Two samples of class 1 over three views: class 0 narrowly ahead in two views, class 1 far ahead in one.
    Averaged, class 1 leads (0.53 against 0.28) for both; a majority vote, the first view or the last view would
    miss one or both."""
    views = {0: [[0.4, 0.35, 0.25], [0.4, 0.35, 0.25], [0.05, 0.9, 0.05]],
             1: [[0.05, 0.9, 0.05], [0.4, 0.35, 0.25], [0.4, 0.35, 0.25]]}  # fmt: skip
    m = manifest(num_samples=2, num_classes=3, k=3, epochs=3)
    store = create_store(tmp_path / "s.zarr", m)
    ids = np.arange(2)
    for epoch in range(3):
        logits = np.log([views[0][epoch], views[1][epoch]])
        with store.writer(epoch) as writer:
            writer.write(ids, sparse_records(logits, 3, record_seeds(m.global_seed, epoch, ids)))
    got = store_views.view_figures(open_store(tmp_path / "s.zarr"), np.array([1, 1]))
    assert got["top1"] == pytest.approx(100 / 3)
    assert got["top1_view_mean"] == 100


def test_a_dataset_of_another_size_is_one_line(tmp_path, capsys):
    store = create_store(tmp_path / "s.zarr", manifest())
    for epoch in range(EPOCHS):
        write_epoch(store, epoch, order_seed=epoch)
    with pytest.raises(SystemExit) as exit_:
        store_views.main([str(tmp_path / "s.zarr"), "--labels", "digits"])
    assert exit_.value.code == 2
    assert f"{N} samples, but digits has 1437" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "epochs_written", "expected"),
    [
        ({"mixing": True}, 0, "a mixing logits store; expected logits without mixing"),
        ({}, 1, "not complete (finish it with distill-save-logits)"),
    ],
    ids=["mixing", "incomplete"],
)
def test_a_store_it_cannot_score_is_one_line(tmp_path, capsys, overrides, epochs_written, expected):
    store = create_store(tmp_path / "s.zarr", manifest(**overrides))
    for epoch in range(epochs_written):
        write_epoch(store, epoch, order_seed=epoch)
    with pytest.raises(SystemExit) as exit_:
        store_views.main([str(tmp_path / "s.zarr"), "--labels", "digits"])
    assert exit_.value.code == 2
    assert expected in capsys.readouterr().err
