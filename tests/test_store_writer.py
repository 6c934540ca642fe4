"""The writer commits whole shards on a background thread: its errors still surface, a failed
range stays uncommitted and claimable, and a sealed shard takes no more records."""

import numpy as np
import pytest
from store_helpers import manifest, records_for, write_epoch

from logit_store import ShardWriter, StoreInputError, create_store, open_store


def test_a_failed_commit_raises_and_leaves_its_range_uncommitted(tmp_path):
    store = create_store(tmp_path / "s", manifest())
    write_rows = store.backend.write_rows

    def failing(epoch, start, rows):
        if start == store.manifest.shard_range(1)[0]:
            raise OSError("no space left on device")
        write_rows(epoch, start, rows)

    store.backend.write_rows = failing
    with pytest.raises(OSError, match="no space left"):
        write_epoch(store, 0, order_seed=3)
    assert 1 in store.pending_shards(0)
    store.backend.write_rows = write_rows
    write_epoch(store, 0, shards=store.pending_shards(0))  # the range was released: resume takes it
    assert {p.epoch for p in open_store(tmp_path / "s").verify()} == {1}  # epoch 0 intact; 1 never written
    assert store.pending_shards(0) == []


def test_a_sealed_shard_takes_no_more_records_and_flush_commits_it(tmp_path):
    store = create_store(tmp_path / "s", manifest())
    ids = np.arange(*store.manifest.shard_range(2))
    writer = store.writer(0, [2, 3])
    try:
        assert writer.write(ids, records_for(store.manifest, 0, ids)) == [2]
        with pytest.raises(StoreInputError, match=r"shards \[2\] are not claimed by this writer"):
            writer.write(ids[:4], records_for(store.manifest, 0, ids[:4]))
        writer.flush()
        assert store.committed_shards(0) == {2}  # committed before the writer closes
    finally:
        writer.release()


@pytest.mark.parametrize("sealed", [0, 2])
def test_background_and_inline_commits_write_the_same_bytes(tmp_path, monkeypatch, sealed):
    monkeypatch.setattr(ShardWriter, "MAX_SEALED", sealed)
    store = create_store(tmp_path / "s", manifest())
    write_epoch(store, 0, order_seed=1)
    reference = create_store(tmp_path / "r", manifest("lmdb"))
    monkeypatch.setattr(ShardWriter, "MAX_SEALED", 2 - sealed)
    write_epoch(reference, 0, order_seed=2, batch=300)
    assert store.epoch_hash(0) == reference.epoch_hash(0)
    assert store.info()["statistics"] == reference.info()["statistics"]
