"""Round trips, layout, seeds, info and convert on both backends."""

import json

import numpy as np
import pytest
from store_helpers import EPOCHS, C, N, manifest, records_for, write_epoch

from logit_store import convert_store, create_store, open_store, record_seeds
from logit_store.cli import main as store_cli

BACKENDS = ["zarr", "lmdb"]


@pytest.fixture(params=BACKENDS)
def full_store(request, tmp_path):
    store = create_store(tmp_path / "store", manifest(request.param))
    for epoch in range(EPOCHS):
        write_epoch(store, epoch, order_seed=epoch)
    return open_store(tmp_path / "store")


def test_round_trip_random_order(full_store):
    m = full_store.manifest
    rng = np.random.default_rng(1)
    for epoch in range(EPOCHS):
        ids = rng.permutation(N)[:700]
        got = full_store.read(epoch, ids)
        want = records_for(m, epoch, ids)
        for name in ("values", "indices", "tail_lse", "seed"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
        assert got.indices.dtype == np.uint16 and got.values.dtype == got.tail_lse.dtype == np.float32
        np.testing.assert_array_equal(got.seed, record_seeds(m.global_seed, epoch, ids))


def test_info_and_statistics(full_store):
    info = full_store.info()
    assert info["completed_epochs"] == list(range(EPOCHS))
    assert info["records"] == EPOCHS * N
    stats = info["statistics"]
    assert stats["records"] == EPOCHS * N
    assert 0.9 < stats["mean_topk_mass"] <= 1.0  # peaked logits keep nearly all mass in the top k
    assert stats["teacher_top1_agreement"] == 1.0  # the boosted class is id % C, the label we passed
    assert len(info["content_hashes"]) == EPOCHS


def test_content_hash_ignores_write_order_and_backend(tmp_path):
    hashes = []
    for i, backend in enumerate(BACKENDS):
        store = create_store(tmp_path / backend, manifest(backend))
        write_epoch(store, 0, order_seed=i, batch=97 + i * 60)
        hashes.append(store.epoch_hash(0))
    assert hashes[0] == hashes[1]


def test_convert_zarr_lmdb_zarr_keeps_content(tmp_path, capsys):
    src = create_store(tmp_path / "a.zarr", manifest("zarr"))
    for epoch in range(EPOCHS):
        write_epoch(src, epoch)
    assert store_cli(["convert", str(tmp_path / "a.zarr"), str(tmp_path / "b.lmdb")]) == 0
    assert store_cli(["convert", str(tmp_path / "b.lmdb"), str(tmp_path / "c.zarr")]) == 0
    capsys.readouterr()
    infos = []
    for name in ("a.zarr", "b.lmdb", "c.zarr"):
        assert store_cli(["info", str(tmp_path / name), "--json"]) == 0
        infos.append(json.loads(capsys.readouterr().out))
    assert [i["manifest"]["backend"] for i in infos] == ["zarr", "lmdb", "zarr"]
    for info in infos[1:]:
        assert info["content_hashes"] == infos[0]["content_hashes"]
        assert info["statistics"] == infos[0]["statistics"]
        assert info["records"] == infos[0]["records"]
    assert store_cli(["verify", str(tmp_path / "c.zarr")]) == 0


def test_convert_resumes(tmp_path):
    src = create_store(tmp_path / "a", manifest("zarr"))
    write_epoch(src, 0)
    write_epoch(src, 1, shards=[0, 1])
    partial = convert_store(src, tmp_path / "b", "lmdb")
    assert partial.info()["records"] == N + 2 * src.manifest.shard_records
    write_epoch(src, 1, shards=src.pending_shards(1))
    assert convert_store(src, tmp_path / "b", "lmdb").info()["content_hashes"] == src.info()["content_hashes"]


def test_store_survives_pickling_into_workers(full_store):
    import pickle

    clone = pickle.loads(pickle.dumps(full_store))
    ids = np.arange(0, N, 7)
    np.testing.assert_array_equal(clone.read(1, ids).values, full_store.read(1, ids).values)


def test_index_dtype_widens_past_65536_classes(tmp_path):
    m = manifest(num_classes=70_000, k=3, num_samples=64, epochs=1)
    assert m.dtypes["indices"] == "int32"
    assert manifest(num_classes=65_536).dtypes["indices"] == "uint16"
    assert C < 65_536


def test_k_equal_to_classes_has_no_tail(tmp_path):
    """k = C: the tail code is the no-tail sentinel, read back as -65504 (the lowest float16)."""
    store = create_store(tmp_path / "s", manifest(num_classes=5, k=5, num_samples=512, epochs=1))
    write_epoch(store, 0)
    got = open_store(tmp_path / "s").read(0, np.arange(0, 512, 5))
    np.testing.assert_array_equal(got.tail_lse, np.full(len(got), -65504.0, np.float32))
    assert (got.values[:, 0] == 0).all() and (np.diff(got.values, axis=1) <= 0).all()
    assert open_store(tmp_path / "s").info()["statistics"]["mean_topk_mass"] == 1.0


@pytest.mark.parametrize(
    ("global_seed", "epoch", "ids", "seeds"),
    [
        (0, 0, [0, 1, 2, 1436], [0, 3012780747, 4227272529, 2534152765]),
        (7, 3, [0, 5, 999_999], [936413989, 938761439, 912878844]),
        (2**31, 89, [14_197_102], [395248846]),
    ],
)
def test_record_seeds_are_the_formats_constants(global_seed, epoch, ids, seeds):
    """record_seeds is part of the store format (docs/STORE_FORMAT.md): pinned values, so a changed constant fails."""
    assert record_seeds(global_seed, epoch, np.array(ids)).tolist() == seeds
