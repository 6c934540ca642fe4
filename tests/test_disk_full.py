"""A full disk (ENOSPC, injected in-process at a known write) is one line naming the file, exit 2, and leaves no
temporary file; a store creation killed midway leaves nothing that outlives the next one (issue 13)."""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from store_helpers import manifest, write_in_order
from train_helpers import base_recipe, small_digits, write_recipe

import logit_store.location
from distill.cli import train as train_main
from logit_store import DiskFullError, ShardWriter, create_store, open_store
from logit_store.backends.lmdb_backend import LmdbBackend
from logit_store.locks import RangeLock

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_at(calls: int, real, written: list | None = None):
    """`real`, except that its `calls`-th call raises ENOSPC (after writing half its bytes, for write_file)."""
    count = {"n": 0}

    def fake(*args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            if written is not None:  # a torn temporary file, as a write cut short by the full disk leaves
                Path(args[0]).write_bytes(args[1][: len(args[1]) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return fake


def temporary_files(root: Path) -> list[Path]:
    return [p for p in root.parent.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]


@pytest.fixture
def in_order(monkeypatch):
    """Commits on the writer's own thread, in shard order: the N-th write is a known shard's."""
    monkeypatch.setattr(ShardWriter, "MAX_SEALED", 0)


def test_a_full_disk_at_a_commit_marker_names_it_and_leaves_no_temporary_file(tmp_path, monkeypatch, in_order):
    store = create_store(tmp_path / "s", manifest())
    monkeypatch.setattr(logit_store.location, "write_file", fail_at(3, logit_store.location.write_file, written=[]))
    with pytest.raises(DiskFullError) as err:
        write_in_order(store, 0)
    marker = tmp_path / "s" / "commits" / "e00000-s000002.json"
    assert (
        str(err.value)
        == f"disk full: cannot write {marker} (no space left on its file system); free space, then run again"
    )
    assert temporary_files(tmp_path / "s") == [] and not marker.exists()
    assert open_store(tmp_path / "s").committed_shards(0) == {0, 1}


@pytest.mark.parametrize("backend", ["zarr", "lmdb"])
def test_a_full_disk_in_the_backend_names_the_store(tmp_path, monkeypatch, in_order, backend):
    """zarr fails in its store's file writes (OSError); lmdb with an lmdb.Error that carries only the message."""
    store = create_store(tmp_path / "s", manifest(backend))
    if backend == "zarr":
        import zarr.storage

        monkeypatch.setattr(zarr.storage.LocalStore, "set", fail_at(1, zarr.storage.LocalStore.set))
    else:
        import lmdb

        def full(*_args, **_kw):
            raise lmdb.Error(f"mdb_txn_commit: {os.strerror(errno.ENOSPC)}")

        monkeypatch.setattr(LmdbBackend, "write_rows", full)
    with pytest.raises(DiskFullError, match=rf"^disk full: cannot write .*{tmp_path / 's'}"):
        write_in_order(store, 0)
    assert open_store(tmp_path / "s").committed_shards(0) == set()


def test_a_full_disk_while_creating_a_store_leaves_no_build(tmp_path, monkeypatch):
    monkeypatch.setattr(logit_store.location, "write_file", fail_at(1, logit_store.location.write_file, written=[]))
    with pytest.raises(DiskFullError, match=r"manifest\.json"):
        create_store(tmp_path / "s", manifest())
    assert list(tmp_path.iterdir()) == []


def test_a_creator_killed_midway_leaves_a_build_the_next_creation_removes(tmp_path):
    """SIGKILL inside backend.create: the `<store>.tmp-<hex>` build stays; the next create_store removes it,
    but never the build of a creator still at work (its build lock held)."""
    kill = (
        "import os, signal, sys; sys.path.insert(0, 'tests'); from store_helpers import manifest; "
        "from logit_store.backends.zarr_backend import ZarrBackend; from logit_store import create_store; "
        "ZarrBackend.create = lambda self: os.kill(os.getpid(), signal.SIGKILL); "
        f"create_store({str(tmp_path / 's')!r}, manifest())"
    )
    proc = subprocess.run([sys.executable, "-c", kill], cwd=Path(__file__).parent.parent, capture_output=True)
    assert proc.returncode == -9, proc.stderr
    (stale,) = tmp_path.iterdir()
    assert stale.name.startswith("s.tmp-")
    live = tmp_path / ("s.tmp-" + "a" * 32)
    held = RangeLock(str(live / ".locks"), "create", "a creator at work")
    create_store(tmp_path / "s", manifest())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", live.name]
    held.release()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    return {"root": root, **small_digits(root)}


class FullFile:
    """A file whose writes fail with ENOSPC once `room` bytes are written, as a full disk fails them."""

    def __init__(self, path, room: int) -> None:
        self.fh, self.room = builtins.open(path, "wb"), room  # noqa: SIM115 (closed by __exit__)

    def write(self, data) -> int:
        if self.room < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


def test_a_full_disk_at_a_checkpoint_is_one_line_and_exit_2(digits, tmp_path, monkeypatch, capsys):
    """torch.save writes state.pt through a Python file (its own writer would say only "unexpected pos")."""
    import distill.checkpoint

    monkeypatch.setenv("DISTILL_CACHE", str(digits["root"] / "cache"))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(digits, out, epochs=1))

    def opener(path, mode="r", *args, **kwargs):
        if Path(path).name.startswith("state.pt"):
            return FullFile(path, room=1000)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(distill.checkpoint, "open", opener, raising=False)
    assert train_main([str(recipe)]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    state = re.escape(str(out / "checkpoints")) + r"/[a-z0-9_]+\.partial/state\.pt"
    assert re.search(rf"distill-train: error: .*r\.yaml: disk full: cannot write {state} \(no space left on its "
                     r"file system\); free space, then run again$", err), err  # fmt: skip
    assert temporary_files(out / "x") == []


def test_a_full_disk_at_the_runs_last_files_is_one_line_and_exit_2(digits, tmp_path, monkeypatch, capsys):
    """A write the OS names no file for (the training curves here) is named by the run's output_dir."""
    import distill.trainer

    monkeypatch.setenv("DISTILL_CACHE", str(digits["root"] / "cache"))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(digits, out, epochs=1))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(distill.trainer, "plot_training_curves", full)
    assert train_main([str(recipe)]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err.endswith(f"r.yaml: disk full: cannot write {out} (no space left on its file system); free space, "
                        "then run again"), err  # fmt: skip


def test_a_full_disk_at_the_summary_leaves_no_torn_file_and_the_rerun_finishes(digits, tmp_path, monkeypatch, capsys):
    """summary.json marks a run finished: one torn by a full disk would make the folder look done (and unreadable).
    It is written whole or not at all, so the error names it, nothing is left, and the same command finishes."""
    import distill.checkpoint

    monkeypatch.setenv("DISTILL_CACHE", str(digits["root"] / "cache"))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(digits, out, epochs=1))

    def opener(path, mode="r", *args, **kwargs):
        if Path(path).name.startswith("summary.json"):
            return FullFile(path, room=40)  # the first 40 bytes land, then the disk is full
        return builtins.open(path, mode, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(distill.checkpoint, "open", opener, raising=False)
        assert train_main([str(recipe)]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err.endswith(f"r.yaml: disk full: cannot write {out / 'summary.json'} (no space left on its file "
                        "system); free space, then run again"), err  # fmt: skip
    assert not (out / "summary.json").exists() and temporary_files(out / "x") == []
    assert train_main([str(recipe)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["steps"] > 0
