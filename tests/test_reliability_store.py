"""Reliability of the logit store, third round: damage `repair` cannot mend, two repairs at once, a manifest whose
num_classes does not fit its records, a full disk under the reader cache and under lmdb (EIO), a frozen S3
endpoint, and bad environment variables. Faults are injected deterministically: damage written into real files,
patched calls, a lock held by the test, a socket that never answers."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
from store_helpers import manifest, write_in_order

from logit_store import DiskFullError, LogitStore, ShardWriter, StoreDamagedError, create_store, open_store
from logit_store.backends.lmdb_backend import LmdbBackend
from logit_store.cli import main as store_cli

BACKENDS = ["zarr", "lmdb"]


def copy_of(intact: Path, backend: str, tmp_path: Path) -> Path:
    shutil.copytree(intact / backend, tmp_path / "s")
    return tmp_path / "s"


def markers(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "commits").iterdir())


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


# ---- 1. damage to a file every range depends on: named once, and repair refuses ------------------------------

SHARED = {  # damage -> (backend, the file every range depends on)
    "garbled zarr.json": ("zarr", "values/zarr.json"),
    "invalid lmdb header": ("lmdb", "lmdb/data.mdb"),
    "truncated data.mdb": ("lmdb", "lmdb/data.mdb"),
}


def damage_shared(path: Path, kind: str) -> None:
    target = path / SHARED[kind][1]
    if kind == "garbled zarr.json":
        target.write_text('{"zarr_format": 3, "node_type"')
    elif kind == "invalid lmdb header":  # both meta pages' magic: no valid meta page
        raw = bytearray(target.read_bytes())
        raw[16:20] = raw[4096 + 16 : 4096 + 20] = b"\0\0\0\0"
        target.write_bytes(bytes(raw))
    else:
        os.truncate(target, target.stat().st_size // 2 // 4096 * 4096)


@pytest.mark.parametrize("kind", list(SHARED))
def test_damage_to_a_file_every_range_depends_on_is_named_once_and_repair_drops_nothing(intact, tmp_path, capsys, kind):
    backend, name = SHARED[kind]
    path = copy_of(intact, backend, tmp_path)
    original = (path / name).read_bytes()
    damage_shared(path, kind)
    before = markers(path)
    assert store_cli(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: every record range: damaged ({path / name}" in out
    assert "epoch 0 records" not in out, "each range listed instead of the one file"
    assert "repair cannot mend it" in out and f"distill-store repair {path}" not in out
    assert store_cli(["repair", str(path)]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and str(path / name) in err and "repair cannot mend it (it drops no commit)" in err
    assert markers(path) == before
    with pytest.raises(StoreDamagedError, match="repair cannot mend it"):  # a save's check before it resumes
        open_store(path).damaged_commits()
    (path / name).write_bytes(original)  # restoring the one file recovers the whole store
    assert store_cli(["verify", str(path)]) == 0
    assert open_store(path).info()["content_hashes"] == open_store(intact / backend).info()["content_hashes"]
    capsys.readouterr()


def test_two_repairs_at_once_the_second_is_refused_by_a_lock(intact, tmp_path, capsys, monkeypatch):
    """The second repair starts while the first is between its verify and its removals (hooked there): it is refused
    with one line (StoreLockedError), and the first drops exactly the damaged shard's marker."""
    path = copy_of(intact, "zarr", tmp_path)
    shard = path / "values" / "c" / "0" / "1" / "0"  # epoch 0, records [512, 1024): its index, at the file's end
    raw = bytearray(shard.read_bytes())
    raw[-12] ^= 0xFF
    shard.write_bytes(bytes(raw))
    before, verify, second = markers(path), LogitStore.verify, []

    def verify_then_a_second_repair(self: LogitStore):
        problems = verify(self)
        if not second:
            second.append("started")  # once: the second repair's own verify passes through
            second[:] = [store_cli(["repair", str(path)]), capsys.readouterr().err]
        return problems

    monkeypatch.setattr(LogitStore, "verify", verify_then_a_second_repair)
    assert store_cli(["repair", str(path)]) == 0
    assert second[0] == 2 and one_line(second[1]), second
    assert f"{path} is being repaired by another process (lock {path / '.locks' / 'repair'})" in second[1]
    assert markers(path) == [m for m in before if m != "e00000-s000001.json"]
    monkeypatch.undo()
    assert store_cli(["repair", str(path)]) == 0  # the lock went with the first repair
    assert "nothing to repair" in capsys.readouterr().out


# ---- 2. a manifest whose num_classes does not fit the stored indices ----------------------------------------


