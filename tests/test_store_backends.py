"""Every backend keeps the contract of tests/store_contract.py; each class says only how to damage its bytes."""

from __future__ import annotations

from pathlib import Path

from store_contract import StoreContract

from logit_store.backends.lmdb_backend import block_key


class TestZarr(StoreContract):
    backend = "zarr"

    def damage_block(self, path: Path, epoch: int, record: int, row_bytes: int) -> None:
        """Rewrite one seed with valid but different data through zarr itself (bypassing the store)."""
        import zarr

        seeds = zarr.open_group(str(path), mode="r+")["seed"]
        seeds[epoch, record] = int(seeds[epoch, record]) ^ 1


class TestLmdb(StoreContract):
    backend = "lmdb"

    def damage_block(self, path: Path, epoch: int, record: int, row_bytes: int) -> None:
        """Flip one byte of the record in its block's value, as a bad disk would."""
        import lmdb

        from logit_store import open_store

        chunk = open_store(path).manifest.chunk_records
        with lmdb.open(str(path / "lmdb"), map_size=1 << 30) as env, env.begin(write=True) as txn:
            key = block_key(epoch, record // chunk)
            value = bytearray(txn.get(key))
            value[(record % chunk) * row_bytes] ^= 0x01
            txn.put(key, bytes(value))
