"""TinyCLIP through the toolkit: embeddings stores, open_clip teachers, the clip/tinyclip methods and zero-shot eval.

One random (seeded) TinyCLIP-test-teacher checkpoint and one 1-epoch embeddings store of digits-captions are
shared by the module; the slow test at the end runs the whole digits pipeline with a teacher the toolkit trains.
"""

import json
import logging
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from train_helpers import ROOT, env_for, make_method

from distill.augment import PRESETS, load_augmentation
from distill.cli import save_logits as save_main
from distill.data import create_dataset
from distill.data_digits import DIGIT_NAMES
from distill.evaluate import zero_shot_classifier
from distill.loader import ReplayDataset, collate
from distill.recipe import RecipeError, StudentConfig
from distill.run import run_recipe
from distill.save import run as save_run
from distill.save_config import SaveConfig
from distill.views import ReplayAugment
from logit_store import open_store
from teachers import TeacherError, create_teacher
from teachers.clip_teacher import OpenCLIPTeacher

logging.getLogger().setLevel(logging.ERROR)
TEACHER = "TinyCLIP-test-teacher"
ZERO_SHOT = {"class_names": DIGIT_NAMES, "templates": ["a photo of the number {}"]}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    teacher = open_clip.create_model(TEACHER)
    checkpoint = root / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(checkpoint))
    store = root / "teacher.zarr"
    cfg = SaveConfig(
        teacher=f"open_clip:{TEACHER}", checkpoint=str(checkpoint), data="digits-captions", out=str(store),
        epochs=1, aug="basic", img_size=32, batch_size=128,
    )  # fmt: skip
    save_run(cfg)
    return {"root": root, "checkpoint": str(checkpoint), "store": str(store)}


def tinyclip_student(**loss):
    method = make_method("tinyclip", {"zero_shot": ZERO_SHOT} | loss)
    torch.manual_seed(1)
    return method, method.build_student(StudentConfig(model="TinyCLIP-test"), 32, None)


def batch_of(method, ids, epoch=0):
    data = ReplayDataset(create_dataset("digits-captions", "train"), ReplayAugment(PRESETS["basic"], 32, 0),
                         method.tokenizer)  # fmt: skip
    return collate([data[(epoch, i)] for i in ids])


# -- the store ---------------------------------------------------------------------------------------------------


def test_embeddings_store_holds_what_the_live_teacher_computes(env):
    store = open_store(env["store"])
    m = store.manifest
    assert (m.kind, m.embed_dim, m.k, m.num_classes, m.epochs) == ("embeddings", 32, 0, 0, 1)
    assert store.verify() == [] and store.pending_shards(store.text_plane) == []
    live = create_teacher(f"open_clip:{TEACHER}", checkpoint=env["checkpoint"])
    assert isinstance(live, OpenCLIPTeacher) and m.teacher["weights_sha256"] == live.weights_sha256
    ids = np.array([5, 900, 17, 1400, 333])
    method, _ = tinyclip_student()
    batch = batch_of(method, ids)
    stored = store.read(0, ids).embedding.astype(np.float32)
    assert np.abs(stored - live.image_embeddings(batch["image"]).numpy()).max() < 2e-3
    stored_text = store.read_text(ids).embedding.astype(np.float32)
    assert np.abs(stored_text - live.text_embeddings(batch["text"]).numpy()).max() < 2e-3
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1, atol=2e-3)
    assert not np.allclose(stored[0], stored[1])  # different views, different embeddings


@pytest.mark.parametrize("batch_size", [48, 7])
def test_affinity_loss_from_the_store_equals_the_live_teachers(env, batch_size):
    method, student = tinyclip_student(alpha=0.5)
    ids = np.random.default_rng(batch_size).choice(1437, batch_size, replace=False)
    batch = batch_of(method, ids)
    live = create_teacher(f"open_clip:{TEACHER}", checkpoint=env["checkpoint"])
    stored = create_teacher(f"store:{env['store']}")
    assert stored.store is not None and stored.outputs == "embeddings"
    from_live, from_store = method.loss(student, batch, live), method.loss(student, batch, stored)
    for name in ("loss", "affinity", "contrastive"):
        assert from_store[name].item() == pytest.approx(from_live[name].item(), rel=2e-3), name
    assert from_live["affinity"].item() > 0.1  # an untrained student is far from the teacher
    from_store["loss"].backward()
    assert all(p.grad is not None for p in student.visual.parameters() if p.requires_grad)


