"""A store grows (more epochs), records which run wrote which planes, and reports its coverage per epoch."""

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from store_helpers import manifest, records_for, write_epoch, write_legacy_store

from logit_store import (
    Manifest,
    ManifestMismatchError,
    StoreError,
    StoreLockedError,
    create_store,
    open_store,
)
from logit_store.cli import main as store_cli
from logit_store.growth import FAULT_GROW
from logit_store.pin import make_pin, pin_reads

# 1,000 samples in shards of 128 records (the last one 104): partial epochs have counts that show.
N, SHARD = 1000, 128
BACKENDS = ["zarr", "lmdb"]
SAVE = {"by": "distill-save-logits", "run": "runs/save", "teacher": "timm:resnet18"}


def small(backend: str = "zarr", epochs: int = 2) -> Manifest:
    return manifest(backend, num_samples=N, epochs=epochs, shard_records=SHARD, chunk_records=64)


def assert_records(store, epoch: int, ids: np.ndarray) -> None:
    """The store's records of (epoch, ids) are the helpers' formula for them (store_helpers.records_for)."""
    got, want = store.read(epoch, ids), records_for(store.manifest, epoch, ids)
    for name, value in want.as_dict().items():
        np.testing.assert_array_equal(getattr(got, name), value, err_msg=f"epoch {epoch} {name}")


