"""lmdb: one key per record, (epoch, id) as 8 big-endian bytes, the packed row as value."""

from __future__ import annotations

import os

import lmdb
import numpy as np

from .base import Backend

MAP_SIZE = 1 << 40  # address space only; the file grows with what is written


def record_keys(epoch: int, start: int, stop: int) -> list[bytes]:
    keys = np.empty((stop - start, 2), dtype=">u4")
    keys[:, 0] = epoch
    keys[:, 1] = np.arange(start, stop)
    return [keys[i].tobytes() for i in range(len(keys))]


# lmdb allows one open environment per path and process: share it, counting users.
_OPEN: dict[tuple[int, str], list] = {}


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
        if self._env is None or self._pid != os.getpid():
            if not self.location.is_local:
                raise ValueError(f"lmdb stores need a local path, got {self.location}")
            self._env = _acquire(self.location.path("lmdb"))
            self._pid = os.getpid()
        return self._env

    def create(self) -> None:
        self.env.sync(True)

    def write_rows(self, epoch: int, start: int, rows: np.ndarray) -> None:
        keys = record_keys(epoch, start, start + len(rows))
        data = rows.tobytes()
        size = self.row_dtype.itemsize
        items = [(key, data[i * size : (i + 1) * size]) for i, key in enumerate(keys)]
        with self.env.begin(write=True) as txn:
            txn.cursor().putmulti(items, dupdata=False, overwrite=True)

    def read_rows(self, epoch: int, start: int, stop: int) -> np.ndarray:
        expected = record_keys(epoch, start, stop)
        with self.env.begin(buffers=False) as txn:
            found = txn.cursor().getmulti(expected)
        if len(found) != len(expected):
            have = {key for key, _ in found}
            missing = next(i for i, key in enumerate(expected) if key not in have)
            raise KeyError(f"lmdb: epoch {epoch} record {start + missing} is missing")
        rows = np.frombuffer(b"".join(value for _, value in found), dtype=self.row_dtype)
        if len(rows) != stop - start:
            raise ValueError(f"lmdb: epoch {epoch} records [{start}, {stop}) have damaged values")
        return rows.copy()

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            _release(self.location.path("lmdb"))
        self._env = None
