"""Automatic inheritance through the trainer: MaskedCLIP, tinyclip's loss.prune, pruned outputs, stage chains."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import open_clip
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2
from train_helpers import make_method

import distill.trainer
from distill.augment import PRESETS
from distill.data import DIGIT_NAMES, create_dataset, digit_caption, prepare_digits
from distill.evaluate import zero_shot_accuracy
from distill.loader import ReplayDataset
from distill.recipe import RecipeError, StudentConfig
from distill.run import run_recipe
from distill.views import ReplayAugment
from recipes.tinyclip.masks import CLIPPruningMasks, MaskedCLIP, SparsityLagrangian
from recipes.tinyclip.method import create_clip_student
from students.tinyclip import tower_param_counts
from teachers.checkpoint import load_checkpoint

TEACHER = "TinyCLIP-test-teacher"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Caption pairs of digits (all, 16 or 6 per class) and a TEACHER trained on them: 77% zero-shot, in 12 s."""
    root = tmp_path_factory.mktemp("prune")
    source = prepare_digits(str(root / "cache"))
    files = {}
    for name, split, n in (("teacher", "train", None), ("train", "train", 16), ("val", "val", 6)):
        rows = [("path", "caption", "label")]
        for class_dir in sorted((source / split).iterdir()):
            label = int(class_dir.name)
            rows += [(str(png), digit_caption(label), label) for png in sorted(class_dir.iterdir())[:n]]
        with open(root / f"{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
        files[name] = f"pairs:{root / f'{name}.csv'}"
    [teacher] = run_recipe({
        "method": "clip", "student": {"model": TEACHER}, "output_dir": str(root / "teacher"),
        "data": {"train": files["teacher"], "val": files["val"], "img_size": 32}, "augmentation": "none",
        "epochs": 4, "batch_size": 64, "schedule": {"name": "cosine", "warmup_epochs": 1}, "log_every": 10,
        "loss": {"zero_shot": {"class_names": list(DIGIT_NAMES)}},
    })  # fmt: skip
    assert teacher["top1"] > 50
    return files | {"root": root, "teacher": str(root / "teacher" / "model.safetensors")}


def stage_recipe(data: dict, out: Path, **prune) -> dict:
    """A tinyclip pruning run: 2 epochs of 5 steps, the teacher pruned while mimicking itself (masks and
    multipliers at 1 / step, to prune in 10 steps; the zero-shot accuracy falls from 77% to ~27% on the way)."""
    return {
        "method": "tinyclip",
        "student": {"model": TEACHER, "checkpoint": data["teacher"]},
        "teacher": {"source": f"open_clip:{TEACHER}", "checkpoint": data["teacher"]},
        "data": {"train": data["train"], "val": data["val"], "img_size": 32},
        "augmentation": "none",
        "epochs": 2,
        "batch_size": 32,
        "optimizer": {"name": "adamw", "lr": 0.0001},
        "schedule": {"name": "cosine", "min_lr": 0.0001},  # constant
        "log_every": 1,
        "output_dir": str(out),
        "loss": {
            "prune": {"target_sparsity": 0.3, "ramp_steps": 0, "mask_lr_scale": 10000.0,
                      "lagrangian_lr_scale": 10000.0, "init_drop": 0.05} | prune,
            "zero_shot": {"class_names": list(DIGIT_NAMES)},
        },
    }  # fmt: skip


def metric(out: Path, name: str) -> list[float]:
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    return [float(r.split(",")[2]) for r in rows if r.split(",")[1] == name]


@pytest.fixture(scope="module")
def pruned_run(data):
    out = data["root"] / "run"
    return out, run_recipe(stage_recipe(data, out))[0]


# ---- MaskedCLIP on its own -------------------------------------------------------------------------------


def test_masked_clip_penalty_ascends_on_the_multipliers_and_counts_steps():
    torch.manual_seed(0)
    model = open_clip.create_model("TinyCLIP-test")
    plain = copy.deepcopy(model).eval()
    masks = CLIPPruningMasks(model, init_drop=0.01, lr_scale=10.0)
    masked = MaskedCLIP(model, masks, SparsityLagrangian(0.5, ramp_steps=4, lr_scale=10.0), "TinyCLIP-test")
    images, texts = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 16))

    masked.eval()  # deterministic masks at 1: the plain model; no step counted
    image, text, _, sparsity = masked(image=images, text=texts)
    torch.testing.assert_close(text, plain.encode_text(texts, normalize=True))
    torch.testing.assert_close(image, plain.encode_image(images, normalize=True))
    torch.testing.assert_close(masked.encode_text(texts), plain.encode_text(texts))
    assert masked.step.item() == 0 and sparsity["target_sparsity"].item() == 0.0

    masked.train()
    optimizer = torch.optim.SGD(masked.parameters(), lr=1.0)
    for step in range(3):
        sparsity = masked(image=images, text=texts)[-1]
        assert sparsity["target_sparsity"].item() == pytest.approx(0.5 * step / 4)
        optimizer.zero_grad()
        sparsity["penalty"].backward()  # minimised: the multipliers must still *ascend*
        optimizer.step()
    assert masked.step.item() == 3
    assert masked.lagrangian.lambda_1 < 0 < masked.lagrangian.lambda_2  # ascent on lambda_1 gap, gap < 0

    # One optimizer over everything: the masks and multipliers are out of weight decay; EMA can copy it.
    groups = create_optimizer_v2(masked, opt="adamw", lr=1e-3, weight_decay=0.05).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    assert not decayed & {id(p) for p in [*masks.parameters(), *masked.lagrangian.parameters()]}
    assert id(masked.model.positional_embedding) not in decayed
    twin = copy.deepcopy(masked).eval()
    masked.eval()
    torch.testing.assert_close(twin.encode_image(images), masked.encode_image(images))


