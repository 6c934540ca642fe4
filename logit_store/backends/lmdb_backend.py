"""lmdb: one key per checksum block, (plane, block) as 8 big-endian bytes, packed rows as value.

A plane is an epoch, or an embeddings store's text plane (index = epochs).
"""

from __future__ import annotations

import os
import threading

import lmdb
import numpy as np

from ..errors import StoreInputError
from .base import Backend

MAP_SIZE = 1 << 40  # address space only; the file grows with what is written


def block_key(epoch: int, block: int) -> bytes:
    return np.array([epoch, block], dtype=">u4").tobytes()


# lmdb allows one open environment per path and process: share it, counting users.
_OPEN: dict[tuple[int, str], list] = {}
# lmdb takes one write transaction at a time, and py-lmdb crashes when two threads of a
# process (a writer's commit threads) open theirs at once: they take turns here.
_WRITE_LOCK = threading.Lock()
_OPEN_LOCK = threading.Lock()


def _acquire(path: str) -> lmdb.Environment:
    key = (os.getpid(), path)
    if key not in _OPEN:
        _OPEN[key] = [lmdb.open(path, map_size=MAP_SIZE, subdir=True, max_dbs=0), 0]
    _OPEN[key][1] += 1
    return _OPEN[key][0]


def _release(path: str) -> None:
    key = (os.getpid(), path)
    if key in _OPEN:
        _OPEN[key][1] -= 1
        if _OPEN[key][1] == 0:
            _OPEN.pop(key)[0].close()


class LmdbBackend(Backend):
    """Local filesystem only. The environment is opened lazily in each process, since an
    environment inherited through fork fails in the child (MDB_READERS_FULL)."""

    _env: lmdb.Environment | None = None
    _pid: int = -1

    @property
    def env(self) -> lmdb.Environment:
        with _OPEN_LOCK:  # a writer's commit threads may be the first to ask
            if self._env is None or self._pid != os.getpid():
                if not self.location.is_local:
                    raise StoreInputError(f"lmdb stores need a local path, got {self.location}")
                self._env = _acquire(self.location.path("lmdb"))
                self._pid = os.getpid()
            return self._env

    def create(self) -> None:
        self.env.sync(True)

    def write_rows(self, epoch: int, start: int, rows: np.ndarray) -> None:
        # Blocks of chunk_records rows, not single records: readers load whole shards, and
        # large values sit in contiguous overflow pages (~raw size) instead of half-full leaves.
        size = self.manifest.chunk_records
        items = [
            (block_key(epoch, (start + i) // size), rows[i : i + size].tobytes()) for i in range(0, len(rows), size)
        ]
        with _WRITE_LOCK, self.env.begin(write=True) as txn:
            txn.cursor().putmulti(items, dupdata=False, overwrite=True)

    def read_rows(self, epoch: int, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        size = self.manifest.chunk_records
        out = np.empty(stop - start, dtype=self.row_dtype) if out is None else out
        with self.env.begin(buffers=True) as txn:
            for first in range(start, stop, size):
                value = txn.get(block_key(epoch, first // size))
                if value is None:
                    raise KeyError(f"lmdb: epoch {epoch} records [{first}, {min(first + size, stop)}) are missing")
                block = np.frombuffer(value, dtype=np.uint8)
                n = min(size, stop - first)
                if len(block) != n * self.row_dtype.itemsize:
                    raise ValueError(f"lmdb: epoch {epoch} records [{first}, {first + n}) have a damaged value")
                out[first - start : first - start + n] = block.view(self.row_dtype)
        return out

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            _release(self.location.path("lmdb"))
        self._env = None
