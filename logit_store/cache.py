"""Decoded planes for readers, in bounded process memory (docs/STORE_FORMAT.md, "Reading").

A reader decodes a plane (an epoch) shard by shard as reads reach it, and gathers
random batches from the decoded rows. Where those rows live depends on their size:

- `MemoryPlane`: in the process's own memory, when the plane fits the reader's budget
  (small stores: no files, nothing shared).
- `SharedPlane`: in one local file per (store, plane) that every process of the node
  maps. The first process to need a shard decodes it into the file under a lock on that
  shard's stamp; the others wait on the lock (no polling) and then map what it wrote. The
  page cache holds the plane once per node, and may evict it to the local disk under
  pressure; a process's private memory holds only the piece it is decoding.

Invariant of a shared file: a shard's rows are valid iff its 16-byte stamp equals the
stamp of its commit marker (`marker_stamp`); the stamp is cleared before the rows are
rewritten and set after, all under the stamp's lock, so a crash mid-fill leaves the
shard refilled by the next reader.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import tempfile
import weakref
from typing import Any, Protocol

import numpy as np

from .backends.base import Backend
from .errors import DISK_FULL_ERRNOS, DiskFullError, StoreError
from .location import StoreLocation, positive_env
from .manifest import Manifest

STAMP_BYTES = 16
DEFAULT_CACHE_BYTES = 256 << 20  # private decoded rows per reader, unless LOGIT_STORE_CACHE_BYTES says otherwise
CACHE_BYTES_ENV = "LOGIT_STORE_CACHE_BYTES"
_PIECE_SHARE = 4  # a shared plane decodes in pieces of at most 1/4 of the budget


class ShardSource(Protocol):
    """What a plane needs of its store (`LogitStore` is one): this module imports no store."""

    location: StoreLocation
    manifest: Manifest
    backend: Backend

    def marker(self, epoch: int, shard: int) -> dict[str, Any]: ...
    def read_shard(
        self, epoch: int, shard: int, marker: dict[str, Any] | None = None, out: np.ndarray | None = None,
        piece: int | None = None,
    ) -> np.ndarray: ...  # fmt: skip


def default_cache_bytes() -> int:
    """LOGIT_STORE_CACHE_BYTES, a whole number of bytes >= 1, else DEFAULT_CACHE_BYTES; another value is
    one line naming the variable."""
    expected = "a whole number of bytes >= 1 (the decoded rows a reader keeps in its own memory)"
    return positive_env(CACHE_BYTES_ENV, int, DEFAULT_CACHE_BYTES, expected)


def default_cache_dir() -> str:
    """Per user, so another account cannot plant files where a reader maps them."""
    return os.environ.get("LOGIT_STORE_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"logit-store-cache-{os.getuid()}"
    )


def marker_stamp(marker: dict[str, Any]) -> bytes:
    """16 bytes naming a committed shard's content: a hash of its range and block digests."""
    key = json.dumps([marker["epoch"], marker["start"], marker["stop"], marker["digests"]])
    return hashlib.blake2b(key.encode(), digest_size=STAMP_BYTES).digest()


def store_key(store: ShardSource) -> str:
    """Names a store's shared files: its location and manifest (identity and creation time),
    so a store rebuilt at the same path never meets the files of its predecessor."""
    m = store.manifest
    ident = json.dumps([store.location.url, m.identity(), m.created_at], sort_keys=True, default=str)
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