@pytest.mark.parametrize(
    ("prune", "message"),
    [
        ({"target_sparsity": 1.0, "ramp_steps": 0}, r"loss\.prune\.target_sparsity: expected a fraction in \[0, 1\)"),
        ({"target_sparsity": 0.5, "ramp_steps": -1}, r"loss\.prune\.ramp_steps: expected an integer >= 0"),
        ({"target_sparsity": 0.5}, r"loss\.prune\.ramp_steps: missing required field"),
        ({"target_sparsity": 0.5, "ramp_steps": 0, "mask_lr_scale": 0}, r"loss\.prune\.mask_lr_scale: expected"),
        ({"target_sparsity": 0.5, "ramp_steps": 0, "init_drop": 1}, r"loss\.prune\.init_drop: expected a fraction"),
        ({"target_sparsity": 0.5, "ramp_steps": 0, "towers": ["audio"]}, r"loss\.prune\.towers: expected distinct"),
        ({"target_sparsity": 0.5, "ramp_steps": 0, "lr": 1}, r"loss\.prune\.lr: unknown key"),
    ],
)
def test_bad_prune_config_names_the_field(prune, message):
    with pytest.raises(RecipeError, match=message):
        make_method("tinyclip", {"prune": prune})


# ---- through the trainer ---------------------------------------------------------------------------------


def test_training_moves_the_masks_toward_the_target(pruned_run):
    out, summary = pruned_run
    expected, target = metric(out, "train/sparsity_expected"), metric(out, "train/sparsity_target")
    assert len(expected) == 10 and target == pytest.approx([0.3] * 10)
    assert expected[0] < 0.03 and 0.2 < expected[-1] < 0.4  # from ~0.02 (init_drop 0.05) to the target 0.3
    state = load_file(str(out / "model.safetensors"))
    assert state["step"].item() == 10
    assert state["lagrangian.lambda_1"] < 0 < state["lagrangian.lambda_2"]  # ascent: gap < 0 throughout
    assert summary["pruned_sparsity"] > 0.05 and summary["pruned_params"] < summary["params"]


