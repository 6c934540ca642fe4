"""Damage named, never a crash (issue 13): read-only mounts, a truncated data.mdb, damage outside the record bytes,
and a verify that writes nothing. Each test reproduces one attack of docs/RELIABILITY.md."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from store_helpers import manifest, synthetic_records, write_in_order

from logit_store import StoreDamagedError, create_store, open_store
from logit_store.cli import main as store_cli
from teachers.store_teacher import StoreTeacher

BACKENDS = ["zarr", "lmdb"]


def copy_of(intact: Path, backend: str, tmp_path: Path) -> Path:
    shutil.copytree(intact / backend, tmp_path / "s")
    return tmp_path / "s"


def listing(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under root: (mode, size, mtime in ns), by relative path."""
    out = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def make_read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def teacher_logits(path: Path, epoch: int, ids: list[int]) -> torch.Tensor:
    teacher = StoreTeacher(str(path))
    try:
        return teacher.logits(torch.zeros(len(ids), 3, 4, 4), epoch, torch.tensor(ids))
    finally:
        teacher.store.close()


# ---- 1. read-only -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_intact_store_on_a_read_only_mount_is_read_verified_and_trained_from(intact, tmp_path, capsys, backend):
    """chmod -R a-w stands in for a read-only mount; as root (where it binds nothing) the listing check still
    proves that reading, verifying and training created or touched no file."""
    path = copy_of(intact, backend, tmp_path)
    make_read_only(path)
    before = listing(path)
    assert store_cli(["verify", str(path)]) == 0
    assert store_cli(["info", str(path)]) == 0
    ids = [5, 700, 2999]
    logits = teacher_logits(path, 1, ids)
    expected = synthetic_records(manifest(backend), 1, np.array(ids))
    top = torch.gather(logits, 1, torch.from_numpy(expected.indices.astype(np.int64)))
    assert torch.allclose(top - top[:, :1], torch.from_numpy(expected.values), atol=1e-3)
    assert listing(path) == before
    if backend == "lmdb":
        flags = open_store(path).backend.env.flags()
        assert flags["readonly"] and not flags["lock"]
    capsys.readouterr()


def test_a_writer_after_a_reader_in_one_process_reopens_lmdb_for_writing(intact, tmp_path):
    path = tmp_path / "s"
    store = create_store(path, manifest("lmdb"))
    write_in_order(store, 0)
    store.close()
    reader = open_store(path)
    reader.read(0, [1])
    assert reader.backend.env.flags()["readonly"]
    writer = create_store(path, manifest("lmdb"))
    write_in_order(writer, 1)  # the shared environment is reopened for writing, under the reader too
    assert reader.read(1, [2]).seed.tolist() == synthetic_records(writer.manifest, 1, np.array([2])).seed.tolist()
    assert reader.verify() == []


# ---- 2. truncated data.mdb ----------------------------------------------------------------------------

SCRIPTS = Path(sys.executable).parent


def run_store_cli(*args: str) -> subprocess.CompletedProcess:
    """distill-store in its own process: a SIGBUS would kill it, not pytest."""
    return subprocess.run([str(SCRIPTS / "distill-store"), *args], capture_output=True, text=True, timeout=120)