def test_training_steps_from_the_store_match_the_live_teacher(env, tmp_path):
    def run(name, source, checkpoint=None):
        recipe = {
            "method": "tinyclip", "student": {"model": "TinyCLIP-test"},
            "teacher": {"source": source, "checkpoint": checkpoint},
            "data": {"train": "digits-captions", "val": "digits-captions", "img_size": 32},
            "augmentation": "basic", "epochs": 1, "batch_size": 64, "log_every": 1,
            "optimizer": {"name": "adamw", "lr": 0.001}, "loss": {"zero_shot": ZERO_SHOT},
            "output_dir": str(tmp_path / name),
        }  # fmt: skip
        summary = run_recipe(recipe)[0]
        rows = [line.split(",") for line in (tmp_path / name / "metrics.csv").read_text().splitlines()[1:]]
        return summary, [float(v) for _, n, v in rows if n == "train/affinity"]

    live, live_losses = run("live", f"open_clip:{TEACHER}", env["checkpoint"])
    stored, store_losses = run("store", f"store:{env['store']}")
    assert stored["teacher_source"] == f"store:{env['store']}" and live["teacher_source"].startswith("live:open_clip")
    assert len(store_losses) == len(live_losses) == 22
    np.testing.assert_allclose(store_losses[:5], live_losses[:5], rtol=5e-3)  # fp16 embeddings, then chaos grows
    assert store_losses[-1] < store_losses[0]
    assert 0 <= stored["top1"] <= 100 and stored["top5"] >= stored["top1"]


# -- save CLI and recipe errors ------------------------------------------------------------------------------------