def test_finish_writes_a_pruned_student_that_computes_what_the_masked_model_computes(data, pruned_run):
    out, summary = pruned_run
    spec = json.loads((out / "pruned_model.json").read_text())
    assert spec["tokenizer"] == TEACHER and summary["pruned_model"] == str(out / "pruned_model.json")
    pruned, tokenizer = create_clip_student(StudentConfig(str(out / "pruned_model.json")))
    load_checkpoint(pruned, str(out / "pruned_model.safetensors"))  # strict
    assert sum(p.numel() for p in pruned.parameters()) == summary["pruned_params"]

    # The masked model, as training left it (masks attached to the teacher, the run's weights loaded).
    method = make_method("tinyclip", stage_recipe(data, out)["loss"])
    masked = method.build_student(StudentConfig(TEACHER, checkpoint=data["teacher"]), 32)
    masked.load_state_dict(load_file(str(out / "model.safetensors")))
    image, text = masked.masks.towers["image"], masked.masks.towers["text"]
    assert tower_param_counts(pruned) == (image.pruned_param_count(), text.pruned_param_count())
    assert summary["pruned_tower_params"] == list(tower_param_counts(pruned))
    kept = sum(summary["pruned_tower_params"]) / sum(summary["tower_params"])
    assert kept == pytest.approx(1 - summary["pruned_sparsity"])

    masked.eval()
    pruned.eval()
    val = create_dataset(data["val"], "val")
    views = ReplayDataset(val, ReplayAugment(PRESETS["none"], 32, 0))
    images = torch.stack([views[(0, i)]["image"] for i in range(len(val))])
    texts = open_clip.get_tokenizer(tokenizer)([digit_caption(i) for i in range(10)])
    with torch.no_grad():
        torch.testing.assert_close(pruned.encode_image(images), masked.encode_image(images), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(pruned.encode_text(texts), masked.encode_text(texts), atol=1e-5, rtol=1e-4)
    accuracy = zero_shot_accuracy(
        pruned, views, 64, Accelerator(cpu=True), method.tokenizer, list(DIGIT_NAMES), ["a photo of the number {}"]
    )
    assert accuracy["top1"] == summary["top1"]  # the run's last evaluation: the masked model in eval mode


def test_resume_restores_masks_multipliers_and_the_ramp(data, pruned_run, monkeypatch):
    """Interrupted after epoch 1 and resumed from its checkpoint, the run ends where the uninterrupted one does."""
    out = data["root"] / "resumed"
    save = distill.trainer.save_checkpoint

    class Stop(Exception):
        pass

    def save_then_stop(trainer, step=None):
        save(trainer, step)
        if step is not None:  # the step checkpoint, not checkpoints/best
            raise Stop  # stands in for the process dying right after the checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(distill.trainer, "save_checkpoint", save_then_stop)
        with pytest.raises(Stop):
            run_recipe(stage_recipe(data, out))
    checkpoint = load_file(str(out / "checkpoints" / "step_00000005" / "model.safetensors"))
    assert checkpoint["step"].item() == 5 and checkpoint["lagrangian.lambda_2"] != 0
    run_recipe(stage_recipe(data, out))
    reference, resumed = load_file(str(pruned_run[0] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert reference.keys() == resumed.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=key)


# ---- stages chained ----------------------------------------------------------------------------------------


def chain_recipe(data: dict, out: Path) -> dict:
    """Stage 1 prunes the teacher to 75%, stage 2 (`then`) a third of what is left, then a final distillation."""
    stage_2 = {"name": "stage_2", "loss": copy.deepcopy(stage_recipe(data, out)["loss"])}
    stage_2["loss"]["prune"]["target_sparsity"] = 1 / 3
    final = {"name": "final", "epochs": 1, "loss": {"zero_shot": {"class_names": list(DIGIT_NAMES)}}}
    return stage_recipe(data, out, target_sparsity=0.25) | {"then": [stage_2, final]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"then.0.loss.prune.target_sparsity": 1.5}, r"then\[0\]\.loss\.prune\.target_sparsity: expected a fraction"),
        ({"then.0.loss.prune.ramp_steps": -2}, r"then\[0\]\.loss\.prune\.ramp_steps: expected an integer >= 0"),
        ({"then.1.output_dir": "x"}, r"then\[1\]\.output_dir: set by the main recipe"),
        ({"then.1.name": "stage_2"}, r"then\[1\]\.name: expected a distinct folder name"),
        ({"then.1.epochs": 0}, r"then\[1\]\.epochs: expected an integer >= 1"),
        ({"then.1.student": {"size": 3}}, r"then\[1\]\.student: expected a mapping of student fields"),
    ],
)
def test_chain_recipe_errors_name_the_key(data, tmp_path, change, message):
    raw = chain_recipe(data, tmp_path / "chain")
    [(key, value)] = change.items()
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[leaf] = value
    with pytest.raises(RecipeError, match=message):
        run_recipe(raw)
    assert not (tmp_path / "chain").exists()  # refused before anything ran


def test_two_stages_and_a_final_run_end_to_end_and_a_rerun_skips_finished_runs(data, tmp_path, monkeypatch):
    out = tmp_path / "chain"
    first, second, final = run_recipe(chain_recipe(data, out))
    assert (first["pruned_sparsity"] > 0.1) and (second["pruned_sparsity"] > 0.1)
    assert sum(second["pruned_tower_params"]) < sum(first["pruned_tower_params"]) < sum(first["tower_params"])
    assert second["tower_params"] == first["pruned_tower_params"]  # stage 2 starts from stage 1's pruned model
    assert final["params"] == second["pruned_params"]  # the final run trains stage 2's pruned model
    for run_dir, student in (
        (out / "stage_2", out / "pruned_model"),
        (out / "final", out / "stage_2" / "pruned_model"),
    ):
        assert f"model: {student}.json" in (run_dir / "recipe.yaml").read_text()
    assert (out / "final" / "model.safetensors").exists()

    # A re-run finds every run finished and trains nothing; another recipe in the same folder is refused.
    monkeypatch.setattr(distill.trainer.Trainer, "fit", lambda self: pytest.fail(f"re-trained {self.plan.out}"))
    with pytest.raises(RecipeError, match="holds a finished run"):
        run_recipe(chain_recipe(data, out))
    changed = chain_recipe(data, out)
    changed["then"][0]["loss"]["prune"]["target_sparsity"] = 0.4
    with pytest.raises(RecipeError, match=r"then\.stage_2: output_dir .* holds a finished run"):
        run_recipe(changed)