class MemoryPlane:
    """All rows of one plane in process memory, filled shard by shard as reads need them."""

    def __init__(self, store: ShardSource, epoch: int) -> None:
        self.store, self.epoch = store, epoch
        m = store.manifest
        self.rows = np.zeros(m.num_samples, dtype=store.backend.row_dtype)
        self.loaded = np.zeros(m.num_shards, dtype=bool)
        self.complete = False
        # numpy gathers opaque fixed-size rows ~15x faster than rows with fields.
        self._opaque = self.rows.view(np.dtype((np.void, self.rows.dtype.itemsize)))

    @property
    def private_bytes(self) -> int:
        return self.rows.nbytes

    def gather(self, ids: np.ndarray) -> np.ndarray:
        return self._opaque[ids].view(self.rows.dtype)

    def ensure(self, shards: list[int]) -> None:
        """Decode the shards not yet held."""
        for shard in shards:
            if not self.loaded[shard]:
                start, stop = self.store.manifest.shard_range(shard)
                self.store.read_shard(self.epoch, shard, out=self.rows[start:stop])
                self.loaded[shard] = True
        self.complete = bool(self.loaded.all())

    def close(self) -> None:
        pass


class SharedPlane:
    """One plane's decoded rows in a node-local file, memory-mapped and shared by every reader.

    File layout: num_samples packed rows, then one stamp per shard. Each process holds a
    shared flock on the file while it uses it; the last one to let go deletes it.
    """

    def __init__(self, store: ShardSource, epoch: int, directory: str, piece_records: int) -> None:
        self.store, self.epoch, self.piece_records = store, epoch, piece_records
        m = store.manifest
        dtype = store.backend.row_dtype
        self.path = os.path.join(directory, f"{store_key(store)}-p{epoch:05d}.rows")
        self._stamps_at = m.num_samples * dtype.itemsize
        size = self._stamps_at + m.num_shards * STAMP_BYTES
        _private_dir(directory)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            _hold_sized(self._fd, size, self.path)  # in use: nobody deletes it under us
            self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            _release_file(self._fd, self.path, os.getpid())  # no file of ours left behind (unless in use)
            raise
        self.rows = np.frombuffer(self._map, dtype=dtype, count=m.num_samples)
        self._opaque = self.rows.view(np.dtype((np.void, dtype.itemsize)))
        self.stamps = np.frombuffer(self._map, dtype=np.uint8, offset=self._stamps_at).reshape(-1, STAMP_BYTES)
        self.loaded = np.zeros(m.num_shards, dtype=bool)
        self.complete = False
        # Let go of the file also when the plane is dropped without close(), or at exit.
        self._release = weakref.finalize(self, _release_file, self._fd, self.path, os.getpid())

    private_bytes = 0  # the rows are the page cache's, shared by the node's readers

    def gather(self, ids: np.ndarray) -> np.ndarray:
        return self._opaque[ids].view(self.rows.dtype)

    def ensure(self, shards: list[int]) -> None:
        """Make the shards valid in the file. Shards another process is filling are left for
        last, so the processes of a node decode different shards at once instead of queueing."""
        busy = [s for s in shards if not self.loaded[s] and not self._fill(s, wait=False)]
        for shard in busy:
            self._fill(shard, wait=True)
        self.complete = bool(self.loaded.all())

    def _fill(self, shard: int, wait: bool) -> bool:
        """Fill one shard under its stamp's lock unless its stamp is current; False if the lock
        is held elsewhere and not `wait`."""
        marker = self.store.marker(self.epoch, shard)
        stamp = np.frombuffer(marker_stamp(marker), dtype=np.uint8)
        where = self._stamps_at + shard * STAMP_BYTES
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), STAMP_BYTES, where)
        except OSError:  # held by a process filling it: come back to it
            return False
        try:
            if not np.array_equal(self.stamps[shard], stamp):
                self.stamps[shard] = 0
                start, stop = self.store.manifest.shard_range(shard)
                self.store.read_shard(self.epoch, shard, marker, out=self.rows[start:stop], piece=self.piece_records)
                self.stamps[shard] = stamp
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, STAMP_BYTES, where)
        self.loaded[shard] = True
        return True

    def close(self) -> None:
        """Unmap, and delete the file if no other process uses it."""
        del self.rows, self._opaque, self.stamps
        with contextlib.suppress(BufferError):  # a caller still holds a view: the map goes with it
            self._map.close()
        self._release()


