"""Faults and bad input around a run: credentials never written or printed, the output dir locked, the store
pinned across a resume, a failed first try that blocks nothing, and the checks of the plan step.

Each test reproduces one attack of docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import base_recipe, run_cli, small_digits, write_recipe

from distill.checkpoint import lock_output_dir
from distill.recipe import RecipeError
from distill.run import run_recipe
from distill.trainer import FAULT_AFTER_STEPS
from logit_store import StoreLockedError

SECRET = "hunter2secret"
TEACHER = "test_convnext"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return {"root": root, **small_digits(root)}


def all_files_text(folder: Path) -> str:
    """Every byte the run wrote, decoded loosely: TensorBoard events, CSV, YAML, JSON, PNG alike."""
    return "".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


def test_credentials_in_a_location_are_never_written_or_printed(data, tmp_path):
    # A real folder whose path reads as a URL with credentials: the run works, and says nothing of them.
    url_dir = tmp_path / f"s3:/user:{SECRET}@bucket"
    shutil.copytree(data["train"], url_dir / "train")
    train = str(tmp_path) + f"/s3://user:{SECRET}@bucket/train"
    recipe = base_recipe(data, tmp_path / "run", epochs=1, data__train=train)
    proc = run_cli("distill-train", [str(write_recipe(tmp_path / "r.yaml", recipe))], data["root"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert SECRET not in all_files_text(tmp_path / "run") and SECRET not in proc.stdout + proc.stderr
    assert "s3://***@bucket/train" in (tmp_path / "run" / "recipe.yaml").read_text()
    again = run_cli("distill-train", [str(tmp_path / "r.yaml")], data["root"])  # done: "already finished"
    assert again.returncode == 0 and "already finished" in again.stdout and SECRET not in again.stdout + again.stderr
    other = write_recipe(tmp_path / "other.yaml", recipe | {"seed": 1})  # error path: another recipe's folder
    refused = run_cli("distill-train", [str(other)], data["root"])
    assert refused.returncode == 2 and "seed differs" in refused.stderr and SECRET not in refused.stderr
    bad = base_recipe(data, tmp_path / "bad", method="tinyvit", teacher={"source": f"store:s3://u:{SECRET}@b/x.zarr"})
    proc = run_cli("distill-train", [str(write_recipe(tmp_path / "bad.yaml", bad))], data["root"])
    assert proc.returncode == 2 and "s3://***@b/x.zarr" in proc.stderr and SECRET not in proc.stderr


def test_a_second_run_in_a_held_output_dir_is_refused(data, tmp_path):
    recipe = base_recipe(data, tmp_path / "run", epochs=1)
    held = lock_output_dir(tmp_path / "run")  # another run holds it
    with pytest.raises(StoreLockedError, match=r"output_dir .*run is being written by another process"):
        run_recipe(recipe)
    assert not (tmp_path / "run" / "recipe.yaml").exists()
    held.release()  # (a killed holder's flock goes with its process)
    assert run_recipe(recipe)[0]["epochs"] == 1


def test_a_run_killed_before_its_first_checkpoint_blocks_no_corrected_recipe(data, tmp_path):
    out = tmp_path / "run"
    recipe = base_recipe(data, out, epochs=1)
    proc = run_cli("distill-train", [str(write_recipe(tmp_path / "r.yaml", recipe))], data["root"],
                   env_extra={FAULT_AFTER_STEPS: "2"})  # fmt: skip
    assert proc.returncode == -9 and (out / "recipe.yaml").exists() and not (out / "checkpoints").exists()
    corrected = base_recipe(data, out, epochs=1, optimizer={"name": "adamw", "lr": 0.001})
    assert run_recipe(corrected)[0]["steps"] == 5
    steps = [int(r.split(",")[0]) for r in (out / "metrics.csv").read_text().splitlines()[1:] if ",train/loss," in r]
    assert steps == [1, 2, 3, 4, 5]  # the failed try's rows are gone


@pytest.fixture(scope="module")
def teachers(data):
    """Two different teacher checkpoints of one architecture."""
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        import timm
        from safetensors.torch import save_file

        path = data["root"] / f"teacher{seed}.safetensors"
        save_file(timm.create_model(TEACHER, num_classes=10).state_dict(), str(path))
        paths.append(path)
    return paths


def save_store(data, out: Path, checkpoint: Path, *extra: str) -> None:
    args = ["--teacher", f"timm:{TEACHER}", "--checkpoint", str(checkpoint), "--data", data["train"], "--out",
            str(out), "--epochs", "2", "--k", "3", "--aug", "basic", "--img-size", "32", "--batch-size", "32",
            *extra]  # fmt: skip
    proc = run_cli("distill-save-logits", args, data["root"])
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_resume_refuses_a_store_saved_again_by_another_teacher(data, teachers, tmp_path):
    store, out = tmp_path / "teacher.zarr", tmp_path / "run"
    save_store(data, store, teachers[0])
    recipe = base_recipe(data, out, method="tinyvit", teacher={"source": f"store:{store}"}, checkpoint_every=1)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = run_cli("distill-train", [str(path)], data["root"], env_extra={FAULT_AFTER_STEPS: "3"})
    assert proc.returncode == -9 and (out / "checkpoints" / "step_00000003").exists()
    shutil.rmtree(store)
    save_store(data, store, teachers[1])  # the same path, another teacher
    proc = run_cli("distill-train", [str(path)], data["root"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "changed since this run started" in proc.stderr and "teacher" in proc.stderr
    assert "weights_sha256" in proc.stderr


def test_plan_refuses_a_student_with_another_class_count_and_a_negative_lr(data, tmp_path):
    recipe = base_recipe(data, tmp_path / "run", student={"model": "test_vit", "kwargs": {"num_classes": 7}})
    with pytest.raises(RecipeError, match=r"student\.kwargs\.num_classes: test_vit would output 7 classes.* 10"):
        run_recipe(recipe)
    with pytest.raises(RecipeError, match=r"optimizer\.lr: expected a number >= 0, got -0\.1"):
        run_recipe(base_recipe(data, tmp_path / "run", optimizer={"lr": -0.1}))
    (tmp_path / "file").write_text("")
    with pytest.raises(RecipeError, match=r"output_dir .*file is a file, not a folder"):
        run_recipe(base_recipe(data, tmp_path / "file"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_resumed_run_counts_its_whole_wall_time_and_logs_no_step_twice(data, tmp_path):
    """Killed after step 12, two steps past its last checkpoint (epoch 2's end, step 10): the resumed run logs
    steps 11 and 12 again, and neither metrics.csv nor TensorBoard may hold them twice."""
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", base_recipe(data, out, epochs=3))
    proc = run_cli("distill-train", [str(path)], data["root"], env_extra={FAULT_AFTER_STEPS: "12"})
    assert proc.returncode == -9
    state = torch.load(out / "checkpoints" / "step_00000010" / "state.pt", weights_only=True)
    assert run_cli("distill-train", [str(path)], data["root"]).returncode == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_seconds"] > state["train"]["wall_seconds"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = sorted(e.step for e in EventAccumulator(str(out / "tensorboard")).Reload().Scalars("train/loss"))
    rows = [int(r.split(",")[0]) for r in (out / "metrics.csv").read_text().splitlines()[1:] if ",train/loss," in r]
    assert logged == rows == list(range(1, 16))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zarr", "lmdb"])
def test_training_from_a_damaged_store_names_the_range_and_exits_2(data, teachers, tmp_path, backend):
    """A zarr shard's index (the end of its file) garbled, or lmdb's data.mdb cut short (SIGBUS, unchecked)."""
    store = tmp_path / f"teacher.{backend}"
    save_store(data, store, teachers[0], "--backend", backend)
    if backend == "zarr":
        shard = store / "values" / "c" / "0" / "0" / "0"
        raw = bytearray(shard.read_bytes())
        raw[-12] ^= 0xFF
        shard.write_bytes(bytes(raw))
    else:
        data_file = store / "lmdb" / "data.mdb"
        os.truncate(data_file, data_file.stat().st_size // 2 // 4096 * 4096)
    recipe = base_recipe(data, tmp_path / "run", method="tinyvit", teacher={"source": f"store:{store}"}, epochs=1)
    proc = run_cli("distill-train", [str(write_recipe(tmp_path / "r.yaml", recipe))], data["root"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    error = next(line for line in proc.stderr.splitlines() if "distill-train: error:" in line)
    assert f"{store}: epoch 0 records [0, 64) cannot be decoded" in error
    assert error.endswith(f"; run distill-store verify {store}")
