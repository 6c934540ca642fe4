"""lmdb: one key per checksum block, (plane, block) as 8 big-endian bytes, packed rows as value.

A plane is an epoch, or an embeddings store's text plane (index = epochs).

Readers open the environment read-only and without lmdb's lock file (`readonly=True,
lock=False`): reading writes nothing, so a store on a read-only mount is read as it is, and
verify leaves a damaged store exactly as it found it. A read transaction is one call of
`read_rows`; the commit's digests catch a block a concurrent writer recycled under it.
Before any environment is mapped, data.mdb is checked against its own meta pages
(`check_data_file`): a truncated file would otherwise kill the process with SIGBUS.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
from dataclasses import dataclass

import lmdb
import numpy as np

from ..errors import DiskFullError, StoreDamagedError, StoreInputError
from ..location import StoreLocation
from ..manifest import Manifest
from .base import Backend

MAP_SIZE = 1 << 40  # address space only; the file grows with what is written
DATA_FILE = "data.mdb"
# lmdb's meta page (lmdb.h, mdb.c; 64-bit little-endian build): a 16-byte page header, then
# mm_magic, mm_version, mm_address, mm_mapsize, the free DB's md_pad (= the page size),
# the rest of both MDB_db records, mm_last_pg and mm_txnid. Pages 0 and 1 are the two metas.
_META = struct.Struct("<IIQQI92xQQ")
_META_AT, MAGIC = 16, 0xBEEFC0DE


def block_key(epoch: int, block: int) -> bytes:
    return np.array([epoch, block], dtype=">u4").tobytes()


def check_data_file(directory: str, must_exist: bool) -> None:
    """Raise StoreDamagedError unless `directory`/data.mdb is at least as long as its newest meta
    page says (pages 0..mm_last_pg, each of the page size). A missing file is damage only when
    `must_exist` (a reader's); a writer's lmdb creates it."""
    path = os.path.join(directory, DATA_FILE)
    try:
        with open(path, "rb") as fh:
            head = fh.read(_META_AT + _META.size)
            size = os.fstat(fh.fileno()).st_size
            metas = [_meta(head)]
            if metas[0] is not None:
                fh.seek(metas[0][1])
                metas.append(_meta(fh.read(_META_AT + _META.size)))
    except FileNotFoundError:
        if must_exist:
            raise StoreDamagedError(f"{path} is missing (the lmdb data file of this store)") from None
        return
    valid = [m for m in metas if m is not None]
    if not valid:
        raise StoreDamagedError(f"{path} is not an lmdb data file: no valid meta page ({size} bytes)")
    txnid, page, last = max(valid)
    if size < (last + 1) * page:
        raise StoreDamagedError(
            f"{path} is truncated: {size} bytes, but its meta page (txn {txnid}) needs "
            f"{(last + 1) * page} ({last + 1} pages of {page} bytes)"
        )


def _meta(page: bytes) -> tuple[int, int, int] | None:
    """(txnid, page size, last page) of one meta page, or None if it is not one."""
    if len(page) < _META_AT + _META.size:
        return None
    magic, _version, _address, _mapsize, psize, last, txnid = _META.unpack_from(page, _META_AT)
    if magic != MAGIC or psize < 512 or psize & (psize - 1):
        return None
    return txnid, psize, last


def full_disk_eio(err: lmdb.Error, directory: str, needed: int) -> DiskFullError | None:
    """The DiskFullError for lmdb's EIO (`mdb_txn_commit: Input/output error`), which is what lmdb reports
    when a commit's page writes fail on a full disk, or None. The rule: an EIO while the store's file system
    has less room left than the commit writes (`needed`) is the full disk; with room enough it is a real
    I/O error, and stays one."""
    if os.strerror(errno.EIO) not in str(err):
        return None
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    # root may write into the blocks the file system reserves: what it has left is f_bfree, not f_bavail
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    if free >= needed:
        return None
    return DiskFullError(
        f"disk full: cannot write {os.path.join(directory, DATA_FILE)} (lmdb reports an I/O error, and its file "
        f"system has {free} bytes free, fewer than the {needed} this commit writes); free space, then run again"
    )


def commit_bytes(values: list[bytes], page: int) -> int:
    """What a commit of these values writes at least: each in overflow pages (a 16-byte page header), plus
    a leaf, a branch and a meta page."""
    return sum(-(-(len(value) + 16) // page) * page for value in values) + 3 * page


@dataclass
class _Shared:
    """One environment of a path in this process, and how many backends use it."""

    env: lmdb.Environment
    readonly: bool
    users: int = 0
    file: tuple[int, ...] | None = None  # data.mdb as it was when a read-only env mapped it (`_file_stamp`)


# lmdb allows one open environment per path and process: share it, counting users.
_OPEN: dict[tuple[int, str], _Shared] = {}
# lmdb takes one write transaction at a time, and py-lmdb crashes when two threads of a
# process (a writer's commit threads) open theirs at once: they take turns here.
_WRITE_LOCK = threading.Lock()
_OPEN_LOCK = threading.Lock()


def _open(path: str, write: bool) -> lmdb.Environment:
    check_data_file(path, must_exist=not write)
    if write:
        return lmdb.open(path, map_size=MAP_SIZE, subdir=True, max_dbs=0)
    return lmdb.open(path, map_size=MAP_SIZE, subdir=True, max_dbs=0, readonly=True, lock=False, create=False)


def _file_stamp(path: str) -> tuple[int, ...] | None:
    """What tells one data.mdb from another at `path` (a store replaced there) or from itself written since."""
    try:
        st = os.stat(os.path.join(path, DATA_FILE))
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _acquire(path: str, write: bool) -> _Shared:
    """The process's environment of `path`; a read-only one is reopened for writing when a writer asks."""
    key = (os.getpid(), path)
    shared = _OPEN.get(key)
    if shared is None:
        shared = _OPEN[key] = _Shared(_open(path, write), readonly=not write, file=_file_stamp(path))
    elif write and shared.readonly:
        shared.env.close()
        shared.env, shared.readonly = _open(path, True), False
    shared.users += 1
    return shared


def _follow_file(shared: _Shared, path: str) -> None:
    """Reopen a read-only environment whose data.mdb changed since it was mapped: a store replaced at the
    path (its folder removed, another copied in) would otherwise still be read from the deleted file."""
    now = _file_stamp(path)
    if shared.readonly and now != shared.file:
        shared.env.close()
        shared.env, shared.file = _open(path, False), now


def _release(path: str) -> None:
    key = (os.getpid(), path)
    if key in _OPEN:
        _OPEN[key].users -= 1
        if _OPEN[key].users == 0:
            _OPEN.pop(key).env.close()


class LmdbBackend(Backend):
    """Local filesystem only. The environment is opened lazily in each process, since an
    environment inherited through fork fails in the child (MDB_READERS_FULL): read-only until
    this process writes."""

    _shared: _Shared | None = None
    _pid: int = -1

    def __init__(self, location: StoreLocation, manifest: Manifest) -> None:
        if not location.is_local:  # lmdb maps a local file: no URL, whether to write or to read
            raise StoreInputError(
                f"lmdb stores need a local path, got {location}; use a local folder, or a zarr store at a URL "
                "(distill-store convert copies one into the other)"
            )
        super().__init__(location, manifest)

    def _env(self, write: bool) -> lmdb.Environment:
        with _OPEN_LOCK:  # a writer's commit threads may be the first to ask
            path = self.location.path("lmdb")
            if self._shared is None or self._pid != os.getpid():
                self._shared, self._pid = _acquire(path, write), os.getpid()
            elif write and self._shared.readonly:
                _release(path)
                self._shared = _acquire(path, write)
            elif not write:
                _follow_file(self._shared, path)
            return self._shared.env

    @property
    def env(self) -> lmdb.Environment:
        """The environment as a reader has it (read-only unless this process writes)."""
        return self._env(write=False)

    def create(self) -> None:
        self._env(write=True).sync(True)

    def write_rows(self, epoch: int, start: int, rows: np.ndarray) -> None:
        # Blocks of chunk_records rows, not single records: readers load whole shards, and
        # large values sit in contiguous overflow pages (~raw size) instead of half-full leaves.
        size = self.manifest.chunk_records
        items = [
            (block_key(epoch, (start + i) // size), rows[i : i + size].tobytes()) for i in range(0, len(rows), size)
        ]
        env = self._env(write=True)
        try:
            with _WRITE_LOCK, env.begin(write=True) as txn:
                txn.cursor().putmulti(items, dupdata=False, overwrite=True)
        except lmdb.Error as err:
            # lmdb's page is the OS page (mdb_env_create); no lmdb call here, on an environment that just failed
            needed = commit_bytes([value for _, value in items], mmap.PAGESIZE)
            full = full_disk_eio(err, self.location.path("lmdb"), needed)
            if full is None:
                raise
            raise full from err

    def check_shared(self) -> None:
        """data.mdb (its meta pages, its length, the file itself) serves every range: it must be whole and open."""
        path = self.location.path("lmdb")
        check_data_file(path, must_exist=True)
        try:
            self.env  # noqa: B018 (opening it is the check)
        except (lmdb.InvalidError, lmdb.VersionMismatchError, lmdb.CorruptedError) as err:
            raise StoreDamagedError(f"{os.path.join(path, DATA_FILE)} cannot be opened: {err}") from err

    def read_rows(self, epoch: int, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Any [start, stop): each block it touches is checked whole (its value's exact length), then cut."""
        size, total = self.manifest.chunk_records, self.manifest.num_samples
        out = np.empty(stop - start, dtype=self.row_dtype) if out is None else out
        with self.env.begin(buffers=True) as txn:
            for block in range(start // size, -(-stop // size)):
                lo, hi = block * size, min(block * size + size, total)
                a, b = max(lo, start), min(hi, stop)
                value = txn.get(block_key(epoch, block))
                if value is None:
                    raise KeyError(f"lmdb: epoch {epoch} records [{a}, {b}) are missing")
                if len(value) != (hi - lo) * self.row_dtype.itemsize:
                    raise ValueError(f"lmdb: epoch {epoch} records [{lo}, {hi}) have a damaged value")
                out[a - start : b - start] = np.frombuffer(value, dtype=self.row_dtype)[a - lo : b - lo]
        return out

    def close(self) -> None:
        if self._shared is not None and self._pid == os.getpid():
            _release(self.location.path("lmdb"))
        self._shared = None
