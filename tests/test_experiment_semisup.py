"""tools/demo_semisup.py, the semi-supervised and ensemble experiment (docs/experiments): its bookkeeping with
training stubbed, its refusals, and (marked `experiment`, run with `--experiments`) its first part end to end."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_helpers import ROOT, env_for

from distill.data_digits import prepare_digits
from logit_store import open_store

TEACHERS = ("resnet18", "resnet26", "resnet34")  # the ensemble members of tools/demo_semisup.py


@pytest.mark.experiment
def test_semi_supervised_demo_uses_the_ten_percent_labels_only(tmp_path):
    """tools/demo_semisup.py's first part at one epoch: the teacher learns from the labelled 10% alone, its store
    covers every training image, and the four students are reported per seed."""
    out = tmp_path / "semisup"
    args = ["--out", str(out), "--parts", "semi", "--seeds", "0", "--semi-epochs", "1", "--teacher-epochs", "1"]
    proc = subprocess.run(
        [sys.executable, "tools/demo_semisup.py", *args],
        cwd=ROOT,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split(",") for line in (out / "semi" / "partial.csv").read_text().splitlines()[1:]]
    labelled = [r for r in rows if r[1]]
    assert len(rows) == 1437 and len(labelled) == 143  # 10% of each class, rounded per class
    assert (out / "semi" / "labelled.csv").read_text().splitlines()[1:] == [",".join(r) for r in labelled]
    members = {m: yaml.safe_load((out / "semi" / f"teacher_{m}" / "recipe.yaml").read_text()) for m in TEACHERS}
    for i, (name, recipe) in enumerate(members.items()):  # every member learns from the 10% alone, with its seed
        assert recipe["student"]["model"] == name and recipe["data"]["train"] == f"csv:{out / 'semi' / 'labelled.csv'}"
        assert recipe["seed"] == i
    semi = json.loads((out / "results.json").read_text())["semi"]
    tops = {m: json.loads((out / "semi" / f"teacher_{m}" / "summary.json").read_text())["top1"] for m in TEACHERS}
    best = semi["best_member"]
    assert tops[best] == max(tops.values()) and semi["teacher_top1"] == tops[best]
    teacher = members[best]
    manifest = open_store(out / "semi" / f"store_{best}_0.zarr").manifest
    assert manifest.num_samples == 1437 and manifest.teacher["spec"] == f"timm:{best}"
    for student in ("resnet10t", "vit"):  # (b) and (c) read the best member's store
        for run in ("b_0", "c_0"):
            recipe = yaml.safe_load((out / "semi" / student / run / "recipe.yaml").read_text())
            assert recipe["teacher"]["source"] == f"store:{out / 'semi' / f'store_{best}_0.zarr'}"
    ensemble = open_store(out / "semi" / "store_ensemble_0.zarr").manifest
    assert ensemble.num_samples == 1437 and [m["spec"] for m in ensemble.teacher["members"]] == [
        f"timm:{m}" for m in TEACHERS
    ]
    for student in ("resnet10t", "vit"):  # (b') and (c') read the ensemble's store
        for run in ("b_ensemble_0", "c_ensemble_0"):
            recipe = yaml.safe_load((out / "semi" / student / run / "recipe.yaml").read_text())
            assert recipe["teacher"]["source"] == f"store:{out / 'semi' / 'store_ensemble_0.zarr'}"
    vit = yaml.safe_load((out / "semi" / "vit" / "a_0" / "recipe.yaml").read_text())["student"]
    assert vit["model"] == "deit_tiny_patch16_224"  # a plain ViT: 4 px patches of the 32 px digits
    assert vit["kwargs"] == {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}
    # the views suited to digits, read from the file: no flip, RandAugment
    views = yaml.safe_load((ROOT / "recipes" / "configs" / "digits_augment.yaml").read_text())
    assert teacher["augmentation"] == "recipes/configs/digits_augment.yaml"
    assert manifest.augmentation["recipe"]["hflip"] == views["hflip"] == 0
    assert manifest.augmentation["recipe"]["auto_augment"] == views["auto_augment"]
    assert semi["labelled_images"] == 143
    keys = (
        "a_labels_10pct",
        "b_kd",
        "c_kd_labels_10pct",
        "b_kd_ensemble",
        "c_kd_ensemble_labels_10pct",
        "d_all_labels",
    )
    for student in ("resnet10t", "vit"):
        assert all(len(semi[student][k]["values"]) == 1 and 0 <= semi[student][k]["mean"] <= 100 for k in keys)
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_semi_supervised_demo_refuses_an_unknown_student(tmp_path):
    args = ["--out", str(tmp_path / "semisup"), "--semi-students", "vit,convnet"]
    proc = subprocess.run([sys.executable, "tools/demo_semisup.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--semi-students: unknown convnet; expected any of resnet10t, vit" in proc.stderr
    assert not (tmp_path / "semisup").exists()


def load_demo_semisup():
    spec = importlib.util.spec_from_file_location("demo_semisup", ROOT / "tools" / "demo_semisup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_semi_rows_build_only_their_stores_and_pair_the_ensemble_with_its_member(tmp_path, monkeypatch, capsys):
    """--semi-rows b_kd,b_kd_ensemble over 4 seeds: a store of each teacher per seed, only the (b) runs, and the
    ensemble's gain over its member seed by seed (training and saving stubbed: the bookkeeping is tested)."""
    demo = load_demo_semisup()
    top1 = {"b": [97.0, 97.5, 96.9, 97.2], "b_ensemble": [97.5, 97.5, 97.8, 97.0]}
    members = {"resnet18": 95.0, "resnet26": 96.0, "resnet34": 95.5}
    runs, saved = [], []

    def train(out, recipe, sets):
        runs.append(out.name)
        if out.name.startswith("teacher_"):
            assert sets["seed"] == TEACHERS.index(sets["student.model"])  # member i trains with seed i
            return members[sets["student.model"]]
        name, _, seed = out.name.rpartition("_")
        return top1[name][int(seed)]

    def save(out, teacher, weights, data, epochs, seed, aug="basic"):
        saved.append((out.name, teacher.split(":")[0], weights is None))
        return out

    monkeypatch.setattr(demo, "train", train)
    monkeypatch.setattr(demo, "save", save)
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    argv = ["demo_semisup.py", "--out", str(tmp_path / "semisup"), "--parts", "semi", "--seeds", "0,1,2,3"]
    monkeypatch.setattr(sys, "argv", [*argv, "--semi-students", "resnet10t", "--semi-rows", "b_kd_ensemble,b_kd"])
    assert demo.main() == 0
    assert runs == [f"teacher_{m}" for m in TEACHERS] + [f"{r}_{s}" for s in range(4) for r in ("b", "b_ensemble")]
    stores = (("_resnet26", "timm", False), ("_ensemble", "ensemble", True))  # the best member's, the ensemble's
    assert saved == [(f"store{x}_{s}.zarr", t, w) for s in range(4) for x, t, w in stores]
    semi = json.loads((tmp_path / "semisup" / "results.json").read_text())["semi"]["resnet10t"]
    assert list(semi) == ["b_kd", "b_kd_ensemble", "paired"]
    pair = semi["paired"]["b_kd_ensemble - b_kd"]
    diffs = [0.5, 0.0, 0.9, -0.2]
    mean = sum(diffs) / 4
    sem = (sum((d - mean) ** 2 for d in diffs) / 3) ** 0.5 / 2
    assert pair["diffs"] == pytest.approx(diffs) and (pair["over"], pair["equal"], pair["under"]) == (2, 1, 1)
    assert pair["mean"] == pytest.approx(mean) and pair["sem"] == pytest.approx(sem)
    assert f"{mean:+.2f} +- {sem:.2f}" in capsys.readouterr().out


