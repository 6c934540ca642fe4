"""Every kind of bad input is refused with a message naming what is wrong; nothing committed is lost."""

import json
import logging

import numpy as np
import pytest
from store_helpers import N, manifest, records_for, write_epoch

from logit_store import (
    ManifestMismatchError,
    Records,
    StoreError,
    StoreInputError,
    create_store,
    open_store,
)


@pytest.fixture
def store(tmp_path):
    s = create_store(tmp_path / "s", manifest())
    write_epoch(s, 0, shards=[0])
    return s


def first_ids(n=8, start=600):
    return np.arange(start, start + n)


def good_records(store, ids):
    return records_for(store.manifest, 1, ids)


def write_one(store, ids, records):
    writer = store.writer(1, [1])
    try:
        writer.write(ids, records)
    finally:
        writer.release()


def assert_first_shard_intact(store):
    ids = np.arange(0, 512)
    np.testing.assert_array_equal(
        open_store(store.location.url).read(0, ids).values, records_for(store.manifest, 0, ids).values
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(store, bad):
    ids = first_ids()
    recs = good_records(store, ids)
    recs.values[3, 0] = bad
    with pytest.raises(StoreInputError, match=r"field 'values' holds NaN or inf \(row 3\)"):
        write_one(store, ids, recs)
    recs = good_records(store, ids)
    recs.tail_lse[2] = bad
    with pytest.raises(StoreInputError, match="field 'tail_lse' holds NaN or inf"):
        write_one(store, ids, recs)
    assert_first_shard_intact(store)


def test_logits_beyond_float16_range_are_kept_relative_to_the_top(store):
    """Version 3 keeps logits relative to the top one: a shift past float16's range is fine."""
    ids = np.arange(*store.manifest.shard_range(1))
    recs = good_records(store, ids)
    shift = 1e6  # float64 holds the shifted values exactly
    shifted = Records(
        recs.values.astype(np.float64) + shift, recs.indices, recs.tail_lse.astype(np.float64) + shift, recs.seed
    )
    with store.writer(1, [1]) as writer:
        writer.write(ids, shifted)
    got = open_store(store.location.url).read(1, ids)
    np.testing.assert_array_equal(got.values, recs.values)
    np.testing.assert_array_equal(got.tail_lse, recs.tail_lse)
    bad_tail = Records(recs.values[:8], recs.indices[:8], np.full(8, np.log(45) + 0.3), recs.seed[:8])
    writer = store.writer(1, [2])
    with pytest.raises(
        StoreInputError, match=r"'tail_lse' minus the top logit is 4.107 \(row 0\): more than log\(C - k\) = 3.807"
    ):
        writer.write(ids[:8] + 512, bad_tail)
    writer.release()


def test_wrong_shapes(store):
    ids = first_ids()
    recs = good_records(store, ids)
    recs.values = recs.values[:, :3]
    with pytest.raises(StoreInputError, match=r"field 'values' has shape \(8, 3\), expected \(8, 5\)"):
        write_one(store, ids, recs)
    recs = good_records(store, ids)
    with pytest.raises(StoreInputError, match="9 ids but 8 records"):
        write_one(store, first_ids(9), recs)
    with pytest.raises(StoreInputError, match="ids must be a 1-D integer array"):
        write_one(store, ids.reshape(2, 4), recs)


def test_wrong_dtypes(store):
    ids = first_ids()
    recs = good_records(store, ids)
    recs.indices = recs.indices.astype(np.float32)
    with pytest.raises(
        StoreInputError, match=r"field 'indices' has dtype float32, expected an integer dtype \(uint16\)"
    ):
        write_one(store, ids, recs)
    recs = good_records(store, ids)
    recs.values = recs.values.astype(np.int16)
    with pytest.raises(StoreInputError, match="field 'values' has dtype int16, expected a floating dtype"):
        write_one(store, ids, recs)


def test_unsorted_values(store):
    ids = first_ids()
    recs = good_records(store, ids)
    recs.values = recs.values[:, ::-1].copy()
    with pytest.raises(StoreInputError, match="sorted descending"):
        write_one(store, ids, recs)


def test_ids_out_of_range_and_duplicates(store):
    recs = good_records(store, first_ids())
    with pytest.raises(StoreInputError, match=rf"ids out of range: \[600, {N + 3}\], expected \[0, {N}\)"):
        write_one(store, np.r_[first_ids(7), N + 3], recs)
    with pytest.raises(StoreInputError, match="ids hold duplicates"):
        write_one(store, np.r_[first_ids(7), 600], recs)
    with pytest.raises(StoreInputError, match="ids out of range"):
        store.read(0, [-1])
    with pytest.raises(StoreInputError, match=r"epoch 5 is outside the store's epochs \[0, 2\)"):
        store.read(5, [0])


def test_class_index_out_of_range(store):
    ids = first_ids()
    recs = good_records(store, ids)
    recs.indices[1, 2] = 50
    with pytest.raises(StoreInputError, match=r"field 'indices' has values in \[0, 50\], expected \[0, 50\)"):
        write_one(store, ids, recs)


def test_mixing_fields_must_match_the_manifest(store, tmp_path):
    ids = first_ids()
    recs = good_records(store, ids)
    recs.partner = ids
    with pytest.raises(StoreInputError, match="field 'partner' is given, but the store has mixing=False"):
        write_one(store, ids, recs)
    mixed = create_store(tmp_path / "mixed", manifest(mixing=True))
    with pytest.raises(StoreInputError, match="field 'partner' is missing, but the store has mixing=True"):
        write_one(mixed, ids, good_records(store, ids))


def test_ids_outside_the_writers_shards(store):
    ids = np.arange(1500, 1508)
    with pytest.raises(StoreInputError, match=r"shards \[2\] are not claimed by this writer"):
        write_one(store, ids, good_records(store, ids))


def test_committed_records_are_never_overwritten(store):
    with pytest.raises(StoreError, match=r"epoch 0 shards \[0\] are already committed"):
        store.writer(0, [0])
    writer = store.writer(1, [1])
    ids = first_ids()
    writer.write(ids, good_records(store, ids))
    with pytest.raises(StoreInputError, match="id 600 was already written in this epoch"):
        writer.write(ids[:1], good_records(store, ids[:1]))
    writer.release()
    assert_first_shard_intact(store)


def test_incomplete_shard_is_not_committed(store):
    ids = first_ids()
    with (
        pytest.raises(StoreError, match=r"shards \{1: 504\} .* were not complete; nothing of them was committed"),
        store.writer(1, [1]) as writer,
    ):
        writer.write(ids, good_records(store, ids))
    assert store.pending_shards(1) == list(range(store.manifest.num_shards))


def test_reopen_with_a_different_manifest(store, tmp_path):
    with pytest.raises(ManifestMismatchError, match=r"k: store has 5, asked for 4") as err:
        create_store(tmp_path / "s", manifest(k=4, teacher={"spec": "timm:resnet18", "weights_sha256": "ab"}))
    assert "teacher.spec: store has None, asked for 'timm:resnet18'" in str(err.value)
    assert "\n" not in str(err.value)  # every field on the one line
    with pytest.raises(ManifestMismatchError, match="backend: store has 'zarr', asked for 'lmdb'"):
        create_store(tmp_path / "s", manifest("lmdb"))
    assert_first_shard_intact(store)
    assert create_store(tmp_path / "s", manifest()).committed_shards(0) == {0}  # same manifest resumes


@pytest.mark.parametrize("backend", ["zarr", "lmdb"])
def test_a_store_without_committed_records_is_replaced_by_another_manifest(tmp_path, caplog, backend):
    """What a failed save leaves (created, nothing committed) blocks no corrected command (issue 17); the
    replacement is said on the library's logger (the command-line tools print it: test_store_api)."""
    caplog.set_level(logging.WARNING, logger="logit_store")  # whatever another test left the root logger at
    create_store(tmp_path / "s", manifest(backend, k=4)).writer(0, [1]).release()  # claimed, never committed
    store = create_store(tmp_path / "s", manifest(backend))
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "logit_store.api",
            "WARNING",
            f"replacing {tmp_path / 's'}: it holds no committed record and was made with another k",
        )
    ]
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["k"] == 5
    write_epoch(store, 0, shards=[0])
    assert_first_shard_intact(store)
    assert not list(tmp_path.glob("s.tmp-*"))