def test_save_cli_refuses_what_an_embeddings_store_cannot_hold(env, tmp_path, capsys):
    base = ["--teacher", f"open_clip:{TEACHER}", "--epochs", "1", "--img-size", "32"]
    cases = [
        (["--data", "digits-captions", "--k", "5"], "--k: teacher open_clip:TinyCLIP-test-teacher gives embeddings"),
        (["--data", "digits"], "--data digits: a CLIP teacher needs image-caption data"),
        (["--data", "digits-captions", "--aug", "tinyvit-mix"], "--aug tinyvit-mix: mixes images"),
    ]
    for i, (extra, message) in enumerate(cases):
        assert save_main([*base, "--out", str(tmp_path / f"s{i}"), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / f"s{i}").exists()
    assert (
        save_main(["--teacher", "timm:test_vit", "--data", "digits", "--out", str(tmp_path / "l"), "--epochs", "1"])
        == 2
    )
    assert "--k: teacher timm:test_vit gives logits" in capsys.readouterr().err


def test_tinyclip_recipe_errors_name_the_field(env, tmp_path):
    base = {
        "method": "tinyclip", "student": {"model": "TinyCLIP-test"},
        "data": {"train": "digits-captions", "val": "digits-captions", "img_size": 32},
        "epochs": 1, "batch_size": 64, "output_dir": str(tmp_path / "out"),
    }  # fmt: skip
    cases = [
        (
            {"teacher": {"source": "timm:test_vit"}},
            "teacher.source: method 'tinyclip' learns from a teacher's embeddings; timm:test_vit gives logits",
        ),
        (
            {"teacher": {"source": "open_clip:TinyCLIP-ViT-8M-16-Text-3M"}},
            "student.model: its context length 16 differs from the live teacher's 77",
        ),
        (
            {"teacher": {"source": f"store:{env['store']}"}, "data": {**base["data"], "train": "digits"}},
            "store field dataset.fingerprint",
        ),
        ({"teacher": {"source": f"store:{env['store']}"}, "epochs": 2}, "epochs: 2 training epochs but the store"),
        ({"teacher": {"source": f"store:{env['store']}"}, "student": {"model": "TinyCLIP-nope"}}, "student.model"),
        (
            {
                "teacher": {"source": f"store:{env['store']}"},
                "loss": {"inherit": {"model": TEACHER, "checkpoint": "x.pt"}},
            },
            "loss.inherit: checkpoint x.pt does not exist",
        ),
        ({"teacher": {"source": f"store:{env['store']}"}, "loss": {"alpha": "high"}}, "loss.alpha"),
    ]
    for change, message in cases:
        with pytest.raises((RecipeError, TeacherError), match=message.replace("(", r"\(").replace(".", r"\.")):
            run_recipe(base | change)
        assert not (tmp_path / "out").exists()


def test_clip_method_needs_captions(tmp_path):
    recipe = {
        "method": "clip", "student": {"model": "TinyCLIP-test"},
        "data": {"train": "digits", "val": "digits", "img_size": 32}, "epochs": 1, "batch_size": 64,
        "output_dir": str(tmp_path / "out"),
    }  # fmt: skip
    with pytest.raises(RecipeError, match=r"data\.train: method 'clip' trains on captions; digits has none"):
        run_recipe(recipe)


# -- inheritance and zero-shot -------------------------------------------------------------------------------------


def test_recipe_inheritance_copies_the_teachers_leading_slices(env):
    _, student = tinyclip_student(inherit={"model": TEACHER, "checkpoint": env["checkpoint"]})
    teacher = create_teacher(f"open_clip:{TEACHER}", checkpoint=env["checkpoint"]).model
    s, t = student.state_dict(), teacher.state_dict()
    # 2 of 4 layers at stride 2: student layer 1 is teacher layer 2; widths 32 of 64.
    key = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    torch.testing.assert_close(s[key], t[key.replace("resblocks.1", "resblocks.2")][: s[key].shape[0], :32])
    torch.testing.assert_close(s["token_embedding.weight"], t["token_embedding.weight"][:, :32])


def test_zero_shot_evaluation_matches_a_direct_computation():
    method, student = tinyclip_student()
    val = create_dataset("digits-captions", "val")
    plain = ReplayAugment(load_augmentation("none"), 32, 0)
    metrics = method.evaluate(student, ReplayDataset(val, plain), 64, Accelerator(cpu=True))
    with torch.no_grad():
        classifier = zero_shot_classifier(student, method.tokenizer, DIGIT_NAMES, ZERO_SHOT["templates"])
        batch = collate([ReplayDataset(val, plain)[(0, i)] for i in range(len(val))])
        scores = student.encode_image(batch["image"], normalize=True) @ classifier
    top1 = 100 * (scores.argmax(1) == batch["label"]).float().mean().item()
    assert metrics["top1"] == pytest.approx(top1) and metrics["top5"] >= metrics["top1"]
    assert student.training  # evaluation hands the model back in training mode


# -- end to end ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tinyclip_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    args = ["--out", str(out), "--teacher-epochs", "4", "--epochs", "3"]
    proc = subprocess.run(
        [sys.executable, "tools/demo_tinyclip.py", *args], cwd=ROOT, env=env_for(tmp_path), capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "demo_results.json").read_text())
    by_name = {r["name"]: r for r in results["runs"]}
    assert list(by_name) == ["teacher", "student_store", "student_inherited", "student_live"]
    assert by_name["teacher"]["top1"] > 50  # zero-shot on 10 classes: chance is 10
    assert by_name["student_store"]["teacher_source"] == f"store:{out / 'teacher.zarr'}"
    assert by_name["student_live"]["teacher_source"] == f"live:open_clip:{TEACHER}"
    assert open_store(out / "teacher.zarr").verify() == []
    assert "zero-shot top-1" in proc.stdout and (out / "demo_results.png").read_bytes()[:4] == b"\x89PNG"
