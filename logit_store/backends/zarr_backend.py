"""zarr v3: one group, one array per field shaped [planes, N(, width)], one shard per commit unit.

planes = epochs (+ the text plane in an embeddings store); width = k, or embed_dim.
In a version-3 logits store the `values` array holds each row's codes as differences
(code_0, code_1 - code_0, ...): sorted codes differ by little, which is what compresses.
"""

from __future__ import annotations

import os
import threading
from functools import cached_property

import numpy as np
import zarr
from fsspec import AbstractFileSystem
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from zarr.codecs import BloscCodec, BloscShuffle

from ..errors import StoreAccessError, StoreDamagedError
from ..location import StoreLocation, redact
from ..records import CODED_VERSION
from .base import Backend

# zstd with byte shuffle, level 5; level 1 for version-3 logits rows wider than k = 16: there
# it is within ~3% of level 5's size and compresses the codes ~4x faster (docs/BENCHMARKS.md).
FAST_CLEVEL, CLEVEL, FAST_FROM_K = 1, 5, 17
# Inner chunks per call of zarr's codec pipeline when writing (its default, 1, costs ~20% of
# a write). zarr reads it from its global config when a shard is encoded: set it around our
# writes only, one write at a time (a writer commits on two threads).
PIPELINE_BATCH = 128
_CONFIG_LOCK = threading.Lock()


