"""distill-train: recipe validation, outputs, store checks, 2-process runs, kill and resume."""

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import base_recipe, make_method, run_cli, small_digits, write_recipe

from distill.augment import load_augmentation
from distill.cli import train as main
from distill.data import create_dataset
from distill.loader import ReplayDataset, TrainBatchSampler, collate
from distill.plan import build_teacher
from distill.recipe import Recipe, RecipeError, apply_overrides, parse_recipe, parse_section
from distill.run import run_recipe
from distill.trainer import FAULT_AFTER_STEPS
from distill.views import ReplayAugment
from teachers import create_teacher

TEACHER = "test_convnext"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"root": root, **small_digits(root)}


@pytest.fixture(scope="module")
def teacher_run(data):
    """A supervised run of a tiny teacher: its outputs are checked below and it teaches the students."""
    out = data["root"] / "teacher"
    recipe = write_recipe(data["root"] / "teacher.yaml", base_recipe(data, out, epochs=6, student={"model": TEACHER}))
    proc = run_cli("distill-train", [str(recipe)], data["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, recipe, proc


@pytest.fixture(scope="module")
def store(data, teacher_run):
    out = data["root"] / "teacher.zarr"
    args = ["--teacher", f"timm:{TEACHER}", "--checkpoint", str(teacher_run[0] / "model.safetensors"),
            "--data", data["train"], "--out", str(out), "--epochs", "2", "--k", "3", "--aug", "basic",
            "--img-size", "32", "--batch-size", "32"]  # fmt: skip
    proc = run_cli("distill-save-logits", args, data["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ---- recipe validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"optimiser": {}}, r"optimiser: unknown key; expected one of \[.*'optimizer'"),
        ({"optimizer": {"lr": "fast"}}, r"optimizer\.lr: expected a number, got str 'fast'"),
        ({"optimizer": {"betas": [0.9, 0.99]}}, r"optimizer\.betas: unknown key"),
        ({"epochs": 2.5}, r"epochs: expected an integer, got float 2\.5"),
        ({"epochs": 0}, r"epochs: expected an integer >= 1, got 0"),
        ({"data": {"train": "digits"}}, r"data\.val: missing required field \(a string\)"),
        (
            {"mixed_precision": "fp8"},
            r"mixed_precision: expected one of \['no', 'fp16', 'bf16'\] or null, got str 'fp8'",
        ),
        ({"teacher": {"epochs": "loop"}}, r"teacher\.epochs: expected one of \['strict', 'cycle'\]"),
        ({"ema": {"decay": "high"}}, r"ema\.decay: expected a number, got str 'high'"),
        ({"student": "resnet18"}, r"student: expected a mapping, got str 'resnet18'"),
        ({"method": "tinyvt"}, r"method: unknown method 'tinyvt'; installed: .*supervised.*; did you mean 'tinyvit'"),
        ({"method": "tinyvit", "loss": {"temprature": 2}}, r"loss\.temprature: unknown key; expected one of"),
        ({"loss": {"label_smoothing": "a"}}, r"loss\.label_smoothing: expected a number"),
        ({"augmentation": "rand-everything"}, r"augmentation: 'rand-everything' is neither a preset"),
        ({"augmentation": {"hflip": 2}}, r"augmentation: hflip: expected a probability in \[0, 1\], got 2\.0"),
        ({"teacher": {"source": "timm:test_vit"}}, r"teacher\.source: method 'supervised' trains on labels only"),
        ({"method": "tinyvit"}, r"teacher\.source: method 'tinyvit' needs a teacher"),
        ({"then": [{"name": "ft", "epochs": 0}]}, r"then\[0\]\.epochs: expected an integer >= 1, got 0"),
        ({"then": [{"output_dir": "x"}]}, r"then\[0\]\.output_dir: set by the main recipe"),
    ],
)
def test_recipe_errors_name_the_key(data, tmp_path, change, message):
    recipe = base_recipe(data, tmp_path / "run") | change
    with pytest.raises(RecipeError, match=message):
        run_recipe(recipe)
    assert not (tmp_path / "run").exists()  # nothing written for a recipe that cannot run


def test_missing_top_level_field_and_cli_exit_code(data, tmp_path, capsys):
    recipe = base_recipe(data, tmp_path / "run")
    del recipe["batch_size"]
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main([str(path)]) == 2
    assert "batch_size: missing required field (an integer)" in capsys.readouterr().err


def test_set_overrides_parse_yaml_values():
    data = apply_overrides({"optimizer": {"lr": 0.1}}, ["optimizer.lr=3e-4", "ema=null", "student.model=resnet18"])
    assert data == {"optimizer": {"lr": 3e-4}, "ema": None, "student": {"model": "resnet18"}}
    with pytest.raises(RecipeError, match=r"optimizer\.lr is not a mapping"):
        apply_overrides(data, ["optimizer.lr.x=1"])
    with pytest.raises(RecipeError, match=r"expected KEY\.PATH=VALUE"):
        apply_overrides(data, ["epochs"])


def test_train_batches_are_the_same_for_any_process_count():
    one = [b for b in TrainBatchSampler(100, 16, epoch=3, view_epoch=3, seed=7, accum=2)]
    two = [list(TrainBatchSampler(100, 16, epoch=3, view_epoch=3, seed=7, rank=r, world=2, accum=2)) for r in range(2)]
    # optimizer step s: micro-batch a of the single process = rank 0's then rank 1's share
    # optimizer step s = micro-batches 2s and 2s + 1 on one process (8 ids each); on two, each process's 4
    assert len(one) == len(two[0]) == len(two[1]) == 12
    for m, batch in enumerate(one):
        assert len(batch) == 8 and batch == two[0][m] + two[1][m]
    flat_one = [i for b in one for i in b]
    flat_two = [i for m in range(len(two[0])) for r in range(2) for i in two[r][m]]
    assert sorted(flat_one) == sorted(flat_two) and len(set(flat_one)) == 96  # 6 steps of 16, last 4 dropped
    resumed = list(TrainBatchSampler(100, 16, epoch=3, view_epoch=3, seed=7, accum=2, start_step=2))
    assert resumed == one[4:]


# ---- a finished run's outputs ----------------------------------------------------------------------------


def test_run_writes_weights_summary_logs_and_plot(data, teacher_run):
    out, recipe_path, _ = teacher_run
    summary = json.loads((out / "summary.json").read_text())
    assert {"top1", "top5", "epochs", "images_per_s", "teacher_source"} <= set(summary)
    assert summary["epochs"] == 6 and summary["teacher_source"] == "none"
    assert 0 <= summary["top1"] <= summary["top5"] <= 100 and summary["images_per_s"] > 0
    assert summary["top1"] > 35  # 6 epochs on 160 digits beat chance (10%) by far
    rows = (out / "metrics.csv").read_text().splitlines()
    assert (
        rows[0] == "step,name,value" and any(",val/top1," in r for r in rows) and any(",train/loss," in r for r in rows)
    )
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "last"]  # no step_* left
    # the weights load as a teacher with --checkpoint and give the reported accuracy
    teacher = create_teacher(f"timm:{TEACHER}", 10, str(out / "model.safetensors"))
    assert teacher.weights_sha256
    # train.log counts epochs from 1 in its step lines as in its validation lines (as summary.json, the curves)
    log = (out / "train.log").read_text()
    step_epochs = {int(m) for m in re.findall(r"^epoch (\d+) step \d+:", log, re.MULTILINE)}
    val_epochs = [int(m) for m in re.findall(r"^epoch (\d+): val ", log, re.MULTILINE)]
    assert step_epochs == set(val_epochs) == set(range(1, 7)) and summary["best_epoch"] in val_epochs, log
    assert "  cpu threads: 1 per process (OMP_NUM_THREADS=1)" in log  # run_cli sets it
    # a finished run is done: the same command again says so, prints its summary line and changes no file
    before = files_hashed(out)
    again = run_cli("distill-train", [str(recipe_path)], data["root"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"already finished: {out} (summary.json)" in again.stdout
    assert json.loads(again.stdout.splitlines()[-1])["top1"] == round(summary["top1"], 4)
    assert files_hashed(out) == before
    # another recipe in its folder is refused, naming the key that differs
    other = write_recipe(data["root"] / "other.yaml", base_recipe(data, out, epochs=6, student={"model": TEACHER},
                                                                  seed=1))  # fmt: skip
    refused = run_cli("distill-train", [str(other)], data["root"])
    assert refused.returncode == 2 and "holds a finished run (summary.json) of another recipe (seed differs)" in (
        refused.stderr
    ), refused.stderr[-2000:]
    assert files_hashed(out) == before


def files_hashed(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


# ---- stores ----------------------------------------------------------------------------------------------


def _check(data, store, **changes):
    changes = {k.rstrip("_"): v for k, v in changes.items()}
    recipe = parse_section(
        Recipe, base_recipe(data, "unused", method="tinyvit", teacher={"source": f"store:{store}"}) | changes, ""
    )
    train_set = create_dataset(recipe.data.train)
    method = make_method("tinyvit")
    entry = load_augmentation(recipe.augmentation).manifest_entry()
    return build_teacher(recipe, method, train_set, entry, torch.device("cpu"))


def test_store_mismatch_is_refused_naming_the_field(data, store):
    assert _check(data, store).num_classes == 10
    with pytest.raises(RecipeError, match=r"store field augmentation\.hash .* \(differs in .*hflip"):
        _check(data, store, augmentation="none")
    with pytest.raises(RecipeError, match=r"store field global_seed is 0 but the recipe's seed .* gives 1"):
        _check(data, store, seed=1)
    with pytest.raises(RecipeError, match=r"store field dataset\.fingerprint"):
        _check(data, store, data_={"train": data["val"], "val": data["val"], "img_size": 32})
    with pytest.raises(
        RecipeError, match=r"epochs: 3 training epochs but the store .* holds 2; set teacher\.epochs: cycle"
    ):
        _check(data, store, epochs=3)
    _check(data, store, epochs=3, teacher={"source": f"store:{store}", "epochs": "cycle"})
    with pytest.raises(RecipeError, match=r"teacher\.source: method 'supervised' trains on labels only"):
        parse_recipe(base_recipe(data, "u", teacher={"source": f"store:{store}"}))


def test_training_views_replay_the_stored_ones(data, store, teacher_run):
    """The trainer's batch for (epoch, ids) is the view the store's teacher saw: live and stored agree."""
    recipe = parse_section(Recipe, base_recipe(data, "u", method="tinyvit"), "")
    train_set = create_dataset(recipe.data.train)
    views = ReplayDataset(train_set, ReplayAugment(load_augmentation(recipe.augmentation), 32, recipe.seed))
    stored = create_teacher(f"store:{store}", 10)
    live = create_teacher(f"timm:{TEACHER}", 10, str(teacher_run[0] / "model.safetensors"))
    for epoch in (0, 1):
        batch = collate([views[p] for p in next(iter(TrainBatchSampler(len(train_set), 32, epoch, epoch, 0)))])
        live_probs = torch.softmax(live.logits(batch["image"]), -1)
        top = live_probs.topk(3, dim=-1)
        stored_probs = stored.logits(batch["image"], epoch, batch["id"]).exp()
        assert torch.equal(stored_probs.topk(3, dim=-1).indices, top.indices)
        torch.testing.assert_close(stored_probs.gather(1, top.indices), top.values, atol=2e-3, rtol=2e-3)


def test_student_trains_from_the_store(data, store):
    out = data["root"] / "student"
    recipe = base_recipe(
        data, out, method="tinyvit", teacher={"source": f"store:{store}"}, student={"model": "test_vit2"}
    )
    proc = run_cli("distill-train", [str(write_recipe(data["root"] / "student.yaml", recipe))], data["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_source"] == f"store:{store}" and summary["student"] == "test_vit2"
    losses = [float(r.split(",")[2]) for r in (out / "metrics.csv").read_text().splitlines() if ",train/kd," in r]
    assert losses[-1] < losses[0]


def test_a_live_batchnorm_teacher_teaches_as_its_store_does(data, tmp_path):
    """The run scores a live teacher once before training (the curves' reference line); the teacher must then
    teach in eval mode, as distill-save-logits saved it: a BatchNorm teacher left in train mode would give
    targets from each batch's statistics. With every class stored (k = C) the two runs' first losses agree."""
    import timm
    from safetensors.torch import save_file

    from distill.cli import save_logits

    torch.manual_seed(0)
    checkpoint = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), str(checkpoint))
    store = tmp_path / "resnet.zarr"
    assert save_logits(["--teacher", "timm:test_resnet", "--checkpoint", str(checkpoint), "--data", data["train"],
                        "--out", str(store), "--epochs", "1", "--k", "10", "--aug", "basic", "--img-size", "32"]) == 0  # fmt: skip

    def first_losses(name: str, teacher: dict) -> list[float]:
        run_recipe(base_recipe(data, tmp_path / name, method="tinyvit", epochs=1, teacher=teacher))
        rows = (tmp_path / name / "metrics.csv").read_text().splitlines()
        return [float(r.split(",")[2]) for r in rows if ",train/kd," in r][:2]

    live = first_losses("live", {"source": "timm:test_resnet", "checkpoint": str(checkpoint)})
    stored = first_losses("store", {"source": f"store:{store}"})
    assert live == pytest.approx(stored, rel=2e-3)  # fp16 storage of the probabilities


def test_a_live_weighted_ensemble_is_scored_as_its_weighted_mean_softmax(data, teacher_run, tmp_path):
    """A run's teacher_top1 for a live `ensemble:` with weights is the top-1 of the members' weighted mean
    softmax on the evaluation views, computed here from the two timm models directly. The second member is
    made to favour class 0, so that equal weights would score otherwise (checked: the weights matter)."""
    import timm
    from safetensors.torch import save_file

    from distill.plan import eval_view

    trained = timm.create_model(TEACHER, num_classes=10)
    trained.load_state_dict(load_file(str(teacher_run[0] / "model.safetensors")))
    torch.manual_seed(0)
    biased = timm.create_model("test_resnet", num_classes=10)
    with torch.no_grad():
        biased.fc.bias[0] += 4.0
    save_file(biased.state_dict(), str(tmp_path / "biased.safetensors"))
    members = (f"timm:{TEACHER}@{teacher_run[0] / 'model.safetensors'}*0.8",
               f"timm:test_resnet@{tmp_path / 'biased.safetensors'}*0.2")  # fmt: skip
    spec = "ensemble:" + ",".join(members)
    recipe = base_recipe(data, tmp_path / "run", method="tinyvit", epochs=1, teacher={"source": spec})
    run_recipe(recipe)
    reported = json.loads((tmp_path / "run" / "summary.json").read_text())["teacher_top1"]

    parsed = parse_section(Recipe, recipe, "")
    views = ReplayDataset(create_dataset(parsed.data.val), eval_view(parsed, load_augmentation(parsed.augmentation)))
    items = [views[0, i] for i in range(len(views.images))]  # (epoch, id): the evaluation view is fixed
    images, labels = torch.stack([v["image"] for v in items]), torch.tensor([v["label"] for v in items])
    with torch.no_grad():
        probs = [torch.softmax(m.eval()(images), -1) for m in (trained, biased)]

    def top1(w: float) -> float:
        return 100 * ((w * probs[0] + (1 - w) * probs[1]).argmax(-1) == labels).float().mean().item()

    assert top1(0.8) != top1(0.5)
    assert reported == pytest.approx(top1(0.8))


def test_cli_refuses_a_store_saved_with_other_augmentation(data, store, tmp_path):
    recipe = base_recipe(data, tmp_path / "run", method="tinyvit", teacher={"source": f"store:{store}"})
    recipe["augmentation"] = "none"
    proc = run_cli("distill-train", [str(write_recipe(tmp_path / "r.yaml", recipe))], data["root"])
    assert proc.returncode == 2 and "store field augmentation.hash" in proc.stderr
    assert not (tmp_path / "run").exists()


# ---- processes, kill and resume --------------------------------------------------------------------------


def two_process_weights(data, out, **changes) -> dict[str, torch.Tensor]:
    recipe = write_recipe(out.with_suffix(".yaml"), base_recipe(data, out, **changes))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_cli("distill-train", [str(recipe)], data["root"], launcher=launcher, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["processes"] == 2 and proc.stdout.count('"method"') == 1
    return load_file(str(out / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_processes_train_like_one(data, tmp_path):
    """batch_size is global: 2 processes take the same steps as 1 (up to float reduction order)."""
    one = base_recipe(data, tmp_path / "one", epochs=1)
    assert run_cli("distill-train", [str(write_recipe(tmp_path / "one.yaml", one))], data["root"]).returncode == 0
    two = two_process_weights(data, tmp_path / "two", epochs=1)
    assert max_difference(load_file(str(tmp_path / "one" / "model.safetensors")), two) < 1e-4


@pytest.mark.slow
def test_a_batchnorm_student_on_two_processes_trains_like_one(tmp_path):
    """SyncBatchNorm (on by default with several processes) normalises by the whole batch's statistics, as one
    process does; `sync_bn: true` on one process gives the very same arithmetic (float64 statistics; plain
    float32 BatchNorm differs by its own rounding on near-constant channels). Two SGD steps on 40 digits: BatchNorm over the near-constant channels of digits turns float
    rounding (which differs with the process count) into visible changes over more steps, and Adam's first steps
    move every parameter by about lr whatever its gradient's size, so rounding noise on a near-zero gradient
    would show as an lr-sized difference."""
    data = {"root": tmp_path, **small_digits(tmp_path, per_class_train=4, per_class_val=2)}
    changes = {"epochs": 2, "student": {"model": "test_resnet"}, "optimizer": {"name": "sgd", "lr": 0.05}}
    one = write_recipe(tmp_path / "one.yaml", base_recipe(data, tmp_path / "one", sync_bn=True, **changes))
    assert run_cli("distill-train", [str(one)], data["root"]).returncode == 0
    single = load_file(str(tmp_path / "one" / "model.safetensors"))
    synced = two_process_weights(data, tmp_path / "synced", **changes)
    assert "SyncBatchNorm" in (tmp_path / "synced" / "train.log").read_text()
    per_process = two_process_weights(data, tmp_path / "per_process", sync_bn=False, **changes)
    assert max_difference(single, synced) < 1e-4 < 1e-3 < max_difference(single, per_process)


@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(data, tmp_path):
    changes = {
        "epochs": 3,
        "checkpoint_every": 1,
        "ema": {"decay": 0.9},
        "student": {"model": "test_vit", "kwargs": {"drop_path_rate": 0.2}},
    }
    reference = write_recipe(tmp_path / "ref.yaml", base_recipe(data, tmp_path / "ref", **changes))
    assert run_cli("distill-train", [str(reference)], data["root"]).returncode == 0
    killed = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "killed.yaml", base_recipe(data, killed, **changes))
    # killed by the trainer's fault hook right after step 7, mid epoch 2 (5 steps per epoch)
    proc = run_cli("distill-train", [str(recipe)], data["root"], env_extra={FAULT_AFTER_STEPS: "7"})
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (killed / "summary.json").exists() and (killed / "checkpoints" / "step_00000007").exists()
    resumed = run_cli("distill-train", [str(recipe)], data["root"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(r.split(",")[0]) for r in (killed / "metrics.csv").read_text().splitlines()[1:] if ",train/loss," in r]
    assert steps == sorted(set(steps)) == list(range(1, 16))  # no step logged twice after the resume
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(killed / "tensorboard")).Reload()  # every event file of the run's folder
    logged = sorted(e.step for e in scalars.Scalars("train/loss"))
    assert logged == list(range(1, 16))  # TensorBoard too: the killed process's steps past the checkpoint purged
    assert (
        json.loads((killed / "summary.json").read_text())["top1"]
        == json.loads((tmp_path / "ref" / "summary.json").read_text())["top1"]
    )


def test_precision_follows_the_launcher_unless_the_recipe_sets_it(data, tmp_path):
    """accelerate launch --mixed_precision bf16 sets ACCELERATE_MIXED_PRECISION: a recipe silent on precision
    follows it; a recipe that sets it wins; the run says which it used."""
    silent = write_recipe(tmp_path / "silent.yaml", base_recipe(data, tmp_path / "silent", epochs=1))
    proc = run_cli("distill-train", [str(silent)], data["root"], env_extra={"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "precision bf16 (from the launcher)" in (tmp_path / "silent" / "train.log").read_text()
    loud = write_recipe(tmp_path / "loud.yaml", base_recipe(data, tmp_path / "loud", epochs=1, mixed_precision="no"))
    proc = run_cli("distill-train", [str(loud)], data["root"], env_extra={"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "precision no (from the recipe)" in (tmp_path / "loud" / "train.log").read_text()


def test_a_finished_run_keeps_its_last_and_best_state_and_is_extended_by_more_epochs(data, tmp_path):
    out = tmp_path / "run"
    first = run_recipe(base_recipe(data, out, epochs=1))[0]
    last, best = out / "checkpoints" / "last", out / "checkpoints" / "best"
    final = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(final[k], v) for k, v in load_file(str(last / "model.safetensors")).items())
    assert torch.load(best / "state.pt", weights_only=True)["train"]["best_top1"] == first["best_top1"] == first["top1"]
    with pytest.raises(RecipeError, match="holds a finished run"):
        run_recipe(base_recipe(data, out, epochs=1, optimizer={"lr": 0.001}))  # another recipe: refused
    extended = run_recipe(base_recipe(data, out, epochs=3))[0]
    assert extended["epochs"] == 3 and extended["steps"] == 3 * first["steps"]
    assert json.loads((out / "summary.epochs_1.json").read_text()) == json.loads(json.dumps(first))
    assert "extending from" in (out / "train.log").read_text()
    steps = [int(r.split(",")[0]) for r in (out / "metrics.csv").read_text().splitlines()[1:] if ",train/loss," in r]
    assert steps == list(range(1, 3 * first["steps"] + 1))  # the first epoch's rows kept, none twice
    tops = [float(r.split(",")[2]) for r in (out / "metrics.csv").read_text().splitlines()[1:] if ",val/top1," in r]
    assert extended["best_top1"] == max(tops) and len(tops) == 3


def test_an_extension_stopped_before_its_first_checkpoint_leaves_the_finished_run_whole(data, tmp_path, monkeypatch):
    """Until an extension has a checkpoint of its own, the folder is the finished run's, byte for byte (its
    recipe, summary, weights, last and best): stopped there, the same extension starts again from `last`."""
    from distill.trainer import Trainer

    out = tmp_path / "run"
    first = run_recipe(base_recipe(data, out, epochs=1))[0]
    kept = {k: v for k, v in files_hashed(out).items() if not k.startswith(("tensorboard", "metrics", "train.log"))}

    def interrupted(self, batch):
        raise KeyboardInterrupt  # Ctrl-C in the extension's first step

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(base_recipe(data, out, epochs=2))
    now = files_hashed(out)
    assert {k: now.get(k) for k in kept} == kept and "summary.epochs_1.json" not in now
    extended = run_recipe(base_recipe(data, out, epochs=2))[0]
    assert extended["epochs"] == 2 and extended["steps"] == 2 * first["steps"]
    assert json.loads((out / "summary.epochs_1.json").read_text()) == json.loads(json.dumps(first))


def test_a_store_of_unlabelled_images_teaches_a_student(data, teacher_run, tmp_path):
    """A teacher needs no labels: a store over unlabelled images (a partly labelled CSV here) has agreement
    statistics over its labelled images only, and a student learns from it, evaluated on labelled data.val."""
    import csv

    import numpy as np

    from logit_store import open_store

    images = sorted(Path(data["train"]).rglob("*.png"))
    rows = [(str(p), p.parent.name if i % 4 == 0 else "") for i, p in enumerate(images)]  # a quarter labelled
    with open(tmp_path / "part.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    spec, store = f"csv:{tmp_path / 'part.csv'}", tmp_path / "part.zarr"
    args = ["--teacher", f"timm:{TEACHER}", "--checkpoint", str(teacher_run[0] / "model.safetensors"),
            "--data", spec, "--out", str(store), "--epochs", "1", "--k", "3", "--aug", "basic",
            "--img-size", "32", "--batch-size", "32"]  # fmt: skip
    assert run_cli("distill-save-logits", args, data["root"]).returncode == 0
    opened = open_store(store)
    top1 = opened.read(0, np.arange(len(rows))).indices[:, 0].astype(int)
    labelled = [(i, int(label)) for i, (_, label) in enumerate(rows) if label]
    expected = sum(top1[i] == label for i, label in labelled) / len(labelled)
    assert opened.info()["statistics"]["teacher_top1_agreement"] == pytest.approx(expected)
    recipe = base_recipe(data, tmp_path / "student", method="tinyvit", epochs=1, teacher={"source": f"store:{store}"},
                         data__train=spec, loss={"label_weight": 0.5})  # fmt: skip
    summary = run_recipe(recipe)[0]
    assert summary["steps"] == len(rows) // 32 and 0 <= summary["top1"] <= 100
    rows_logged = (tmp_path / "student" / "metrics.csv").read_text()
    assert ",train/label," in rows_logged and ",train/kd," in rows_logged