def test_labelled_fraction_sets_the_splits_and_the_label_only_steps(tmp_path, monkeypatch):
    """--labelled 0.03: round(3%) of each class keeps its label (counted here from the digits folders), and the
    label-only student (a) gets round(1 / 0.03) = 33 times the epochs, as many steps as the store's students."""
    demo = load_demo_semisup()
    epochs = {}

    def train(out, recipe, sets):
        epochs[out.name] = sets["epochs"]
        return {"resnet18": 90.0}.get(sets["student.model"], 80.0)

    monkeypatch.setattr(demo, "train", train)
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "semisup"
    argv = ["demo_semisup.py", "--out", str(out), "--parts", "semi", "--seeds", "0", "--semi-epochs", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--labelled", "0.03", "--semi-students", "resnet10t",
                                      "--semi-rows", "a_labels_10pct,d_all_labels"])  # fmt: skip
    assert demo.main() == 0
    train_dir = prepare_digits(str(tmp_path / "cache")) / "train"
    per_class = {d.name: round(0.03 * len(list(d.iterdir()))) for d in train_dir.iterdir()}
    labels = [line.split(",")[1] for line in (out / "semi" / "labelled.csv").read_text().splitlines()[1:]]
    assert {c: labels.count(c) for c in per_class} == per_class and len(labels) == sum(per_class.values()) == 42
    assert epochs["a_0"] == 2 * 33 and epochs["d_0"] == 2


