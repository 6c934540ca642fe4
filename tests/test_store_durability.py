"""Concurrent writers, SIGKILL and resume, locks, and damage found by verify."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from store_helpers import EPOCHS, manifest, write_epoch

from logit_store import ShardWriter, StoreDamagedError, StoreLockedError, convert_store, create_store, open_store
from logit_store.cli import main as store_cli
from logit_store.writer import FAULT_COMMIT

HELPER = str(Path(__file__).with_name("store_helpers.py"))


def run_writer(store: Path, *args: str, fault: str | None = None) -> subprocess.Popen:
    """A writer process; `fault` ("after:3", "before:2") kills it at that commit (logit_store.writer.FAULT_COMMIT)."""
    env = os.environ | ({FAULT_COMMIT: fault} if fault else {})
    return subprocess.Popen(
        [sys.executable, HELPER, str(store), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def reference_hashes(tmp_path: Path, backend: str) -> dict:
    ref = create_store(tmp_path / f"reference-{backend}", manifest(backend))
    for epoch in range(EPOCHS):
        write_epoch(ref, epoch)
    return ref.info()["content_hashes"]


@pytest.mark.parametrize("backend", ["zarr", "lmdb"])
def test_two_processes_write_at_once(tmp_path, backend):
    store = create_store(tmp_path / "s", manifest(backend))
    shards = range(store.manifest.num_shards)
    # Interleaved ownership: both writers are busy at the same time for the whole run.
    procs = [
        run_writer(
            tmp_path / "s",
            "--backend",
            backend,
            "--shards",
            ",".join(str(s) for s in shards if s % 2 == r),
        )
        for r in (0, 1)
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert open_store(tmp_path / "s").verify() == []
    assert open_store(tmp_path / "s").info()["content_hashes"] == reference_hashes(tmp_path, backend)


@pytest.mark.parametrize("backend", ["zarr", "lmdb"])
@pytest.mark.parametrize("fault", ["after:3", "before:4"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, backend, fault):
    """Killed right after its 3rd commit, or with the 4th shard's rows written but not its marker."""
    path = tmp_path / "s"
    proc = run_writer(path, "--backend", backend, fault=fault)
    assert proc.wait(timeout=120) == -9, proc.stderr.read()
    store = open_store(path)
    done = sum(len(store.committed_shards(e)) for e in range(EPOCHS))
    assert done == 3, "the kill lands after exactly three commits"
    assert store.verify(), "an interrupted store is incomplete"

    resumed = run_writer(path, "--backend", backend)
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
    store = open_store(path)
    assert store.verify() == []
    assert store.info()["content_hashes"] == reference_hashes(tmp_path, backend)
    if backend == "zarr":  # bit-identical files, not only equal content
        ref = tmp_path / "reference-zarr"
        for name in ("values", "indices", "tail_lse", "seed"):
            for shard_file in sorted((ref / name).rglob("*")):
                if shard_file.is_file():
                    other = path / shard_file.relative_to(ref)
                    assert other.read_bytes() == shard_file.read_bytes(), other
        for marker in (ref / "commits").glob("*.json"):
            assert (path / "commits" / marker.name).read_bytes() == marker.read_bytes()


def test_writer_refuses_a_range_another_process_holds(tmp_path):
    store = create_store(tmp_path / "s", manifest())
    holder = run_writer(tmp_path / "s", "--shards", "1", "--hold")
    assert holder.stdout.readline() == "held\n"  # it holds the lock of shard 1 until we close its stdin
    with pytest.raises(StoreLockedError, match=r"epoch 0 records \[512, 1024\) is being written by another process"):
        store.writer(0, [1])
    store.writer(0, [2]).release()  # other ranges stay free
    holder.kill()
    holder.wait()
    store.writer(0, [1]).release()  # a killed holder leaves no stale lock


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_names_a_corrupted_byte(tmp_path, capsys):
    store = create_store(tmp_path / "s", manifest())
    for epoch in range(EPOCHS):
        write_epoch(store, epoch)
    assert store_cli(["verify", str(tmp_path / "s")]) == 0
    # zarr keys: values/c/<epoch>/<shard>/0; epoch 1, shard 2 covers records [1024, 1536).
    shard_file = tmp_path / "s" / "values" / "c" / "1" / "2" / "0"
    flip_byte(shard_file, 40)
    capsys.readouterr()
    assert store_cli(["verify", str(tmp_path / "s")]) == 1
    out = capsys.readouterr().out
    assert "epoch 1 records [1024, 1536): damaged" in out
    assert "epoch 0" not in out
    location = re.escape(str(tmp_path / "s"))
    with pytest.raises(StoreDamagedError, match=rf"^{location}: epoch 1 records \[1024, 1536\) cannot be decoded: "):
        open_store(tmp_path / "s").read(1, [1100])


