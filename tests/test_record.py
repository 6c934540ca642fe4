"""The teacher runs once, whichever run comes first: a live teacher recorded while a student trains
(`teacher.record`), a store topped up by its own teacher (`teacher.fallback`). Each store left is compared with
the one distill-save-logits writes for the same teacher, views and k (content hash per epoch), and a student
trained from it with one trained from the saved store (the same weights, bit for bit)."""

from __future__ import annotations

import hashlib
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from train_helpers import base_recipe, run_cli, small_digits, write_recipe

from distill.cli import save_logits
from distill.errors import RecipeError
from distill.recipe import parse_recipe
from distill.run import run_recipe
from distill.trainer import FAULT_AFTER_STEPS
from logit_store import open_store
from logit_store.writer import FAULT_COMMIT

TEACHER = "test_resnet"
MIXING = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 1.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("record")
    return {"root": root, **small_digits(root, per_class_train=10, per_class_val=2)}  # 100 training images


@pytest.fixture(scope="module")
def checkpoint(data):
    torch.manual_seed(0)
    path = data["root"] / "teacher.safetensors"
    save_file(timm.create_model(TEACHER, num_classes=10).state_dict(), str(path))
    return path


def save(data, checkpoint, out, epochs: int, aug="basic", *extra: str) -> None:
    """distill-save-logits of the teacher: the independent store every test compares with."""
    aug_arg = aug if isinstance(aug, str) else str(write_recipe(out.parent / f"{out.name}.aug.yaml", aug))
    assert save_logits(["--teacher", f"timm:{TEACHER}", "--checkpoint", str(checkpoint), "--data", data["train"],
                        "--out", str(out), "--epochs", str(epochs), "--k", "3", "--aug", aug_arg,
                        "--img-size", "32", "--batch-size", "16", *extra]) == 0  # fmt: skip


def hashes(path) -> dict[str, str]:
    with open_store(path, read_only=True) as store:
        return store.info()["content_hashes"]


