"""zarr v3: one group, one array per field shaped [epochs, N(, k)], one shard per commit unit."""

from __future__ import annotations

from functools import cached_property

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from .base import Backend


class ZarrBackend(Backend):
    """Arrays sharded as (1, shard_records, k) so every shard file belongs to one writer.

    Blosc zstd with byte shuffle: the shuffle is what makes fp16 logits and uint16
    indices compress (../shared/STORAGE_NOTES.md).
    """

    @cached_property
    def _store(self) -> zarr.abc.store.Store:
        loc = self.location
        if loc.is_local:
            return zarr.storage.LocalStore(loc.root)
        return zarr.storage.FsspecStore(loc.fs, path=loc.root)

    @cached_property
    def arrays(self) -> dict[str, zarr.Array]:
        group = zarr.open_group(self._store, mode="r+", zarr_format=3)
        return {name: group[name] for name in self.row_dtype.names}

    def create(self) -> None:
        m = self.manifest
        group = zarr.open_group(self._store, mode="a", zarr_format=3)
        for name in self.row_dtype.names:
            base, shape = self.row_dtype[name].base, self.row_dtype[name].shape
            group.create_array(
                name,
                shape=(m.epochs, m.num_samples, *shape),
                dtype=base,
                shards=(1, m.shard_records, *shape),
                chunks=(1, m.chunk_records, *shape),
                compressors=[BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle)],
                fill_value=0,
            )

    def write_rows(self, epoch: int, start: int, rows: np.ndarray) -> None:
        stop = start + len(rows)
        for name, array in self.arrays.items():
            array[epoch, start:stop] = rows[name]

    def read_rows(self, epoch: int, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(stop - start, dtype=self.row_dtype) if out is None else out
        for name, array in self.arrays.items():
            out[name] = array[epoch, start:stop]
        return out