def test_an_edited_num_classes_is_named_by_verify_and_reads_and_repair_drops_nothing(intact, tmp_path, capsys):
    path = copy_of(intact, "zarr", tmp_path)
    data = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(data | {"num_classes": 10}))  # the records hold classes < 50
    store = open_store(path)
    row = first_id_with_class_at_least(intact / "zarr", 10)
    assert store_cli(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: epoch 0 records [0, 512): invalid (record {row} holds class index " in out
    assert f"but {path}/manifest.json says num_classes = 10; the records match their commit)" in out
    assert f"distill-store repair {path}" not in out and f"do not fit {path}/manifest.json" in out
    with pytest.raises(
        StoreDamagedError, match=rf"^{path}: epoch 0 records \[0, 512\) do not fit the manifest: record {row} "
    ):
        store.read(0, [row])  # a training read: named here, not an index out of range when the rows are rebuilt
    before = markers(path)
    assert store_cli(["repair", str(path)]) == 0 and markers(path) == before  # the records are intact
    capsys.readouterr()


def first_id_with_class_at_least(path: Path, classes: int) -> int:
    """The first id of epoch 0 whose stored top-k holds a class index >= `classes`."""
    indices = open_store(path).read(0, np.arange(512)).indices
    return int(np.flatnonzero((indices >= classes).any(axis=1))[0])


# ---- 3. a full disk under the reader's shared cache file ---------------------------------------------------


def test_a_full_disk_under_the_reader_cache_is_disk_full_not_sigbus(intact, tmp_path, monkeypatch):
    """The cache file is allocated for real when made (posix_fallocate), so a full disk is ENOSPC there, one
    line, instead of a SIGBUS when the map is written. The patched posix_fallocate fails as on a full disk."""
    cache = tmp_path / "cache"
    calls = []

    def full(fd: int, offset: int, size: int) -> None:
        calls.append(size)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    store = open_store(intact / "zarr", cache_bytes=4096, cache_dir=str(cache))  # a plane of 78 kB: shared
    with pytest.raises(DiskFullError) as err:
        store.read(0, [5, 2999])
    message = str(err.value)
    assert calls and "\n" not in message
    assert (
        message.startswith(f"disk full: cannot allocate the reader cache file {cache}/")
        and "LOGIT_STORE_CACHE_DIR" in message
    )
    assert list(cache.iterdir()) == [], "a file of the failed reader was left"
    monkeypatch.undo()
    store = open_store(intact / "zarr", cache_bytes=4096, cache_dir=str(cache))
    store.read(0, [5, 2999])
    (rows,) = cache.iterdir()
    assert rows.stat().st_blocks * 512 >= rows.stat().st_size, "the cache file is sparse: a full disk would SIGBUS"
    store.close()


def test_a_cache_file_in_use_is_never_allocated_again(intact, tmp_path, monkeypatch):
    """Where a file system cannot allocate ahead, glibc's posix_fallocate writes zeros over the whole file: only
    a reader alone with the cache file sizes it, never one that opens it while another holds (and fills) it."""
    cache = tmp_path / "cache"
    first = open_store(intact / "zarr", cache_bytes=4096, cache_dir=str(cache))  # shared planes, as above
    expected = first.read(0, [5, 2999])
    calls = []
    allocate = os.posix_fallocate
    monkeypatch.setattr(
        os, "posix_fallocate", lambda fd, offset, size: (calls.append(size), allocate(fd, offset, size))
    )
    second = open_store(intact / "zarr", cache_bytes=4096, cache_dir=str(cache))
    got = second.read(0, [5, 2999])
    assert calls == [], "a cache file in use was allocated again"
    assert (got.indices == expected.indices).all() and (got.values == expected.values).all()
    first.close()
    second.close()
    third = open_store(intact / "zarr", cache_bytes=4096, cache_dir=str(cache))  # alone with it again: sized
    third.read(0, [5])
    third.close()


# ---- 4. lmdb on a full disk: EIO at the commit ------------------------------------------------------------------


class EioAtCommit:
    """An environment whose write transactions fail at their commit as lmdb's do on a full disk: EIO."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env

    @contextlib.contextmanager
    def begin(self, write: bool = False):
        with self.env.begin(write=write) as txn:
            yield txn
            raise lmdb.Error(f"mdb_txn_commit: {os.strerror(errno.EIO)}")  # inside: the real txn is aborted


@pytest.mark.parametrize("disk", ["full", "with room"])
def test_lmdb_eio_at_a_commit_is_disk_full_when_the_disk_is_full(tmp_path, monkeypatch, disk):
    """Rule: EIO from lmdb while the store's file system has less room than the commit writes is a full disk
    (DiskFullError naming data.mdb); with room, it is a real I/O error and stays lmdb's."""
    monkeypatch.setattr(ShardWriter, "MAX_SEALED", 0)  # commits on this thread: the error reaches the writer
    store = create_store(tmp_path / "s", manifest("lmdb"))
    env = LmdbBackend._env
    monkeypatch.setattr(
        LmdbBackend, "_env", lambda self, write: EioAtCommit(env(self, write)) if write else env(self, write)
    )
    statvfs, seen = os.statvfs, []

    def free_space(path):
        seen.append(path)
        st = statvfs(path)
        if disk == "with room":
            return st
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 3, 3, *st[5:]))  # 3 blocks left

    monkeypatch.setattr(os, "statvfs", free_space)
    if disk == "full":
        with pytest.raises(DiskFullError) as err:
            write_in_order(store, 0)
        data = tmp_path / "s" / "lmdb" / "data.mdb"
        assert str(err.value).startswith(f"disk full: cannot write {data} (lmdb reports an I/O error")
        assert "\n" not in str(err.value)
    else:
        with pytest.raises(lmdb.Error, match="Input/output error") as err:
            write_in_order(store, 0)
        assert not isinstance(err.value, DiskFullError)
    assert seen == [str(tmp_path / "s" / "lmdb")]
    monkeypatch.undo()
    assert open_store(tmp_path / "s").committed_shards(0) == set()


