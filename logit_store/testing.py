"""The contract every storage back-end keeps, as one base test class (in the style of zarr's `zarr.testing.store`).

For the authors of a back-end, in this package or another: register it under the entry-point group
`logit_store.backends` (in pyproject.toml: `[project.entry-points."logit_store.backends"]`,
`mine = "my_package.backend:MyBackend"`, a subclass of `logit_store.backends.Backend`), then subclass
`StoreContract` in a test module, name the back-end and say how to damage the bytes of one written block:

    from logit_store.testing import StoreContract

    class TestMine(StoreContract):
        backend = "mine"

        def damage_block(self, path, epoch, record, row_bytes):
            ...  # change one byte of `record`'s block in `epoch`, leaving the rest intact

pytest collects the subclass's tests (this toolkit's own: tests/test_store_backends.py). This module imports
pytest: only tests import it, and nothing in the library does.

The contract (logit_store.backends.base.Backend): `create` lays out an empty store; `write_rows` takes one whole
shard of packed rows; `read_rows(epoch, start, stop)` gives them back bit for bit for any [start, stop), within or
across shards; reading writes nothing (a read-only mount works); `close`
and a reopen, in this process or another, see the same rows; `grow` makes room for the planes of a manifest
with more epochs, keeping every row. Over it, the store's commit markers, checks and
refusals hold for every backend alike.
"""

from __future__ import annotations

import pickle
import re
import stat
from pathlib import Path

import numpy as np
import pytest

from . import Manifest, NotCommittedError, StoreDamagedError, create_store, open_store
from .backends import create_backend
from .location import StoreLocation
from .records import block_digest

__all__ = ["StoreContract", "listing", "random_rows"]


def random_rows(m: Manifest, dtype: np.dtype, epoch: int, start: int, stop: int) -> np.ndarray:
    """Packed rows of arbitrary bytes (a backend stores rows, not records), fixed by (epoch, start)."""
    raw = np.random.default_rng([epoch, start]).integers(0, 256, (stop - start) * dtype.itemsize, dtype=np.uint8)
    rows = raw.view(dtype)
    if "indices" in dtype.names:  # but for the class indices, which the store's reads check against num_classes
        rows["indices"] %= m.num_classes
    return rows