def test_a_truncated_data_mdb_is_damage_naming_the_sizes_not_sigbus(intact, tmp_path):
    path = copy_of(intact, "lmdb", tmp_path)
    data = path / "lmdb" / "data.mdb"
    full = data.stat().st_size
    os.truncate(data, full // 2 // 4096 * 4096)
    half = data.stat().st_size
    verify = run_store_cli("verify", str(path))
    assert verify.returncode == 1, verify.stderr
    assert f"{data} is truncated: {half} bytes, but its meta page" in verify.stdout
    assert f"needs {full} (" in verify.stdout  # lmdb grows its file page by page: the intact size
    info = run_store_cli("info", str(path))
    assert info.returncode == 2 and info.stderr.count("\n") == 1, info.stderr
    assert f"{data} is truncated" in info.stderr and f"run distill-store verify {path}" in info.stderr
    probe = "from teachers.store_teacher import StoreTeacher as T; import torch; T(%r).logits(torch.zeros(1), 0, torch.tensor([1]))"
    proc = subprocess.run([sys.executable, "-c", probe % str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "StoreDamagedError" in proc.stderr and "is truncated" in proc.stderr


# ---- 3 and 4. damage outside the record bytes: named ranges, and a verify that writes nothing --------------


def damage(path: Path, kind: str) -> str:
    """Damage the store as `kind` says; returns the range verify must name (records of epoch 0)."""
    shard = path / "values" / "c" / "0" / "1" / "0"  # zarr: epoch 0, records [512, 1024)
    data = path / "lmdb" / "data.mdb"
    if kind == "zarr shard index":  # the index sits at the end of a shard file
        raw = bytearray(shard.read_bytes())
        raw[-12] ^= 0xFF
        shard.write_bytes(bytes(raw))
    elif kind == "zarr truncated shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif kind == "zarr garbled zarr.json":
        (path / "values" / "zarr.json").write_text('{"zarr_format": 3, "node_type"')
        return "epoch 0 records [0, 512)"
    elif kind == "lmdb corrupted pages":  # the tree's pages after the metas: lmdb says MDB_CORRUPTED
        raw = bytearray(data.read_bytes())
        raw[2 * 4096 : 5 * 4096] = bytes(b ^ 0x5A for b in raw[2 * 4096 : 5 * 4096])
        data.write_bytes(bytes(raw))
        return "epoch 0 records [0, 512)"
    elif kind == "lmdb invalid header":  # both meta pages: lmdb says MDB_INVALID
        raw = bytearray(data.read_bytes())
        raw[16:20] = raw[4096 + 16 : 4096 + 20] = b"\0\0\0\0"
        data.write_bytes(bytes(raw))
        return "epoch 0 records [0, 512)"
    elif kind == "lmdb missing data.mdb":
        data.unlink()
        return "epoch 0 records [0, 512)"
    return "epoch 0 records [512, 1024)"


DAMAGE = [
    "zarr shard index",
    "zarr truncated shard",
    "zarr garbled zarr.json",
    "lmdb corrupted pages",
    "lmdb invalid header",
    "lmdb missing data.mdb",
]


SHARED = {  # damage to a file every record range depends on
    "zarr garbled zarr.json": "values/zarr.json",
    "lmdb invalid header": "lmdb/data.mdb",
    "lmdb missing data.mdb": "lmdb/data.mdb",
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damage_outside_record_bytes_is_named_by_verify_info_and_training(intact, tmp_path, capsys, kind):
    path = copy_of(intact, kind.split()[0], tmp_path)
    where = damage(path, kind)
    before = listing(path)
    assert store_cli(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    if kind in SHARED:  # a file every range depends on: named once, and repair is not advised (it cannot mend it)
        assert f"{path}: every record range: damaged ({path / SHARED[kind]}" in out
        assert "repair cannot mend it" in out and f"distill-store repair {path}" not in out
    else:
        assert f"{path}: {where}: damaged (cannot decode" in out
        assert out.endswith(f"distill-store repair {path}, then run the save again\n")
    assert listing(path) == before, "verify wrote into the store"
    assert store_cli(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "cannot be decoded" in err and f"run distill-store verify {path}" in err
    first = int(where.split("[")[1].split(",")[0])
    with pytest.raises(StoreDamagedError, match=re.escape(f"{where} cannot be decoded")):
        teacher_logits(path, 0, [first + 3])
    assert listing(path) == before, "reading wrote into the store"


# ---- 5. repair: uncommit the damaged shards only ---------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_repair_uncommits_exactly_the_damaged_shards_and_a_rewrite_restores_them(intact, tmp_path, capsys, backend):
    path = copy_of(intact, backend, tmp_path)
    if backend == "zarr":
        damage(path, "zarr shard index")  # epoch 0, shard 1
    else:  # one byte of the value of epoch 0's block holding record 700 (shard 1), as a bad disk would
        import lmdb

        with lmdb.open(str(path / "lmdb"), map_size=1 << 30) as env, env.begin(write=True) as txn:
            key = np.array([0, 700 // 512], dtype=">u4").tobytes()
            value = bytearray(txn.get(key))
            value[100] ^= 0x01
            txn.put(key, bytes(value))
    markers = sorted(p.name for p in (path / "commits").iterdir())
    assert [(p.epoch, p.start) for p in open_store(path).damaged_commits()] == [(0, 512)]
    assert store_cli(["repair", str(path)]) == 0
    assert f"{path}: epoch 0 records [512, 1024): commit marker dropped" in capsys.readouterr().out
    assert sorted(p.name for p in (path / "commits").iterdir()) == [m for m in markers if m != "e00000-s000001.json"]
    store = open_store(path)
    assert store.pending_shards(0) == [1] and store.damaged_commits() == []
    assert store.manifest.statistics["records"] == 2 * 3000 - 512  # the remaining commits' own totals
    with create_store(path, manifest(backend)).writer(0) as writer:  # what a re-run save does: the pending shard
        ids = np.arange(512, 1024)
        writer.write(ids, synthetic_records(writer.manifest, 0, ids))
    assert open_store(path).verify() == []
    assert open_store(path).info()["content_hashes"] == open_store(intact / backend).info()["content_hashes"]


def test_a_save_over_a_garbled_zarr_json_names_the_file(intact, tmp_path):
    """Damage repair cannot mend (an array's metadata): writing names the file instead of a JSON traceback."""
    path = copy_of(intact, "zarr", tmp_path)
    damage(path, "zarr garbled zarr.json")
    with pytest.raises(StoreDamagedError, match="repair cannot mend it"):  # it drops no commit for it
        open_store(path).repair()
    for marker in (path / "commits").glob("e00000-*"):  # epoch 0 left to write, as in a save that stopped there
        marker.unlink()
    with pytest.raises(StoreDamagedError, match=re.escape(f"{path / 'values' / 'zarr.json'} cannot be read")):
        write_in_order(create_store(path, manifest()), 0)
