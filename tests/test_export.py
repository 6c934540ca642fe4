"""A finished run's weights as timm users keep them (metadata, config.json) and `distill-eval`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from timm.data import create_transform, resolve_data_config
from train_helpers import base_recipe, run_cli, small_digits, write_recipe

MODEL = "test_convnext"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A supervised run evaluated through a real centre crop (0.875, bicubic), not the whole image."""
    root = tmp_path_factory.mktemp("export")
    data = small_digits(root)
    out = root / "run"
    crop = {"crop_pct": 0.875, "interpolation": "bicubic"}
    recipe = base_recipe(data, out, epochs=3, student={"model": MODEL}, eval=crop)
    proc = run_cli("distill-train", [str(write_recipe(root / "r.yaml", recipe))], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "out": out, "data": data, "summary": json.loads((out / "summary.json").read_text())}


def timm_top1(model: torch.nn.Module, folder: str) -> float:
    """Top-1 (%) over an image folder with nothing but timm and PIL: timm's own eval transform of the model."""
    transform = create_transform(**resolve_data_config(model=model))
    classes = sorted(p.name for p in Path(folder).iterdir())
    images = [(p, i) for i, c in enumerate(classes) for p in sorted((Path(folder) / c).iterdir())]
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in images])
    with torch.no_grad():
        predicted = model.eval()(batch).argmax(1)
    return 100.0 * int((predicted == torch.tensor([i for _, i in images])).sum()) / len(images)


def test_timm_rebuilds_the_student_and_its_evaluation_from_the_run_folder(run):
    model = timm.create_model(f"local-dir:{run['out']}", pretrained=True)
    config = resolve_data_config(model=model)
    assert config["crop_pct"] == 0.875 and config["interpolation"] == "bicubic" and config["input_size"] == (3, 32, 32)
    assert json.loads((run["out"] / "config.json").read_text())["label_names"] == [str(d) for d in range(10)]
    assert timm_top1(model, run["data"]["val"]) == pytest.approx(run["summary"]["top1"], abs=1e-6)


def test_weights_carry_their_metadata(run):
    with safe_open(str(run["out"] / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["architecture"]) == MODEL and json.loads(meta["num_classes"]) == 10
    assert json.loads(meta["input_size"]) == [3, 32, 32] and json.loads(meta["crop_pct"]) == 0.875
    assert json.loads(meta["interpolation"]) == "bicubic" and json.loads(meta["method"]) == "supervised"
    assert json.loads(meta["distill.recipe"])["student"]["model"] == MODEL


def evaluate(run, *args):
    proc = run_cli("distill-eval", [str(a) for a in args], run["root"])
    return proc, (json.loads(proc.stdout.splitlines()[-1]) if proc.returncode == 0 else None)


def test_distill_eval_reproduces_the_runs_figures(run):
    out, summary = run["out"], run["summary"]
    _, result = evaluate(run, out)
    assert result["top1"] == pytest.approx(summary["top1"], abs=1e-3) and result["images"] == 60
    _, best = evaluate(run, out / "checkpoints" / "best" / "model.safetensors")
    assert best["top1"] == pytest.approx(summary["best_top1"], abs=1e-3)
    moved = run["root"] / "elsewhere.safetensors"  # no recipe.yaml beside it: the metadata's recipe
    shutil.copy(out / "model.safetensors", moved)
    _, alone = evaluate(run, moved, "--data", run["data"]["val"])
    assert alone["top1"] == result["top1"]
    # the run's weights as a live teacher are scored on the same views: the same figures
    _, both = evaluate(run, out, "--teacher", f"timm:{MODEL}", "--teacher-checkpoint", out / "model.safetensors")
    assert both["teacher_top1"] == both["top1"] and both["teacher_top5"] == both["top5"]
    # an ensemble is a live teacher too: the mean of two equal distributions is that distribution
    ckpt = out / "model.safetensors"
    _, pair = evaluate(run, out, "--teacher", f"ensemble:timm:{MODEL}@{ckpt},timm:{MODEL}@{ckpt}")
    assert pair["teacher_top1"] == both["top1"] and pair["teacher_top5"] == both["top5"]


def test_distill_eval_input_errors_are_one_line(run, tmp_path):
    three = tmp_path / "three"
    for c in "abc":
        (three / c).mkdir(parents=True)
        shutil.copy(next((run["out"].parent / "small" / "val" / "0").iterdir()), three / c / "x.png")
    for args, message in [
        ([run["out"], "--data", three], "has 3 classes, the student outputs 10"),
        ([tmp_path / "nothing"], "nothing does not exist (expected a run folder or a run's .safetensors weights)"),
        ([run["out"], "--batch-size", "0"], "--batch-size must be >= 1"),
    ]:
        proc, _ = evaluate(run, *args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