def _release_file(fd: int, path: str, pid: int) -> None:
    """Delete the file if no other process holds it (one that opens it meanwhile keeps a copy
    alive that nobody else finds: correct, only wasted), then close it. In the owning process only."""
    if os.getpid() != pid:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _hold_sized(fd: int, size: int, path: str) -> None:
    """Hold the cache file shared, at its `size`. It is sized and allocated only by a process alone with it (an
    exclusive flock): where the file system cannot allocate ahead, glibc's posix_fallocate writes zeros over
    the file, which must never race with another reader's rows. A file in use was sized by its maker."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if os.fstat(fd).st_size < size:  # never so when its maker sized it; extending writes no byte
            os.ftruncate(fd, size)
        return
    current = os.fstat(fd).st_size
    if current > size:
        os.ftruncate(fd, size)
    if current < size:
        _allocate(fd, size, path)
    fcntl.flock(fd, fcntl.LOCK_SH)  # (a process that takes it exclusively meanwhile finds it sized)


def _allocate(fd: int, size: int, path: str) -> None:
    """Give the file its `size` bytes on the disk now. A sparse file would get its blocks when the map is
    written, and a full disk then kills the process with SIGBUS and no message; here it is ENOSPC, one line."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(
                f"disk full: cannot allocate the reader cache file {path} ({size} bytes, no space left on its file "
                f"system); free space, or set LOGIT_STORE_CACHE_DIR (cache_dir) to a local disk with room"
            ) from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)  # a file system that cannot allocate ahead: sparse, as the best it allows


def _private_dir(directory: str) -> None:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.getuid():
        raise StoreError(f"reader cache directory {directory} belongs to another user; set cache_dir")


class PlaneCache:
    """The planes a reader holds: at most `epochs` of them, least recently used first out,
    and never more than `cache_bytes` of decoded rows in its own memory.

    A plane of up to cache_bytes / epochs decoded bytes is a MemoryPlane, a larger one a
    SharedPlane under `cache_dir`. Rebuilt empty in a forked child (the parent's maps and
    locks are the parent's).
    """

    def __init__(self, store: ShardSource, epochs: int, cache_bytes: int, cache_dir: str | None) -> None:
        if epochs < 1 or cache_bytes < 1:
            raise StoreError(f"a reader needs cache_epochs >= 1 and cache_bytes >= 1, got {epochs}, {cache_bytes}")
        self.store, self.epochs, self.cache_bytes = store, epochs, cache_bytes
        self.cache_dir = cache_dir or default_cache_dir()
        self._planes: dict[int, MemoryPlane | SharedPlane] = {}
        self._pid = os.getpid()

    @property
    def private_bytes(self) -> int:
        """Decoded rows held in this process's own memory (the shared files are not)."""
        return sum(p.private_bytes for p in self._planes.values())

    def get(self, epoch: int) -> MemoryPlane | SharedPlane | None:
        if self._pid != os.getpid():
            self._planes, self._pid = {}, os.getpid()
        return self._planes.get(epoch)

    def plane(self, epoch: int) -> MemoryPlane | SharedPlane:
        """The plane, made most recently used; created (and older ones dropped) as needed."""
        plane = self.get(epoch)
        if plane is not None:
            self._planes[epoch] = self._planes.pop(epoch)
            return plane
        while len(self._planes) >= self.epochs:
            self._planes.pop(next(iter(self._planes))).close()
        m, rows = self.store.manifest, self.store.backend.row_dtype.itemsize
        if m.num_samples * rows <= self.cache_bytes // self.epochs:
            plane = MemoryPlane(self.store, epoch)
        else:
            piece = max(1, self.cache_bytes // _PIECE_SHARE // rows // m.chunk_records) * m.chunk_records
            plane = SharedPlane(self.store, epoch, self.cache_dir, min(piece, m.shard_records))
        self._planes[epoch] = plane
        return plane

    def clear(self) -> None:
        if self._pid == os.getpid():
            for plane in self._planes.values():
                plane.close()
        self._planes, self._pid = {}, os.getpid()