def test_verify_names_a_missing_range(tmp_path, capsys):
    store = create_store(tmp_path / "s", manifest("lmdb"))
    for epoch in range(EPOCHS):
        write_epoch(store, epoch)
    (tmp_path / "s" / "commits" / "e00000-s000003.json").unlink()
    assert store_cli(["verify", str(tmp_path / "s")]) == 1
    assert "epoch 0 records [1536, 2048): missing" in capsys.readouterr().out


def test_verify_names_damaged_lmdb_values(tmp_path, capsys):
    store = create_store(tmp_path / "s", manifest("lmdb"))
    write_epoch(store, 0)
    write_epoch(store, 1)
    store.close()
    # Overwrite one byte of record 2000 in place, as a bad disk would (blocks of 512 records).
    import lmdb

    env = lmdb.open(str(tmp_path / "s" / "lmdb"), map_size=1 << 30)
    key = np.array([1, 2000 // 512], dtype=">u4").tobytes()
    with env.begin(write=True) as txn:
        value = bytearray(txn.get(key))
        value[(2000 % 512) * store.backend.row_dtype.itemsize] ^= 0x01
        txn.put(key, bytes(value))
    env.close()
    assert store_cli(["verify", str(tmp_path / "s")]) == 1
    out = capsys.readouterr().out
    assert "epoch 1 records [1536, 2048): damaged (checksum mismatch)" in out


def test_info_json_is_machine_readable(tmp_path, capsys):
    store = create_store(tmp_path / "s", manifest())
    write_epoch(store, 0)
    assert store_cli(["info", str(tmp_path / "s"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["completed_epochs"] == [0]
    assert info["records_per_epoch"] == {"0": 3000, "1": 0}
    assert 0 < info["bytes_per_record"] < 200
    assert store_cli(["info", str(tmp_path / "s")]) == 0
    assert "bytes/record" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "s" / "manifest.json")


def test_malformed_marker_is_damaged_not_a_crash(tmp_path, capsys):
    store = create_store(tmp_path / "s", manifest())
    write_epoch(store, 0)
    marker = tmp_path / "s" / "commits" / "e00000-s000002.json"
    marker.write_text(json.dumps({"epoch": 0}))
    (tmp_path / "s" / "commits" / "notes.json").write_text("{}")
    problems = open_store(tmp_path / "s").verify()
    assert "epoch 0 records [1024, 1536): damaged (commit marker unreadable)" in [str(p) for p in problems]
    location = re.escape(str(tmp_path / "s"))
    marker = rf"^{location}: epoch 0 records \[1024, 1536\) have a damaged commit marker; run distill-store verify "
    with pytest.raises(StoreDamagedError, match=marker):
        open_store(tmp_path / "s").read(0, [1100])
    markers = rf"^{location}: damaged commit markers for \(epoch, shard\) \[\(0, 2\)\]; run distill-store verify "
    with pytest.raises(StoreDamagedError, match=markers):
        convert_store(open_store(tmp_path / "s"), tmp_path / "t", "lmdb")


def test_torn_shard_file_is_rewritten_on_resume(tmp_path):
    store = create_store(tmp_path / "s", manifest())
    write_epoch(store, 0)
    # A crash after zarr began writing shard 1 of epoch 1, before its marker: a torn file.
    torn = tmp_path / "s" / "values" / "c" / "1" / "1" / "0"
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_bytes(b"\x00" * 17)
    write_epoch(store, 1)
    assert store.verify() == []
    assert store.info()["content_hashes"] == reference_hashes(tmp_path, "zarr")


def test_an_interrupted_convert_leaves_the_destination_its_own_statistics(tmp_path, monkeypatch):
    """Stopped after two copied shards: the destination's manifest counts its own two commits, not the source's
    totals; the resumed convert ends with the source's."""
    src = create_store(tmp_path / "s", manifest())
    for epoch in range(EPOCHS):
        write_epoch(src, epoch)
    src.refresh_statistics()
    real, calls = ShardWriter.commit_rows, []

    def stop_after_two(self, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the copy is interrupted
        calls.append(args[0])
        return real(self, *args)

    monkeypatch.setattr(ShardWriter, "commit_rows", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        convert_store(src, tmp_path / "t", "lmdb")
    markers = [json.loads(p.read_text()) for p in (tmp_path / "t" / "commits").glob("*.json")]
    statistics = json.loads((tmp_path / "t" / "manifest.json").read_text())["statistics"]
    assert len(markers) == 2 and statistics["records"] == sum(m["stop"] - m["start"] for m in markers) == 1024
    assert statistics["records"] != src.manifest.statistics["records"] == EPOCHS * 3000
    monkeypatch.setattr(ShardWriter, "commit_rows", real)
    dst = convert_store(open_store(tmp_path / "s"), tmp_path / "t", "lmdb")
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["statistics"] == src.manifest.statistics
    assert dst.info()["content_hashes"] == src.info()["content_hashes"]