class ZarrBackend(Backend):
    """Arrays sharded as (1, shard_records, width) so every shard file belongs to one writer.

    Blosc zstd with byte shuffle: the shuffle is what makes fp16 logits and uint16
    indices compress (../shared/STORAGE_NOTES.md).
    """

    @cached_property
    def _store(self) -> zarr.abc.store.Store:
        loc = self.location
        if loc.is_local:
            return zarr.storage.LocalStore(loc.root)
        if loc.web:
            _check_byte_ranges(loc)
        return zarr.storage.FsspecStore(_async_fs(loc.fs), path=loc.root, read_only=loc.web)

    @cached_property
    def arrays(self) -> dict[str, zarr.Array]:
        # Shards are written whole, so zarr's scan of every chunk for fill values only costs time.
        config = {"write_empty_chunks": True}
        return {name: self._open_array(name, config) for name in self.row_dtype.names}

    def _open_array(self, name: str, config: dict) -> zarr.Array:
        """One field's array; metadata that cannot be read is damage naming its file."""
        try:
            with self.location.reaching():
                mode = "r" if self.location.web else "r+"
                return zarr.open_array(self._store, path=name, mode=mode, zarr_format=3, config=config)
        except StoreAccessError:  # the location's fault, not damage
            raise
        except Exception as err:  # zarr raises JSON, KeyError, ValueError and its own errors alike
            raise StoreDamagedError(f"{redact(self.location.path(name, 'zarr.json'))} cannot be read: {err}") from err

    def check_shared(self) -> None:
        """Every field's array metadata (its zarr.json) must read: each serves every range of its field."""
        self.arrays  # noqa: B018 (opening them is the check: a damaged one raises, naming its file)

    @cached_property
    def _delta_values(self) -> bool:
        m = self.manifest
        return m.kind == "logits" and m.format_version >= CODED_VERSION

    def create(self) -> None:
        m = self.manifest
        clevel = FAST_CLEVEL if self._delta_values and m.k >= FAST_FROM_K else CLEVEL
        with self.location.reaching(absent_is_error=True):  # the first write: a missing bucket shows here
            group = zarr.open_group(self._store, mode="a", zarr_format=3)
            for name in self.row_dtype.names:
                base, shape = self.row_dtype[name].base, self.row_dtype[name].shape
                group.create_array(
                    name,
                    shape=(m.planes, m.num_samples, *shape),
                    dtype=base,
                    shards=(1, m.shard_records, *shape),
                    chunks=(1, m.chunk_records, *shape),
                    compressors=[BloscCodec(cname="zstd", clevel=clevel, shuffle=BloscShuffle.shuffle)],
                    fill_value=0,
                )

    def grow(self) -> None:
        """Resize every field's array along the plane axis (zarr rewrites each zarr.json whole); an array
        already as long (a grow killed before its manifest) or longer is left as it is."""
        self.__dict__.pop("arrays", None)  # the arrays' metadata as it is now (another process may have grown them)
        planes = self.manifest.planes
        with self.location.reaching():
            for array in self.arrays.values():
                if array.shape[0] < planes:
                    array.resize((planes, *array.shape[1:]))

    def write_rows(self, epoch: int, start: int, rows: np.ndarray) -> None:
        # An object store lost mid-save is one line naming it (`reaching`); the range stays uncommitted, the
        # committed ones stay, and the same command resumes.
        with self.location.reaching():
            self._write_rows(epoch, start, rows)

    def _write_rows(self, epoch: int, start: int, rows: np.ndarray) -> None:
        stop = start + len(rows)
        for name, array in self.arrays.items():
            # zarr re-reads an existing shard file before rewriting it; a torn file left by a
            # crash would then block the rewrite, so drop it first (the range is uncommitted).
            path = self._shard_path(name, array, epoch, start)
            if self.location.fs.exists(path):
                self.location.fs.rm(path)
            data = self._to_array(name, rows[name])
            with _CONFIG_LOCK, zarr.config.set({"codec_pipeline.batch_size": PIPELINE_BATCH}):
                array[epoch, start:stop] = data
            # Durable before the commit marker is written. (Older stores may lack the file of a
            # shard of fill values only, such as the text plane's seeds, all 0: zarr reads it as fill.)
            if self.location.is_local and os.path.exists(path):
                _fsync(path)

    def _shard_path(self, name: str, array: zarr.Array, epoch: int, start: int) -> str:
        return self.location.path(*self._shard_key(name, array, epoch, start // self.manifest.shard_records))

    def _shard_key(self, name: str, array: zarr.Array, plane: int, shard: int) -> tuple[str, str]:
        index = (plane, shard) + (0,) * (array.ndim - 2)
        return name, array.metadata.encode_chunk_key(index)

    def named_files(self, shards: list[tuple[int, int]]) -> list[tuple[str, ...]]:
        """The group's and each array's zarr.json, and each array's file of every shard."""
        metadata = [("zarr.json",), *((name, "zarr.json") for name in self.arrays)]
        return metadata + [self._shard_key(n, a, *key) for key in shards for n, a in self.arrays.items()]

    def read_rows(self, epoch: int, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(stop - start, dtype=self.row_dtype) if out is None else out
        for name, array in self.arrays.items():
            with self.location.reaching():
                data = array[epoch, start:stop]
            if name == "values" and self._delta_values:
                data = np.cumsum(data, axis=1, dtype=data.dtype)  # uint16 wraps back exactly
            out[name] = data
        return out

    def _to_array(self, name: str, field: np.ndarray) -> np.ndarray:
        if name != "values" or not self._delta_values:
            return field
        deltas = np.empty_like(field)
        deltas[:, 0] = field[:, 0]
        np.subtract(field[:, 1:], field[:, :-1], out=deltas[:, 1:])  # uint16: wraps if ever unsorted
        return deltas


def _check_byte_ranges(location: StoreLocation) -> None:
    """zarr reads parts of shard files (their index, then chunks) by HTTP Range requests; a server that ignores
    them sends whole files, which would decode as damaged shards. Asked once: 2 bytes of the group's zarr.json
    (an absent one is left to `check_shared`)."""
    try:
        with location.reaching():
            got = location.fs.cat_file(location.path("zarr.json"), start=0, end=2)
    except FileNotFoundError:
        return
    if len(got) != 2:
        raise StoreAccessError(
            f"{location}: the server ignores HTTP Range requests (asked for 2 bytes of zarr.json, it sent {len(got)}), "
            "and zarr reads parts of shard files: serve the store from a server that answers them (nginx, caddy, "
            "an object store's or a hub's file URLs do)"
        )


def _async_fs(fs: AbstractFileSystem) -> AsyncFileSystem:
    """The file system as zarr's FsspecStore takes it, asynchronous: an async-capable one (s3fs,
    gcsfs) as a second instance of the same options, made asynchronous; a synchronous one
    (memory://, sftp://, ...) wrapped, its calls run on threads."""
    if fs.async_impl:
        if fs.asynchronous:
            return fs
        copy = type(fs)(**{**fs.storage_options, "asynchronous": True})
        if hasattr(fs, "retries"):  # s3fs's tries are an attribute (`StoreLocation` sets it)
            copy.retries = fs.retries
        return copy
    return AsyncFileSystemWrapper(fs, asynchronous=True)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
