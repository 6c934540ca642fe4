"""Every backend keeps the contract of `logit_store.testing`; each class says only how to damage its bytes. A
back-end of another package, registered by its entry point, is found by name and keeps it too."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from logit_store.backends.lmdb_backend import block_key
from logit_store.testing import StoreContract


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


# Another package: a back-end (zarr under another name) declared by an entry point, and its own test module,
# which is what its authors write against `logit_store.testing`.
THIRD_PARTY = {
    "mybackend.py": '''
        from logit_store.backends.zarr_backend import ZarrBackend

        class MyBackend(ZarrBackend):
            """A back-end of another package."""
    ''',
    "mybackend-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: mybackend\nVersion: 0.1\n",
    "mybackend-0.1.dist-info/entry_points.txt": "[logit_store.backends]\nmine = mybackend:MyBackend\n",
    "test_mine.py": """
        import pytest
        import zarr

        from logit_store import StoreInputError, create_store
        from logit_store.backends import BACKENDS
        from logit_store.testing import StoreContract


        def test_found_by_name(tmp_path):
            assert BACKENDS.names() == ["lmdb", "mine", "zarr"]
            assert BACKENDS.get("mine").__module__ == "mybackend"


        class TestMine(StoreContract):
            backend = "mine"

            def damage_block(self, path, epoch, record, row_bytes):
                seeds = zarr.open_group(str(path), mode="r+")["seed"]
                seeds[epoch, record] = int(seeds[epoch, record]) ^ 1

            def test_misspelt_it_is_one_line_naming_it(self, tmp_path, m):
                m.backend = "mien"
                with pytest.raises(StoreInputError, match="installed: lmdb, mine, zarr; did you mean 'mine'"):
                    create_store(tmp_path / "s", m)
    """,
}


def test_a_backend_of_another_package_is_found_by_its_entry_point_and_keeps_the_contract(tmp_path):
    site = tmp_path / "site"
    for name, text in THIRD_PARTY.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(textwrap.dedent(text))
    part = "found or misspelt or round_trip or partial or commit_markers or verify_finds or resumes"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", part, "test_mine.py"],
        cwd=site, env=os.environ | {"PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1].startswith("7 passed"), (
        proc.stdout[-3000:] + proc.stderr[-2000:]
    )