def listing(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under root: (mode, size, mtime in ns), by relative path."""
    return {str(p.relative_to(root)): (p.lstat().st_mode, p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in [root, *root.rglob("*")]}  # fmt: skip


class StoreContract:
    """The contract's tests; a subclass sets `backend` and implements `damage_block` (module docstring)."""

    backend: str  # the subclass's back-end name, as registered

    def damage_block(self, path: Path, epoch: int, record: int, row_bytes: int) -> None:
        """Change one byte of the stored bytes of `record`'s block in `epoch`, leaving the rest intact."""
        raise NotImplementedError

    # ---- fixtures ------------------------------------------------------------------------------

    @pytest.fixture
    def m(self) -> Manifest:
        """A small logits store of 3 shards (the last one short), 4 blocks per shard."""
        return Manifest(
            num_samples=1100, num_classes=50, k=5, epochs=2, backend=self.backend, global_seed=7,
            shard_records=512, chunk_records=128,
        )  # fmt: skip

    @pytest.fixture
    def written(self, tmp_path, m) -> tuple[Path, dict[int, np.ndarray]]:
        """A store whose epoch 0 is written whole through the backend (nothing committed)."""
        path = tmp_path / "s"
        store = create_store(path, m)
        rows = random_rows(m, store.backend.row_dtype, 0, 0, m.num_samples)
        for shard in range(m.num_shards):
            start, stop = m.shard_range(shard)
            store.backend.write_rows(0, start, rows[start:stop])
        store.close()
        return path, {0: rows}

    @pytest.fixture
    def committed(self, tmp_path, m) -> tuple[Path, np.ndarray]:
        """A store whose epoch 0 is committed whole through a writer; returns its rows."""
        path = tmp_path / "c"
        store = create_store(path, m)
        rows = random_rows(m, store.backend.row_dtype, 0, 0, m.num_samples)
        with store.writer(0) as writer:
            for shard in range(m.num_shards):
                writer.commit_rows(shard, rows[slice(*m.shard_range(shard))], {"records": 0})
        store.close()
        return path, rows

    # ---- the Backend interface ------------------------------------------------------------------

    def test_rows_round_trip_bit_for_bit(self, written, m):
        path, rows = written
        backend = create_backend(StoreLocation(path), m)
        assert backend.read_rows(0, 0, m.num_samples).tobytes() == rows[0].tobytes()
        out = np.zeros(m.shard_records, dtype=backend.row_dtype)
        assert backend.read_rows(0, 0, m.shard_records, out) is out and out.tobytes() == rows[0][: len(out)].tobytes()
        backend.close()

    def test_partial_ranges_within_and_across_shards(self, written, m):
        path, rows = written
        backend = create_backend(StoreLocation(path), m)
        chunk, shard = m.chunk_records, m.shard_records
        ranges = [(chunk, 2 * chunk + 5), (shard - chunk, shard + 3), (2 * shard, m.num_samples), (0, 1), (7, 300)]
        for start, stop in ranges:
            assert backend.read_rows(0, start, stop).tobytes() == rows[0][start:stop].tobytes(), (start, stop)
        backend.close()

    def test_reopening_sees_the_same_rows(self, written, m):
        path, rows = written
        first = create_backend(StoreLocation(path), m)
        first.read_rows(0, 0, 10)
        first.close()
        again = pickle.loads(pickle.dumps(open_store(path)))  # as a DataLoader worker gets it
        assert again.backend.read_rows(0, 0, m.num_samples).tobytes() == rows[0].tobytes()

    # ---- commits, checks and refusals over the backend --------------------------------------------

    def test_rows_written_but_not_committed_are_refused(self, written, m):
        store = open_store(written[0])
        assert store.pending_shards(0) == list(range(m.num_shards))
        with pytest.raises(NotCommittedError, match=r"epoch 0 records \[0, \d+\) are not committed"):
            store.read(0, [1])
        with pytest.raises(NotCommittedError, match=r"epoch 1 records"):
            store.read(1, [1])  # never written at all

    def test_commit_markers_hold_the_digests_of_their_blocks(self, committed, m):
        path, rows = committed
        store = open_store(path)
        assert store.committed_shards(0) == set(range(m.num_shards)) and store.pending_shards(1) == [0, 1, 2]
        for (epoch, shard), marker in store.commits().items():
            start, stop = m.shard_range(shard)
            blocks = [rows[a : min(a + m.chunk_records, stop)] for a in range(start, stop, m.chunk_records)]
            assert (epoch, marker["start"], marker["stop"]) == (0, start, stop)
            assert marker["digests"] == [block_digest(b) for b in blocks]
        ids = np.random.default_rng(0).permutation(m.num_samples)[:300]
        assert store.read(0, ids).seed.tolist() == rows["seed"][ids].tolist()

    def test_verify_finds_nothing_in_an_intact_store_and_one_damaged_block(self, committed, m):
        path, _ = committed
        store = open_store(path)
        assert [str(p) for p in store.verify()] == [f"epoch 1 records [{a}, {b}): missing (not committed)"
                                                     for a, b in map(m.shard_range, range(m.num_shards))]  # fmt: skip
        store.close()  # (lmdb: one environment per path and process; damage_block opens its own)
        record = m.shard_records + m.chunk_records + 7  # shard 1's second block
        self.damage_block(path, 0, record, store.backend.row_dtype.itemsize)
        damaged = [p for p in open_store(path).verify() if p.kind == "damaged"]
        first = record // m.chunk_records * m.chunk_records
        assert [(p.epoch, p.start, p.stop) for p in damaged] == [(0, first, first + m.chunk_records)]
        with pytest.raises(StoreDamagedError, match=re.escape(f"epoch 0 records [{first}, {first + m.chunk_records})")):
            open_store(path).read(0, [record])
        assert open_store(path).read(0, [0]).seed.size == 1  # other shards still read

    def test_reading_writes_nothing_and_works_read_only(self, committed):
        path, rows = committed
        for p in [path, *path.rglob("*")]:  # a read-only mount, as far as chmod goes (as root: the listing shows it)
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        before = listing(path)
        store = open_store(path)
        assert store.read(0, [3, 900]).seed.tolist() == rows["seed"][[3, 900]].tolist()
        assert [p.kind for p in store.verify()] == ["missing"] * store.manifest.num_shards
        store.info()
        store.close()
        assert listing(path) == before

    def test_reopening_for_writing_resumes_and_keeps_what_is_committed(self, committed, m):
        path, rows = committed
        store = create_store(path, m)
        assert store.committed_shards(0) == set(range(m.num_shards))
        more = random_rows(m, store.backend.row_dtype, 1, 0, m.num_samples)
        with store.writer(1, [0]) as writer:
            writer.commit_rows(0, more[: m.shard_records], {"records": 0})
        reader = open_store(path)
        assert reader.read(1, [5]).seed.tolist() == more["seed"][[5]].tolist()
        assert reader.read(0, [5]).seed.tolist() == rows["seed"][[5]].tolist()

    def test_growing_keeps_every_row_and_makes_room_for_new_planes(self, committed, m):
        """`Backend.grow`: after `LogitStore.grow`, the new planes take whole shards like any other and every
        row already there reads back, for a reader opened before the grow too."""
        path, rows = committed
        before = open_store(path, read_only=True)
        assert before.read(0, [5]).seed.tolist() == rows["seed"][[5]].tolist()
        store = create_store(path, m)
        store.grow(m.epochs + 2)
        new = random_rows(m, store.backend.row_dtype, m.epochs + 1, 0, m.num_samples)
        with store.writer(m.epochs + 1) as writer:
            for shard in range(m.num_shards):
                writer.commit_rows(shard, new[slice(*m.shard_range(shard))], {"records": 0})
        after = open_store(path)
        assert after.manifest.epochs == m.epochs + 2
        assert {(p.kind, p.epoch) for p in after.verify()} == {("missing", 1), ("missing", m.epochs)}
        ids = np.random.default_rng(1).permutation(m.num_samples)[:300]
        assert after.read(m.epochs + 1, ids).seed.tolist() == new["seed"][ids].tolist()
        assert after.read(0, ids).seed.tolist() == before.read(0, ids).seed.tolist() == rows["seed"][ids].tolist()