def test_disjoint_member_labels_give_each_teacher_its_own_third_of_the_labelled_images(tmp_path, monkeypatch):
    """--member-labels disjoint: teacher i learns from its own third of each class's labelled images (the three
    disjoint, together the labelled set), in --out/semi_disjoint; the students' labels stay the whole 10%."""
    demo = load_demo_semisup()
    data = {}

    def train(out, recipe, sets):
        data[out.name] = sets.get("data.train")
        return {"resnet18": 90.0}.get(sets["student.model"], 80.0)

    monkeypatch.setattr(demo, "train", train)
    monkeypatch.setattr(demo, "save", lambda out, *args, **kwargs: out)
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "semisup" / "semi_disjoint"
    monkeypatch.setattr(sys, "argv", ["demo_semisup.py", "--out", str(out.parent), "--parts", "semi", "--seeds", "0",
                                      "--member-labels", "disjoint", "--semi-students", "resnet10t",
                                      "--semi-rows", "a_labels_10pct,c_kd_labels_10pct"])  # fmt: skip
    assert demo.main() == 0

    def rows(spec):
        return [tuple(line.split(",")) for line in Path(spec.removeprefix("csv:")).read_text().splitlines()[1:]]

    labelled = rows(f"csv:{out / 'labelled.csv'}")
    thirds = [rows(data[f"teacher_{m}"]) for m in TEACHERS]
    assert sorted(r for third in thirds for r in third) == sorted(labelled)  # disjoint, and every labelled image
    train_dir = prepare_digits(str(tmp_path / "cache")) / "train"
    for folder in train_dir.iterdir():
        kept = round(0.1 * len(list(folder.iterdir())))
        counts = sorted(sum(1 for r in third if r[1] == folder.name) for third in thirds)
        assert counts[-1] - counts[0] <= 1 and sum(counts) == kept
    assert (data["a_0"], data["c_0"]) == (f"csv:{out / 'labelled.csv'}", f"csv:{out / 'partial.csv'}")
    assert not (out.parent / "semi").exists()
    assert json.loads((out.parent / "results.json").read_text())["semi"]["member_labels"] == "disjoint"


def test_a_labelled_fraction_other_than_the_out_folders_is_refused(tmp_path):
    """Finished runs in --out are read, not repeated: splits of another --labelled there would pass for these."""
    out = tmp_path / "semisup"
    held = out / "semi" / "partial.csv"
    held.parent.mkdir(parents=True)
    held.write_text("path,label\n/x/0.png,0\n")
    for fraction, message in (("0.05", f"--labelled 0.05: {held} holds other splits; choose another --out"),
                              ("1.5", "--labelled: expected a fraction in (0, 1), got 1.5")):  # fmt: skip
        args = ["--out", str(out), "--parts", "semi", "--labelled", fraction]
        proc = subprocess.run([sys.executable, "tools/demo_semisup.py", *args], cwd=ROOT, env=env_for(tmp_path),
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert held.read_text() == "path,label\n/x/0.png,0\n" and sorted(out.rglob("*")) == [held.parent, held]


def test_the_full_label_parts_pair_the_ensemble_with_its_member_and_the_losses_with_hinton(
    tmp_path, monkeypatch, capsys
):
    """--parts ensemble,losses over 3 seeds: the best member (by its validation top-1) and the ensemble each get
    a store and a student per seed, and the ensemble's gain over that member and each loss's over Hinton KD are
    taken seed by seed (stubbed runs)."""
    demo = load_demo_semisup()
    members = {"resnet18": 95.0, "resnet26": 94.0, "resnet34": 96.5}
    top1 = {"best_member_resnet34": [96.0, 97.0, 96.5], "ensemble_of_3": [96.5, 96.5, 97.5],
            "loss_hinton": [96.0, 97.0, 96.5], "loss_nkd": [97.0, 97.0, 96.0], "loss_dkd": [96.0, 96.0, 96.0],
            "loss_dist": [96.5, 97.5, 97.0]}  # fmt: skip

    def train(out, recipe, sets):
        if out.name.startswith("teacher_"):
            return members[sets["student.model"]]
        name, _, seed = out.name.rpartition("_")
        return top1[name][int(seed)]

    monkeypatch.setattr(demo, "train", train)
    monkeypatch.setattr(demo, "save", lambda out, *args, **kwargs: out)
    monkeypatch.setattr(sys, "argv", ["demo_semisup.py", "--out", str(tmp_path / "o"), "--parts", "ensemble,losses",
                                      "--seeds", "0,1,2"])  # fmt: skip
    assert demo.main() == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    ensemble = results["ensemble"]
    losses = results["losses"]["paired"]  # each loss against Hinton KD on the same seeds
    assert list(losses) == ["nkd - hinton", "dkd - hinton", "dist - hinton"]
    assert losses["nkd - hinton"]["diffs"] == pytest.approx([1.0, 0.0, -0.5])
    assert losses["dkd - hinton"]["diffs"] == pytest.approx([0.0, -1.0, -0.5])
    assert losses["dist - hinton"]["mean"] == pytest.approx(0.5)
    pair = ensemble["paired"]["ensemble_of_3 - best_member_resnet34"]
    assert pair["diffs"] == pytest.approx([0.5, -0.5, 1.0]) and (pair["over"], pair["under"]) == (2, 1)
    assert pair["mean"] == pytest.approx(1 / 3) and pair["sem"] == pytest.approx(0.763762615 / 3**0.5)
    assert "ensemble_of_3 - best_member_resnet34, seed by seed: +0.33 +- 0.44" in capsys.readouterr().out


def test_semi_supervised_demo_refuses_an_unknown_row(tmp_path):
    args = ["--out", str(tmp_path / "semisup"), "--semi-rows", "b_kd,e_more"]
    proc = subprocess.run([sys.executable, "tools/demo_semisup.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--semi-rows: unknown e_more; expected any of a_labels_10pct" in proc.stderr
    assert not (tmp_path / "semisup").exists()
