"""The store a run pins, checked while it trains and when it is extended (docs/RELIABILITY.md).

A store replaced under a running training (its folder removed, another teacher's store copied in its place)
stops the run at the next plane it loads, naming the store and the epoch; a finished run extended by more
epochs pins the epochs it had not read yet, and still refuses a store whose pinned epochs changed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from store_helpers import manifest, records_for, synthetic_records, write_epoch, write_in_order
from train_helpers import base_recipe, small_digits, write_recipe

from distill.cli import save_logits as save_main
from distill.cli import train as train_main
from distill.plan import STORE_PIN, pin_store
from distill.recipe import RecipeError
from distill.trainer import Trainer
from logit_store import StoreChangedError, convert_store, create_store, open_store
from logit_store.pin import make_pin, pin_reads
from teachers.store_teacher import StoreTeacher

TEACHER = "test_convnext"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pin")
    return {"root": root, **small_digits(root)}


@pytest.fixture(scope="module")
def stores(data) -> dict[tuple[str, int], Path]:
    """Stores of 2 epochs by two teachers of one architecture (0 and 1), as zarr and lmdb, never written to."""
    import timm
    from safetensors.torch import save_file

    out: dict[tuple[str, int], Path] = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        weights = data["root"] / f"teacher{seed}.safetensors"
        save_file(timm.create_model(TEACHER, num_classes=10).state_dict(), str(weights))
        out["zarr", seed] = data["root"] / f"stores/teacher{seed}.zarr"
        args = ["--teacher", f"timm:{TEACHER}", "--checkpoint", str(weights), "--data", data["train"], "--out",
                str(out["zarr", seed]), "--epochs", "2", "--k", "3", "--aug", "basic", "--img-size", "32"]  # fmt: skip
        assert save_main(args) == 0
        out["lmdb", seed] = data["root"] / f"stores/teacher{seed}.lmdb"
        convert_store(open_store(out["zarr", seed]), out["lmdb", seed], "lmdb").close()
    return out


def replace(store: Path, other: Path) -> None:
    """The store's folder removed and another store copied in its place."""
    shutil.rmtree(store)
    shutil.copytree(other, store)


def replace_after_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int, store: Path, other: Path) -> None:
    """A deterministic fault: `store` is replaced by `other` right after the checkpoint that ends `epoch`."""
    real = Trainer.checkpoint

    def checkpoint(self: Trainer) -> None:
        real(self)
        if (self.state.epoch, self.state.step_in_epoch) == (epoch + 1, 0):
            replace(store, other)

    monkeypatch.setattr(Trainer, "checkpoint", checkpoint)


def write_two_stores(ours: Path, theirs: Path, m) -> None:
    """Two complete stores of one manifest with other records (as two teachers would give)."""
    for path, write in ((ours, write_epoch), (theirs, write_in_order)):
        store = create_store(path, m)
        for epoch in range(m.epochs):
            write(store, epoch)
        store.close()


def errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "error:" in line]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zarr", "lmdb"])
@pytest.mark.parametrize("cache", ["memory", "shared"])
def test_a_store_replaced_under_a_running_training_stops_it_naming_the_epoch(
    data, stores, tmp_path, monkeypatch, capsys, backend, cache
):
    """Another teacher's store copied over the one a run reads, after epoch 0's checkpoint: the run stops at
    epoch 1 (exit 2, one line) instead of finishing on two teachers' targets. With a small reader budget the
    planes are decoded into the node's shared cache files, which must not let the check be skipped either."""
    if cache == "shared":
        monkeypatch.setenv("LOGIT_STORE_CACHE_BYTES", "1")
        monkeypatch.setenv("LOGIT_STORE_CACHE_DIR", str(tmp_path / "cache"))
    store, out = tmp_path / f"teacher.{backend}", tmp_path / "run"
    shutil.copytree(stores[backend, 0], store)
    recipe = base_recipe(data, out, method="tinyvit", teacher={"source": f"store:{store}"}, epochs=2)
    replace_after_epoch(monkeypatch, 0, store, stores[backend, 1])
    assert train_main([str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    (err,) = errors(capsys)
    assert re.search(rf"{re.escape(str(store))} changed under this run at epoch 1: its manifest differs in "
                     r".*teacher\.weights_sha256 \(was '[0-9a-f]+', now '[0-9a-f]+'\)", err), err  # fmt: skip
    assert not (out / "summary.json").exists() and (out / "checkpoints" / "step_00000005").exists()


@pytest.mark.parametrize("backend", ["zarr", "lmdb"])
@pytest.mark.parametrize("cache_bytes", [1 << 30, 1])  # planes in process memory, or in shared cache files
def test_a_pinned_reader_refuses_every_plane_and_shard_of_a_replaced_store(tmp_path, backend, cache_bytes):
    """The same manifest, other records: caught at the next plane loaded, and at the next shard of a plane
    loaded in part; the rows the reader decoded before (checked against the pinned digests) stay served."""
    m = manifest(backend, num_samples=400, shard_records=100, chunk_records=50)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    write_two_stores(ours, theirs, m)
    reader = open_store(ours, cache_bytes=cache_bytes, cache_dir=str(tmp_path / "cache"))
    pin_reads(reader, make_pin(reader, range(m.epochs)))
    first = np.arange(100)
    before = reader.read(0, first)
    replace(ours, theirs)
    with pytest.raises(StoreChangedError, match=rf"^{re.escape(str(ours))} changed under this run at epoch 0: the "
                       r"commit of records \[100, 200\) differs from the pinned one"):  # fmt: skip
        reader.read(0, np.arange(100, 110))
    with pytest.raises(StoreChangedError, match=r"changed under this run at epoch 1: its commits differ from the "
                       r"pinned ones \(written again\)"):  # fmt: skip
        reader.read(1, first)
    np.testing.assert_array_equal(reader.read(0, first).values, before.values)
    np.testing.assert_array_equal(before.values, records_for(m, 0, first).values)


def test_an_lmdb_reader_reopens_a_data_file_replaced_under_it(tmp_path):
    """Unpinned, a reader reads the store now at its path: not the old data.mdb it mapped (whose rows would
    fail the new commits' digests, reported as damage)."""
    m = manifest("lmdb", num_samples=400, shard_records=100, chunk_records=50)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    write_two_stores(ours, theirs, m)
    reader = open_store(ours)
    ids = np.arange(0, 400, 7)
    np.testing.assert_array_equal(reader.read(0, ids).values, records_for(m, 0, ids).values)
    replace(ours, theirs)
    np.testing.assert_array_equal(reader.read(1, ids).values, synthetic_records(m, 1, ids).values)


@pytest.mark.slow
def test_extending_a_finished_run_pins_its_new_epochs_and_refuses_another_teachers_store(
    data, stores, tmp_path, capsys
):
    """README: re-running a finished recipe with more epochs extends it. The epochs the finished run had not
    read are pinned now (it used to be refused: "the records of epoch(s) 1 were written again")."""
    store, out = tmp_path / "teacher.zarr", tmp_path / "run"
    shutil.copytree(stores["zarr", 0], store)
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(data, out, method="tinyvit",
                                                           teacher={"source": f"store:{store}"}, epochs=1))  # fmt: skip
    assert train_main([str(recipe)]) == 0
    assert set(json.loads((out / STORE_PIN).read_text())["planes"]) == {"0"}
    replace(store, stores["zarr", 1])
    assert train_main([str(recipe), "--set", "epochs=2"]) == 2
    (err,) = errors(capsys)
    assert "changed since this run started" in err and "weights_sha256" in err
    replace(store, stores["zarr", 0])
    assert train_main([str(recipe), "--set", "epochs=2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["epochs"], summary["steps"]) == (2, 10)
    assert "extending from" in (out / "train.log").read_text()
    assert set(json.loads((out / STORE_PIN).read_text())["planes"]) == {"0", "1"}


@pytest.mark.slow
def test_a_pin_takes_in_new_epochs_but_refuses_a_pinned_epoch_written_again(stores, tmp_path):
    """The resume check itself: an epoch the saved pin lacks is pinned now; one it holds must be as it was."""
    teacher, out = StoreTeacher(stores["zarr", 0]), tmp_path / "run"
    out.mkdir()
    pin = make_pin(teacher.store, [0, 1])
    (out / STORE_PIN).write_text(json.dumps({"manifest": pin["manifest"], "planes": {"0": pin["planes"]["0"]}}))
    assert (
        pin_store(
            teacher,
            SimpleNamespace(epochs=2, teacher=SimpleNamespace(epochs="strict")),
            out,
            out / "checkpoints" / "last",
        )
        == pin
    )
    (out / STORE_PIN).write_text(json.dumps({"manifest": pin["manifest"], "planes": {"0": "0" * 64}}))
    with pytest.raises(RecipeError, match=r"changed since this run started in .*: the records of epoch\(s\) 0 were "
                       "written again"):  # fmt: skip
        pin_store(
            teacher,
            SimpleNamespace(epochs=2, teacher=SimpleNamespace(epochs="strict")),
            out,
            out / "checkpoints" / "last",
        )


@pytest.mark.slow
def test_a_run_resumes_over_its_store_grown_since_unless_it_cycles(stores, tmp_path):
    """A store grown since the run started (more epochs, `LogitStore.grow`) keeps the planes the run pinned: a
    strict run resumes; a cycle run, whose epoch e now reads e % 4 instead of e % 2, is refused naming epochs."""
    store = tmp_path / "grown.zarr"
    shutil.copytree(stores["zarr", 0], store)
    out = tmp_path / "run"
    out.mkdir()
    pin = make_pin(StoreTeacher(store).store, [0, 1])
    (out / STORE_PIN).write_text(json.dumps(pin))
    with open_store(store) as grown:
        grown.grow(4)
    strict, cycle = (SimpleNamespace(epochs=2, teacher=SimpleNamespace(epochs=mode)) for mode in ("strict", "cycle"))
    assert pin_store(StoreTeacher(store), strict, out, out / "checkpoints" / "last")["planes"] == pin["planes"]
    with pytest.raises(RecipeError, match=r"its manifest differs in epochs \(was 2, now 4; teacher.epochs: cycle"):
        pin_store(StoreTeacher(store), cycle, out, out / "checkpoints" / "last")