def weights_sha256(run) -> str:
    weights = load_file(str(run / "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode() + weights[name].numpy().tobytes())
    return digest.hexdigest()


def recording(data, checkpoint, out, store, epochs=2, **changes):
    """A live-teacher run that records its teacher: 100 images in batches of 24, so 4 of each epoch are dropped
    (computed at the epoch's end)."""
    teacher = {"source": f"timm:{TEACHER}", "checkpoint": str(checkpoint), "record": {"path": str(store), "k": 3}}
    return base_recipe(data, out, method="tinyvit", epochs=epochs, batch_size=24, teacher=teacher, **changes)


def student(data, out, store, epochs=2, **changes):
    return base_recipe(data, out, method="tinyvit", epochs=epochs, batch_size=20, student={"model": "test_vit2"},
                       teacher={"source": f"store:{store}"}, **changes)  # fmt: skip


@pytest.mark.parametrize("aug", ["basic", MIXING], ids=["unmixed", "mixed"])
def test_a_recorded_store_is_the_saved_one_and_teaches_the_same_student(data, checkpoint, tmp_path, aug):
    recorded, saved = tmp_path / "recorded.zarr", tmp_path / "saved.zarr"
    run_recipe(recording(data, checkpoint, tmp_path / "live", recorded, augmentation=aug))
    log = (tmp_path / "live" / "train.log").read_text()
    for epoch in (1, 2):  # the teacher ran once per view: only the dropped last batch was computed at the end
        assert f"epoch {epoch}: teacher outputs recorded in {recorded} (4 of them computed at the epoch's end)" in log
    save(data, checkpoint, saved, 2, aug)
    assert hashes(recorded) == hashes(saved) and set(hashes(saved)) == {"0", "1"}
    with open_store(recorded, read_only=True) as store:
        (entry,) = store.manifest.provenance
        assert entry["by"] == "distill-train (recorded)" and entry["planes"] == [0, 1]
        assert entry["teacher"] == f"timm:{TEACHER}" and entry["run"] == str(tmp_path / "live")
    run_recipe(student(data, tmp_path / "from_recorded", recorded, augmentation=aug))
    run_recipe(student(data, tmp_path / "from_saved", saved, augmentation=aug))
    assert weights_sha256(tmp_path / "from_recorded") == weights_sha256(tmp_path / "from_saved")


@pytest.mark.slow  # three CLI runs (over 30 s on 2 cores)
def test_a_run_killed_while_recording_resumes_and_leaves_the_whole_store(data, checkpoint, tmp_path):
    """Killed mid epoch 2 (4 steps per epoch, step checkpoints): epoch 1 is committed, epoch 2 is not; the rerun
    trains epoch 2 from step 6 and computes its first steps' records at the epoch's end."""
    recorded, saved = tmp_path / "recorded.zarr", tmp_path / "saved.zarr"
    recipe = write_recipe(tmp_path / "r.yaml", recording(data, checkpoint, tmp_path / "live", recorded,
                                                         checkpoint_every=1))  # fmt: skip
    killed = run_cli("distill-train", [str(recipe)], data["root"], env_extra={FAULT_AFTER_STEPS: "6"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    with open_store(recorded, read_only=True) as store:
        assert store.coverage() == {0: 100, 1: 0}
    resumed = run_cli("distill-train", [str(recipe)], data["root"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # steps 5 and 6 (48 views) trained before the kill, and the 4 dropped: computed at the epoch's end
    assert "epoch 2: teacher outputs recorded in" in resumed.stdout
    assert "(52 of them computed at the epoch's end)" in resumed.stdout, resumed.stdout
    save(data, checkpoint, saved, 2)
    assert hashes(recorded) == hashes(saved) and set(hashes(saved)) == {"0", "1"}


@pytest.mark.slow  # three CLI runs (over 30 s on 2 cores)
def test_a_run_killed_between_an_epochs_commits_completes_the_epoch_on_rerun(data, checkpoint, tmp_path):
    """Killed at the end of epoch 1 right after its first shard's commit (100 records in shards of 64), before
    any checkpoint: the rerun starts afresh, keeps only the other shard's outputs and commits it."""
    recorded, saved = tmp_path / "recorded.zarr", tmp_path / "saved.zarr"
    recipe = write_recipe(tmp_path / "r.yaml", recording(data, checkpoint, tmp_path / "live", recorded))
    killed = run_cli("distill-train", [str(recipe)], data["root"], env_extra={FAULT_COMMIT: "after:1"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    with open_store(recorded, read_only=True) as store:
        covered = store.coverage()
        assert 0 < covered[0] < 100 and covered[1] == 0  # one of epoch 1's two shards
    resumed = run_cli("distill-train", [str(recipe)], data["root"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    save(data, checkpoint, saved, 2)
    assert hashes(recorded) == hashes(saved) and set(hashes(saved)) == {"0", "1"}


@pytest.mark.slow
def test_two_processes_record_the_store_one_save_writes(data, checkpoint, tmp_path):
    """Each process keeps its own batches' outputs; they are gathered at the epoch's end and each commits its own
    shards: the store equals a one-process save."""
    recorded, saved = tmp_path / "recorded.zarr", tmp_path / "saved.zarr"
    recipe = write_recipe(tmp_path / "r.yaml", recording(data, checkpoint, tmp_path / "live", recorded))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_cli("distill-train", [str(recipe)], data["root"], launcher=launcher, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    save(data, checkpoint, saved, 2)
    assert hashes(recorded) == hashes(saved) and set(hashes(saved)) == {"0", "1"}


def test_a_store_topped_up_by_its_teacher_is_the_longer_saved_one(data, checkpoint, tmp_path):
    """A 4-epoch run on a 2-epoch store with the store's teacher as fallback grows it to 4 epochs (fresh views,
    not cycled); the store then equals a 4-epoch save, and a second run finds nothing to compute."""
    short, saved = tmp_path / "short.zarr", tmp_path / "saved.zarr"
    save(data, checkpoint, short, 2)
    save(data, checkpoint, saved, 4)
    teacher = {"source": f"store:{short}", "fallback": f"timm:{TEACHER}", "checkpoint": str(checkpoint)}
    recipe = student(data, tmp_path / "topped", short, epochs=4) | {"teacher": teacher}
    run_recipe(recipe)
    assert hashes(short) == hashes(saved) and set(hashes(saved)) == {"0", "1", "2", "3"}
    with open_store(short, read_only=True) as store:
        assert store.manifest.provenance[-1]["by"] == "distill-train (topped up)"
        assert store.manifest.provenance[-1]["planes"] == [2, 3]
    run_recipe(student(data, tmp_path / "from_saved", saved, epochs=4))
    assert weights_sha256(tmp_path / "topped") == weights_sha256(tmp_path / "from_saved")


@pytest.mark.slow  # three CLI runs (over 30 s on 2 cores)
def test_a_top_up_killed_after_a_commit_resumes_and_completes_the_store(data, checkpoint, tmp_path):
    """An interrupted save (killed after its first commit) topped up by a run that is itself killed after its
    first commit (the other shard of epoch 0): the rerun completes the store, equal to an uninterrupted save."""
    partial, saved = tmp_path / "partial.zarr", tmp_path / "saved.zarr"
    args = ["--teacher", f"timm:{TEACHER}", "--checkpoint", str(checkpoint), "--data", data["train"],
            "--out", str(partial), "--epochs", "3", "--k", "3", "--img-size", "32", "--batch-size", "16"]  # fmt: skip
    proc = run_cli("distill-save-logits", args, data["root"], env_extra={FAULT_COMMIT: "after:1"})
    assert proc.returncode == -9
    with open_store(partial, read_only=True) as store:
        shard = store.manifest.shard_records  # 100 records in shards of 64
        assert shard < 100 and store.coverage() == {0: shard, 1: 0, 2: 0}
    teacher = {"source": f"store:{partial}", "fallback": f"timm:{TEACHER}", "checkpoint": str(checkpoint)}
    recipe = write_recipe(
        tmp_path / "r.yaml", student(data, tmp_path / "run", partial, epochs=3) | {"teacher": teacher}
    )
    killed = run_cli("distill-train", [str(recipe)], data["root"], env_extra={FAULT_COMMIT: "after:1"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    with open_store(partial, read_only=True) as store:
        assert store.coverage() == {0: 100, 1: 0, 2: 0}, killed.stderr[-3000:]  # its first commit: the rest of epoch 0
    resumed = run_cli("distill-train", [str(recipe)], data["root"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    save(data, checkpoint, saved, 3)
    assert hashes(partial) == hashes(saved) and set(hashes(saved)) == {"0", "1", "2"}


def test_a_fallback_that_is_not_the_stores_teacher_is_refused_before_training(data, checkpoint, tmp_path):
    store = tmp_path / "short.zarr"
    save(data, checkpoint, store, 1)
    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    save_file(timm.create_model(TEACHER, num_classes=10).state_dict(), str(other))
    teacher = {"source": f"store:{store}", "fallback": f"timm:{TEACHER}", "checkpoint": str(other)}
    recipe = write_recipe(tmp_path / "r.yaml", student(data, tmp_path / "run", store, epochs=2) | {"teacher": teacher})
    proc = run_cli("distill-train", [str(recipe)], data["root"])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "its weights_sha256 is" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    with open_store(store, read_only=True) as opened:
        assert opened.manifest.epochs == 1


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        ({"source": "store:x", "record": {"path": "r", "k": 3}}, r"teacher\.record: records a live teacher"),
        ({"source": "timm:test_vit", "fallback": "timm:test_vit"}, r"teacher\.fallback: .* must be store:PATH"),
        ({"source": "timm:test_vit", "record": {"path": "r"}}, r"teacher\.record\.k: missing required field"),
    ],
)
def test_record_and_fallback_keys_are_checked_with_the_recipe(data, teacher, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(base_recipe(data, "u", method="tinyvit", teacher=teacher))


def test_recording_into_a_store_of_another_teacher_is_refused_and_one_of_fewer_epochs_grows(data, checkpoint, tmp_path):
    """`teacher.record` names an existing store: another teacher's is one line naming the field, left as it was;
    the same teacher's store of 1 epoch is resumed and grown to the run's 2, equal to a 2-epoch save."""
    theirs, ours, saved = tmp_path / "theirs.zarr", tmp_path / "ours.zarr", tmp_path / "saved.zarr"
    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    save_file(timm.create_model(TEACHER, num_classes=10).state_dict(), str(other))
    save(data, other, theirs, 1)
    before = hashes(theirs)
    recipe = write_recipe(tmp_path / "r.yaml", recording(data, checkpoint, tmp_path / "refused", theirs))
    proc = run_cli("distill-train", [str(recipe)], data["root"])
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "teacher.weights_sha256" in proc.stderr, proc.stderr
    assert hashes(theirs) == before
    save(data, checkpoint, ours, 1, "basic", "--batch-size", "24")  # the recording's manifest says the run's batch
    run_recipe(recording(data, checkpoint, tmp_path / "grown", ours))
    save(data, checkpoint, saved, 2)
    assert hashes(ours) == hashes(saved) and set(hashes(ours)) == {"0", "1"}