def test_a_store_whose_writer_is_alive_is_not_replaced(tmp_path):
    held = create_store(tmp_path / "s", manifest(k=4)).writer(0, [1])  # a save at work on its first shard
    with pytest.raises(ManifestMismatchError, match=r"k: store has 4, asked for 5"):
        create_store(tmp_path / "s", manifest())
    held.release()


def test_bad_manifest_fields(tmp_path):
    with pytest.raises(StoreInputError, match="k=60 is larger than num_classes=50"):
        manifest(k=60)
    with pytest.raises(StoreInputError, match="'epochs' must be a positive integer, got 0"):
        manifest(epochs=0)
    with pytest.raises(StoreInputError, match="'backend' must be a back-end's name, got None"):
        manifest(None)


def test_not_a_store(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="exists, is not empty and is not a logit store"):
        create_store(tmp_path / "other", manifest())
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    with pytest.raises(StoreError, match=r"is not a logit store: it has no manifest\.json"):
        open_store(tmp_path / "other")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"num_samples": 3, "colour": "red"}))
    with pytest.raises(StoreInputError, match=r"manifest.json: unknown field\(s\) \['colour'\]"):
        open_store(tmp_path / "bad")


def test_mixing_round_trip(tmp_path):
    store = create_store(tmp_path / "m", manifest("lmdb", mixing=True, epochs=1))
    ids = np.arange(N)
    recs = records_for(store.manifest, 0, ids)
    rng = np.random.default_rng(0)
    recs = Records(
        recs.values,
        recs.indices,
        recs.tail_lse,
        recs.seed,
        partner=rng.permutation(N),
        lam=rng.random(N).astype(np.float32),
    )
    with store.writer(0) as writer:
        writer.write(ids, recs)
    got = open_store(tmp_path / "m").read(0, ids[::-1])
    np.testing.assert_array_equal(got.partner, recs.partner[::-1])
    np.testing.assert_array_equal(got.lam, recs.lam[::-1])


def test_repeated_class_and_bad_lambda(store, tmp_path):
    ids = first_ids()
    recs = good_records(store, ids)
    recs.indices[2, 1] = recs.indices[2, 0]
    with pytest.raises(StoreInputError, match="field 'indices' repeats a class within a record"):
        write_one(store, ids, recs)
    mixed = create_store(tmp_path / "mixed", manifest(mixing=True))
    recs = good_records(store, ids)
    recs.partner, recs.lam = ids, np.full(len(ids), 1.5, dtype=np.float32)
    with pytest.raises(StoreInputError, match=r"field 'lam' must lie in \[0, 1\]"):
        write_one(mixed, ids, recs)


def test_manifest_layout_and_missing_fields(tmp_path):
    with pytest.raises(StoreInputError, match="'chunk_records' must be a positive integer"):
        manifest(shard_records=1024)
    with pytest.raises(StoreInputError, match="must be a multiple of chunk_records"):
        manifest(shard_records=1000, chunk_records=256)
    path = tmp_path / "s"
    create_store(path, manifest())
    data = json.loads((path / "manifest.json").read_text())
    del data["shard_records"]
    (path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(StoreInputError, match=r"missing field\(s\) \['shard_records'\]"):
        open_store(path)