def python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`code` run by a fresh interpreter (tests/ on its path), as another process of a run would."""
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parent)} | (env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grow_then_write_the_new_planes_and_read_them_back(tmp_path, backend):
    store = create_store(tmp_path / "s", small(backend))
    write_epoch(store, 0)
    store.grow(4)
    assert store.manifest.epochs == 4 and store.pending_shards(3) == list(range(8))
    write_epoch(store, 3)
    write_epoch(store, 2, shards=[1])
    again = open_store(tmp_path / "s")
    assert again.manifest.epochs == 4
    ids = np.random.default_rng(0).permutation(N)[:300]
    assert_records(again, 3, ids)
    assert_records(again, 0, ids)
    assert_records(again, 2, np.arange(SHARD, 2 * SHARD))
    missing = {(p.epoch, p.start) for p in again.verify()}
    assert missing == {(1, s * SHARD) for s in range(8)} | {(2, s * SHARD) for s in range(8) if s != 1}
    store.grow(3)  # fewer than it has: nothing
    assert open_store(tmp_path / "s").manifest.epochs == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reader_opened_before_the_grow_reads_its_planes_unchanged(tmp_path, backend):
    """Plain and pinned (as a training run reads): epoch 0 loaded before the grow, epoch 1 after it."""
    store = create_store(tmp_path / "s", small(backend))
    write_epoch(store, 0)
    write_epoch(store, 1)
    plain, pinned = open_store(tmp_path / "s", read_only=True), open_store(tmp_path / "s", read_only=True)
    pin_reads(pinned, make_pin(pinned, [0, 1]))
    ids = np.arange(0, N, 7)
    for reader in (plain, pinned):
        assert_records(reader, 0, ids)
    store.grow(5)
    write_epoch(store, 4)
    for reader in (plain, pinned):
        assert reader.manifest.epochs == 2
        assert_records(reader, 0, ids)
        assert_records(reader, 1, ids)  # loaded after the grow: the pin takes a grown store as the same store
    assert_records(open_store(tmp_path / "s"), 4, ids)


def test_two_growers_at_once_end_with_the_larger_and_every_plane_writable(tmp_path):
    """Two processes grow the same store at once (to 3 and to 6 epochs), in whatever order they get there."""
    path = tmp_path / "s"
    create_store(path, small())
    code = "import sys; from logit_store import open_store; open_store(sys.argv[1]).grow(int(sys.argv[2]))"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parent)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path), n], env=env, stderr=subprocess.PIPE) for n in "36"
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    store = open_store(path)
    assert store.manifest.epochs == 6
    assert zarr.open_array(str(path / "values"), mode="r").shape[0] == 6
    for epoch in (2, 5):
        write_epoch(store, epoch, shards=[7])
        assert_records(open_store(path), epoch, np.arange(7 * SHARD, N))


def test_the_manifest_lock_is_held_while_the_manifest_changes(tmp_path, monkeypatch):
    """Every update reads, changes and writes the manifest under `.locks/manifest` (another process's
    non-blocking flock on it fails all the while), so growers and provenance writers take turns."""
    store = create_store(tmp_path / "s", small())
    seen = []

    def try_lock(*_):
        fd = os.open(tmp_path / "s" / ".locks" / "manifest", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append("free")
        except BlockingIOError:
            seen.append("held")
        finally:
            os.close(fd)

    location = store.location
    write = location.write_bytes
    monkeypatch.setattr(location, "write_bytes", lambda data, *parts: try_lock() or write(data, *parts))
    store.grow(3)
    store.add_provenance([0], SAVE)
    store.refresh_statistics()
    assert seen == ["held", "held", "held"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_store_opened_before_another_grew_it_loses_nothing_when_it_updates_the_manifest(tmp_path, backend):
    """Every update starts from the manifest on the store, not the one this process opened: a save finishing
    (its statistics) or recording provenance after a training run grew the store keeps the grown epochs, and
    takes them in (the back-end too: it then writes the new planes)."""
    saver = create_store(tmp_path / "s", small(backend))
    write_epoch(saver, 0)
    trainer = open_store(tmp_path / "s")
    trainer.grow(4)
    trainer.add_provenance([3], {"by": "distill-train (recorded)", "run": "runs/a"})
    saver.refresh_statistics()
    saver.add_provenance([0], SAVE)
    on_store = open_store(tmp_path / "s").manifest
    assert on_store.epochs == 4 and [e["planes"] for e in on_store.provenance] == [[3], [0]]
    assert on_store.statistics["records"] == N
    assert saver.manifest.epochs == 4
    write_epoch(saver, 3, shards=[7])
    assert_records(open_store(tmp_path / "s"), 3, np.arange(7 * SHARD, N))


def test_growing_an_object_store_takes_its_lock_object(monkeypatch):
    """memory:// (an fsspec object store): the grow works, leaves no lock object, and waits for none longer
    than REMOTE_LOCK_WAIT: one left by a killed process is a one-line StoreLockedError naming it."""
    import fsspec

    from logit_store import locks

    url = "memory://grow-bucket/s"
    store = create_store(url, small())
    write_epoch(store, 0, shards=[0])
    store.grow(3)
    write_epoch(store, 2, shards=[0])
    assert_records(open_store(url), 2, np.arange(SHARD))
    fs = fsspec.filesystem("memory")
    assert not fs.exists("/grow-bucket/s/.locks/manifest")
    fs.pipe_file("/grow-bucket/s/.locks/manifest", b"")  # a grower killed while holding it
    monkeypatch.setattr(locks, "REMOTE_LOCK_WAIT", 0.0)
    with pytest.raises(StoreLockedError, match=r"memory://grow-bucket/s/\.locks/manifest\); if none is"):
        open_store(url).grow(4)
    assert open_store(url).manifest.epochs == 3
    fs.rm("/grow-bucket/s", recursive=True)


def test_grow_is_refused_read_only_embeddings_and_version_2(tmp_path):
    create_store(tmp_path / "s", small())
    with pytest.raises(StoreError, match=r"was opened read-only: cannot write to it"):
        open_store(tmp_path / "s", read_only=True).grow(3)
    with pytest.raises(StoreError, match=r"was opened read-only: cannot record provenance"):
        open_store(tmp_path / "s", read_only=True).add_provenance([0], SAVE)
    emb = Manifest(num_samples=N, num_classes=0, k=0, epochs=2, kind="embeddings", embed_dim=8)
    embeddings = create_store(tmp_path / "e", emb)
    with pytest.raises(StoreError, match=r"is an embeddings store: growing it is not supported \(its text plane"):
        embeddings.grow(3)
    old = tmp_path / "v2"
    write_legacy_store(old, 2, [0])
    with pytest.raises(StoreError, match=r"format-version-2 logits store: .* distill-store convert"):
        open_store(old).grow(3)
    assert [open_store(p).manifest.epochs for p in (tmp_path / "s", tmp_path / "e", old)] == [2, 2, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_store_grows_a_store_asked_for_more_epochs_and_reopens_one_asked_for_fewer(tmp_path, backend):
    store = create_store(tmp_path / "s", small(backend))
    write_epoch(store, 0)
    assert create_store(tmp_path / "s", small(backend, epochs=4)).manifest.epochs == 4
    fewer = create_store(tmp_path / "s", small(backend, epochs=2))  # the save that made it, resumed
    assert fewer.manifest.epochs == 4
    write_epoch(fewer, 1)
    assert_records(open_store(tmp_path / "s"), 1, np.arange(N))
    other = manifest(backend, num_samples=N, epochs=5, k=4, shard_records=SHARD, chunk_records=64)
    with pytest.raises(ManifestMismatchError, match=r"epochs: store has 4, asked for 5; k: store has 5, asked for 4"):
        create_store(tmp_path / "s", other)  # another field too: refused as before


def test_provenance_round_trip_merges_a_sources_planes_and_keeps_no_credentials(tmp_path):
    store = create_store(tmp_path / "s", small(epochs=4))
    assert "provenance" not in json.loads((tmp_path / "s" / "manifest.json").read_text())  # none: no key
    store.add_provenance([1, 0], SAVE | {"at": "2026-01-01T00:00:00+00:00"})
    secret = "s3://AKIAKEY:very-secret@bucket/runs/student"
    recorded = {"by": "distill-train (recorded)", "run": secret, "teacher": "timm:resnet18"}
    store.add_provenance([2], recorded | {"at": "2026-01-02T00:00:00+00:00"})
    store.add_provenance([3], recorded | {"at": "2026-01-03T00:00:00+00:00"})  # the same run: one entry
    text = (tmp_path / "s" / "manifest.json").read_text()
    assert "very-secret" not in text and "AKIAKEY" not in text
    expected = [
        SAVE | {"at": "2026-01-01T00:00:00+00:00", "planes": [0, 1]},
        recorded | {"run": "s3://***@bucket/runs/student", "at": "2026-01-03T00:00:00+00:00", "planes": [2, 3]},
    ]
    assert open_store(tmp_path / "s").manifest.provenance == expected == json.loads(text)["provenance"]
    assert create_store(tmp_path / "s", small(epochs=4)).manifest.provenance == expected  # not identity
    with pytest.raises(StoreError, match=r"planes \[4\] are outside the store's \[0, 4\)"):
        store.add_provenance([4], SAVE)
    with pytest.raises(StoreError, match=r"provenance needs plane indices and a source of plain JSON data"):
        store.add_provenance([0.5], SAVE)
    store.add_provenance(np.arange(2), SAVE | {"at": "2026-01-01T00:00:00+00:00"})  # numpy's integers: the same
    data = json.loads(text)
    del data["provenance"]  # a manifest written before provenance existed
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(data))
    assert open_store(tmp_path / "s").manifest.provenance == []


def test_provenance_from_two_processes_at_once_keeps_every_entry(tmp_path):
    create_store(tmp_path / "s", small(epochs=4))
    code = (
        "import sys; from logit_store import open_store\n"
        "store = open_store(sys.argv[1])\n"
        "for i in range(8): store.add_provenance([i % 4], {'by': 'distill-train (fallback)', 'run': sys.argv[2] + str(i)})"
    )
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parent)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "s"), run], env=env, stderr=subprocess.PIPE)
        for run in ("a", "b")
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    runs = sorted(e["run"] for e in open_store(tmp_path / "s").manifest.provenance)
    assert runs == sorted(f"{r}{i}" for r in "ab" for i in range(8))


def test_coverage_counts_the_records_written(tmp_path):
    store = create_store(tmp_path / "s", small(epochs=3))
    written = {0: np.arange(N), 1: np.concatenate([np.arange(0, SHARD), np.arange(7 * SHARD, N)]), 2: np.arange(0)}
    with store.writer(0) as writer:
        writer.write(written[0], records_for(store.manifest, 0, written[0]))
    with store.writer(1, [0, 7]) as writer:
        writer.write(written[1], records_for(store.manifest, 1, written[1]))
    assert store.coverage() == {epoch: len(ids) for epoch, ids in written.items()} == {0: 1000, 1: 232, 2: 0}


def test_info_shows_coverage_per_epoch_and_provenance(tmp_path, capsys):
    store = create_store(tmp_path / "s", small(epochs=2))
    write_epoch(store, 0)
    store.grow(5)
    write_epoch(store, 1, shards=[0, 1, 7])  # 128 + 128 + 104 records
    write_epoch(store, 4)
    store.add_provenance([0], SAVE | {"at": "2026-01-01T00:00:00+00:00"})
    store.add_provenance(
        [1, 4], {"by": "distill-train (fallback)", "run": "runs/long", "at": "2026-01-02T00:00:00+00:00"}
    )
    assert store_cli(["info", str(tmp_path / "s")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.strip() for line in lines if line.startswith("  epoch")] == [
        "epoch 0: complete",
        "epoch 1: 360 of 1,000 records",
        "epochs 2-3: missing",
        "epoch 4: complete",
    ] + [line.strip() for line in lines if line.startswith("  epoch") and "sha256" in line]
    assert (
        "written by   distill-save-logits: epoch 0 (at 2026-01-01T00:00:00+00:00, run runs/save, teacher timm:resnet18)"
        in lines
    )
    assert "written by   distill-train (fallback): epochs 1, 4 (at 2026-01-02T00:00:00+00:00, run runs/long)" in lines
    assert store_cli(["info", str(tmp_path / "s"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["records_per_epoch"] == {"0": 1000, "1": 360, "2": 0, "3": 0, "4": 1000}
    assert [e["planes"] for e in info["manifest"]["provenance"]] == [[0], [1, 4]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kill_during_grow_leaves_the_old_epochs_and_the_store_grows_again(tmp_path, backend):
    """Killed (SIGKILL) once the back-end has room for the new planes, before the manifest says so."""
    path = tmp_path / "s"
    store = create_store(path, small(backend))
    write_epoch(store, 0)
    code = f"from logit_store import open_store; open_store({str(path)!r}).grow(4)"
    killed = python(code, env={FAULT_GROW: "resized"})
    assert killed.returncode == -9, killed.stderr
    if backend == "zarr":  # the fault landed between the two steps: room made, manifest not yet written
        assert zarr.open_array(str(path / "values"), mode="r").shape[0] == 4
    after = open_store(path)
    assert after.manifest.epochs == 2 and after.coverage() == {0: N, 1: 0}
    assert_records(after, 0, np.arange(N))
    assert {p.epoch for p in after.verify()} == {1}
    after.grow(4)
    write_epoch(after, 3)
    assert open_store(path).manifest.epochs == 4
    assert_records(open_store(path), 3, np.arange(N))


def test_provenance_said_again_changes_no_byte_of_the_manifest(tmp_path):
    """A finished save run again says its provenance again: the manifest (its time included) stays as it was."""
    store = create_store(tmp_path / "s.zarr", manifest(epochs=2))
    store.add_provenance([0, 1], {"by": "distill-save-logits", "teacher": "timm:x"})
    before = (tmp_path / "s.zarr" / "manifest.json").read_bytes()
    store.add_provenance([1], {"by": "distill-save-logits", "teacher": "timm:x", "at": "2099-01-01T00:00:00+00:00"})
    assert (tmp_path / "s.zarr" / "manifest.json").read_bytes() == before
    store.add_provenance([0], {"by": "distill-train (recorded)", "teacher": "timm:x"})
    assert [e["by"] for e in json.loads((tmp_path / "s.zarr" / "manifest.json").read_bytes())["provenance"]] == [
        "distill-save-logits",
        "distill-train (recorded)",
    ]