# ---- 5. a frozen S3 endpoint ---------------------------------------------------------------------------------


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    """`distill-store ARGS` in a fresh process; the timeout bounds a hang (the failure this guards against)."""
    program = "import sys; from logit_store.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True, env=env, timeout=120)


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_", "LOGIT_STORE_"))}
    return env | {"AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"} | extra


def test_a_frozen_s3_endpoint_is_one_line_within_the_timeout(tmp_path):
    """An endpoint that accepts connections (the kernel completes them: the socket listens) and never answers."""
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(64)
        endpoint = f"http://127.0.0.1:{frozen.getsockname()[1]}"
        url = "s3://AKIDFROZEN:s3cret%2Fkey@bucket/x.zarr"
        proc = cli("info", url, env=clean_env(AWS_ENDPOINT_URL=endpoint, LOGIT_STORE_TIMEOUT="0.5"))
    assert proc.returncode == 2 and one_line(proc.stderr), proc.stderr
    assert proc.stderr.startswith("distill-store info: error: s3://***@bucket/x.zarr: Read timeout on endpoint URL")
    assert "no answer within 0.5 s; LOGIT_STORE_TIMEOUT sets the limit" in proc.stderr
    assert "AKIDFROZEN" not in proc.stderr and "s3cret" not in proc.stderr


def test_a_frozen_web_server_is_one_line_within_the_timeout(tmp_path):
    """A web server that accepts connections and never answers: aiohttp alone would wait 300 s a request."""
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(64)
        url = f"https://reader:pa55word@127.0.0.1:{frozen.getsockname()[1]}/x.zarr"
        proc = cli("info", url.replace("https", "http"), env=clean_env(LOGIT_STORE_TIMEOUT="0.5"))
    assert proc.returncode == 2 and one_line(proc.stderr), proc.stderr
    assert proc.stderr.startswith(f"distill-store info: error: http://***@127.0.0.1:{url.rsplit(':', 1)[1]}")
    assert "no answer within 0.5 s; LOGIT_STORE_TIMEOUT sets the limit" in proc.stderr
    assert "pa55word" not in proc.stderr


# ---- 6. environment variables that cannot be used ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("LOGIT_STORE_CACHE_BYTES", "abc", "LOGIT_STORE_CACHE_BYTES='abc': expected a whole number of bytes >= 1"),
        ("LOGIT_STORE_TIMEOUT", "soon", "LOGIT_STORE_TIMEOUT='soon': expected a number of seconds > 0"),
        (
            "AWS_ENDPOINT_URL",
            "notaurl",
            "AWS_ENDPOINT_URL='notaurl': expected the S3 endpoint as an http:// or https:// URL",
        ),
    ],
    ids=["LOGIT_STORE_CACHE_BYTES", "LOGIT_STORE_TIMEOUT", "AWS_ENDPOINT_URL"],
)
def test_a_bad_environment_variable_is_one_line_naming_it(intact, monkeypatch, capsys, name, value, expected):
    for key in [k for k in os.environ if k.startswith(("AWS_", "FSSPEC_", "LOGIT_STORE_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv(name, value)
    where = str(intact / "zarr") if name == "LOGIT_STORE_CACHE_BYTES" else "s3://bucket/x.zarr"
    assert store_cli(["info", where]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and expected in err, err


def test_a_bad_fsspec_endpoint_variable_is_one_line_naming_it():
    """fsspec reads FSSPEC_S3_* when imported: a fresh process."""
    proc = cli("verify", "s3://bucket/x.zarr", env=clean_env(FSSPEC_S3_ENDPOINT_URL="notaurl"))
    assert proc.returncode == 2 and one_line(proc.stderr), proc.stderr
    assert "s3://bucket/x.zarr: FSSPEC_S3_ENDPOINT_URL='notaurl': expected the S3 endpoint as an http://" in proc.stderr
