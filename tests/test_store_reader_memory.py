"""A reader's own memory stays under `cache_bytes` whatever the store's size, and the readers of
one node share a single decoded copy of a plane (logit_store.cache)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from store_helpers import synthetic_records, write_in_order

from logit_store import Manifest, create_store, open_store

N, C, K = 160_000, 1000, 100
ROW = 2 * K + 2 * K + 2 + 4  # bytes of a packed version-3 row: codes, uint16 indices, tail code, seed
BOUND = 8 << 20
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reader") / "store"
    write_in_order(create_store(path, Manifest(num_samples=N, num_classes=C, k=K, epochs=1)), 0)
    return path


def start_probe(store: Path, cache_bytes: int, cache_dir: Path, hold: bool = False) -> subprocess.Popen:
    """A fresh process that reads the whole epoch in random batches (store_helpers.probe_reader)."""
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); from store_helpers import probe_reader; "
        f"probe_reader({str(store)!r}, {cache_bytes}, {str(cache_dir)!r}, hold={hold})"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def probe(store: Path, cache_bytes: int, cache_dir: Path) -> dict:
    out, _ = start_probe(store, cache_bytes, cache_dir).communicate()
    return json.loads(out)


def test_private_memory_stays_under_the_bound_over_a_whole_epoch(big_store, tmp_path):
    epoch_bytes = N * ROW
    assert epoch_bytes > 7 * BOUND
    bounded = probe(big_store, BOUND, tmp_path / "cache")
    assert bounded["decodes"] >= open_store(big_store).manifest.num_shards  # it did decode the whole epoch
    assert bounded["held"] <= BOUND  # the reader's own accounting
    assert bounded["growth"] <= BOUND  # what the kernel says: private resident memory
    # The same probe with a budget that holds the epoch sees it: the measurement is not blind.
    unbounded = probe(big_store, 1 << 30, tmp_path / "cache")
    assert unbounded["held"] == epoch_bytes and unbounded["growth"] >= 0.8 * epoch_bytes
    assert list((tmp_path / "cache").iterdir()) == []  # the last reader deleted the shared file


def test_shared_reads_equal_the_records(big_store, tmp_path):
    store = open_store(big_store, cache_bytes=BOUND, cache_dir=str(tmp_path))
    ids = np.random.default_rng(3).permutation(N)[:5000]
    got, want = store.read(0, ids), synthetic_records(store.manifest, 0, ids)
    for name in ("values", "indices", "tail_lse", "seed"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert store.private_cache_bytes == 0
    store.close()


def test_readers_of_a_node_decode_each_piece_once(big_store, tmp_path):
    """Two processes read the same epoch at once; each piece is decoded by one of them only."""
    one = probe(big_store, BOUND, tmp_path / "alone")["decodes"]
    probes = [start_probe(big_store, BOUND, tmp_path / "cache", hold=True) for _ in range(2)]
    counts = [json.loads(p.stdout.readline())["decodes"] for p in probes]  # both still hold the file
    assert len(list((tmp_path / "cache").iterdir())) == 1
    for p in probes:
        p.communicate("")
    assert sum(counts) == one
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_shard_left_half_filled_is_decoded_again(big_store, tmp_path):
    first = open_store(big_store, cache_bytes=BOUND, cache_dir=str(tmp_path))
    first.read(0, np.arange(N))
    (path,) = tmp_path.iterdir()
    m = first.manifest
    with open(path, "r+b") as fh:  # as a crash mid-fill leaves it: shard 2's stamp cleared, rows torn
        fh.seek(N * ROW + 2 * 16)
        fh.write(bytes(16))
        fh.seek(m.shard_range(2)[0] * ROW)
        fh.write(b"\xff" * 1000 * ROW)
    second = open_store(big_store, cache_bytes=BOUND, cache_dir=str(tmp_path))
    decoded = []
    read_rows = second.backend.read_rows
    second.backend.read_rows = lambda *a, **kw: decoded.append(a[1]) or read_rows(*a, **kw)
    ids = np.arange(*m.shard_range(2))
    np.testing.assert_array_equal(second.read(0, ids).values, synthetic_records(m, 0, ids).values)
    assert decoded and all(m.shard_range(2)[0] <= start < m.shard_range(2)[1] for start in decoded)
    second.read(0, np.arange(N))  # every other shard is taken from the file as the first reader left it
    assert all(m.shard_range(2)[0] <= start < m.shard_range(2)[1] for start in decoded)
    first.close()
    assert path.exists()  # the second reader still holds it
    second.close()
    assert not path.exists()


def test_a_store_rebuilt_at_the_same_path_is_never_served_stale_rows(tmp_path):
    """Shared files are named by location and manifest, and each shard is checked against its
    commit marker's digests: new content at the same path is decoded afresh."""
    m = Manifest(num_samples=4096, num_classes=C, k=K, epochs=1)
    readers = []
    for content_epoch in (0, 1):  # the second store holds other records under the same manifest
        shutil.rmtree(tmp_path / "s", ignore_errors=True)
        store = create_store(tmp_path / "s", m)
        write_in_order(store, 0, make=lambda m, _, ids, e=content_epoch: synthetic_records(m, e, ids))
        readers.append(open_store(tmp_path / "s", cache_bytes=1 << 16, cache_dir=str(tmp_path / "cache")))
        ids = np.arange(4096)
        np.testing.assert_array_equal(readers[-1].read(0, ids).values, synthetic_records(m, content_epoch, ids).values)
    for reader in readers:
        reader.close()
