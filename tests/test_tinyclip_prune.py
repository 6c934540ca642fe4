"""Automatic inheritance through the trainer: MaskedCLIP, tinyclip's loss.prune, pruned outputs, stage chains."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2
from train_helpers import make_method, run_cli

import distill.trainer
from distill.augment import PRESETS
from distill.data import create_dataset
from distill.data_digits import DIGIT_NAMES, digit_caption, prepare_digits
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


# One thread for this module's runs and checks. The pruned student's zero-shot scores of the ten digits are close
# together after its short run, and with 2 threads the run's evaluation and the same evaluation recomputed from its
# saved weights rank 2 of 60 images differently (1 thread: none).
pytestmark = pytest.mark.usefixtures("single_thread")


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
    """A tinyclip mask-learning run: 2 epochs of 5 steps, the teacher's masks learnt while it mimics itself (masks
    and multipliers at rate 1, 50 times the reference's, to reach the target in 10 steps rather than thousands)."""
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
            "prune": {"target_sparsity": 0.3, "ramp_steps": 0, "mask_lr": 1.0, "lagrangian_lr": 1.0} | prune,
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


def test_masked_clip_is_the_plain_model_at_eval_and_keeps_its_masks_out_of_the_trainers_optimizer():
    torch.manual_seed(0)
    model = open_clip.create_model("TinyCLIP-test")
    plain = copy.deepcopy(model).eval()
    masked = MaskedCLIP(model, CLIPPruningMasks(model), SparsityLagrangian(0.5, ramp_steps=4), "TinyCLIP-test")
    images, texts = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 16))

    masked.eval()  # log_alpha 10: every gate open, final masks sigmoid(12) ~ 1 - 6e-6: the plain model
    image, text, _, sparsity = masked(image=images, text=texts)
    close = {"atol": 1e-4, "rtol": 1e-3}  # gates of 1 - 6e-6, not 1
    torch.testing.assert_close(text, plain.encode_text(texts, normalize=True), **close)
    torch.testing.assert_close(image, plain.encode_image(images, normalize=True), **close)
    torch.testing.assert_close(masked.encode_text(texts), plain.encode_text(texts), **close)
    assert masked.step.item() == 0 and sparsity["target_sparsity"].item() == 0.0

    # The trainer's optimizer gets the CLIP weights only; the masks and multipliers have their own (constant
    # rates, ascent on the multipliers), which advances the ramp.
    method = make_method("tinyclip", {"prune": {"target_sparsity": 0.5, "ramp_steps": 4}})
    trained = {id(p) for g in create_optimizer_v2(method.optimized_module(masked), opt="adamw").param_groups
               for p in g["params"]}  # fmt: skip
    assert trained == {id(p) for p in model.parameters()}
    groups = masked.mask_optimizer(0.02, 0.02).param_groups
    assert [(g["lr"], g["maximize"], g["weight_decay"]) for g in groups] == [(0.02, False, 0.0), (0.02, True, 0.0)]
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in masked.parameters()} - trained
    masked.after_mask_step()
    assert masked.step.item() == 1 and masked(image=images, text=texts)[-1]["target_sparsity"].item() == 0.125
    twin = copy.deepcopy(masked).eval()  # EMA copies it
    torch.testing.assert_close(twin.encode_image(images), masked.encode_image(images))


@pytest.mark.parametrize(
    ("prune", "message"),
    [
        ({"target_sparsity": 1.0}, r"loss\.prune\.target_sparsity: expected a fraction in \[0, 1\)"),
        ({"target_sparsity": 0.5, "ramp_steps": -1}, r"loss\.prune\.ramp_steps: expected an integer >= 0"),
        ({"ramp_steps": 10}, r"loss\.prune\.target_sparsity: missing required field"),
        ({"target_sparsity": 0.5, "steps": 0}, r"loss\.prune\.steps: expected an integer >= 1 or null"),
        ({"target_sparsity": 0.5, "steps": 500}, r"loss\.prune\.ramp_steps: 1000 steps of ramp do not fit"),
        ({"target_sparsity": 0.5, "mask_lr": 0}, r"loss\.prune\.mask_lr: expected a number > 0"),
        ({"target_sparsity": 0.5, "lagrangian_lr": -0.02}, r"loss\.prune\.lagrangian_lr: expected a number > 0"),
        ({"target_sparsity": 0.5, "towers": ["audio"]}, r"loss\.prune\.towers: expected distinct"),
        ({"target_sparsity": 0.5, "lr": 1}, r"loss\.prune\.lr: unknown key"),
    ],
)
def test_bad_prune_config_names_the_field(prune, message):
    with pytest.raises(RecipeError, match=message):
        make_method("tinyclip", {"prune": prune})


def test_prune_defaults_are_the_references():
    cfg = make_method("tinyclip", {"prune": {"target_sparsity": 0.25}}).cfg
    assert cfg.gather_with_grad is True and cfg.affinity_scale == 50.0 and cfg.alpha == 1.0
    prune = cfg.prune
    assert (prune.ramp_steps, prune.steps, prune.mask_lr, prune.lagrangian_lr) == (1000, None, 0.02, 0.02)
    assert (prune.init_log_alpha, prune.init_lambda, prune.towers) == (10.0, 10.0, ["image", "text"])


# ---- through the trainer ---------------------------------------------------------------------------------


def test_training_moves_the_masks_toward_the_target(pruned_run):
    out, summary = pruned_run
    expected, target = metric(out, "train/sparsity_expected"), metric(out, "train/sparsity_target")
    assert len(expected) == 10 and target == pytest.approx([0.3] * 10)
    # From ~0 (log_alpha 10) up toward the target 0.3 (past it, at times: the one-sided penalty never pulls back).
    assert expected[0] < 0.01 and expected == sorted(expected) and expected[-1] > 0.2
    state = load_file(str(out / "model.safetensors"))
    assert state["step"].item() == 10
    assert state["lagrangian.lambda_1"] > 10 and state["lagrangian.lambda_2"] > 10  # ascent while short
    assert metric(out, "train/lambda_1")[-1] == pytest.approx(state["lagrangian.lambda_1"].item())
    assert all(-4.61 < v < 4.61 for k, v in state.items() if k.startswith("masks.") for v in v.tolist())
    # The final-mask rule realises the sparsity the masks were trained to.
    assert summary["pruned_sparsity"] == pytest.approx(summary["expected_sparsity"], abs=0.03)
    assert summary["pruned_params"] < summary["params"]


def test_finish_writes_a_pruned_student_that_computes_what_the_masked_model_computes(data, pruned_run):
    out, summary = pruned_run
    spec = json.loads((out / "pruned_model.json").read_text())
    assert spec["tokenizer"] == TEACHER and summary["pruned_model"] == str(out / "pruned_model.json")
    pruned, tokenizer = create_clip_student(StudentConfig(str(out / "pruned_model.json")))
    load_checkpoint(pruned, str(out / "pruned_model.safetensors"))  # strict
    assert sum(p.numel() for p in pruned.parameters()) == summary["pruned_params"]

    # The masked model, as training left it (masks attached to the teacher, the run's weights loaded).
    method = make_method("tinyclip", stage_recipe(data, out)["loss"])
    masked = method.build_student(StudentConfig(TEACHER, checkpoint=data["teacher"]), 32, None)
    masked.load_state_dict(load_file(str(out / "model.safetensors")))
    image, text = masked.masks.towers["image"], masked.masks.towers["text"]
    assert tower_param_counts(pruned) == (image.pruned_param_count(), text.pruned_param_count())
    assert summary["pruned_tower_params"] == list(tower_param_counts(pruned))
    # The sparsity counts the blocks' attention and MLP layers (the teacher's: what stage 1 starts from).
    teacher = create_clip_student(StudentConfig(TEACHER))[0]
    kept, full = (
        sum(p.numel() for n, p in m.named_parameters() if "resblocks." in n and (".attn." in n or ".mlp." in n))
        for m in (pruned, teacher)
    )
    assert kept / full == pytest.approx(1 - summary["pruned_sparsity"])

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
    step_checkpoint = distill.trainer.Trainer.checkpoint  # the step checkpoints (not checkpoints/best)

    class Stop(Exception):
        pass

    def checkpoint_then_stop(trainer):
        step_checkpoint(trainer)
        raise Stop  # stands in for the process dying right after the checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(distill.trainer.Trainer, "checkpoint", checkpoint_then_stop)
        with pytest.raises(Stop):
            run_recipe(stage_recipe(data, out))
    checkpoint = load_file(str(out / "checkpoints" / "step_00000005" / "model.safetensors"))
    assert checkpoint["step"].item() == 5 and checkpoint["lagrangian.lambda_2"] != 10
    run_recipe(stage_recipe(data, out))
    reference, resumed = load_file(str(pruned_run[0] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert reference.keys() == resumed.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=key)


# ---- stages chained ----------------------------------------------------------------------------------------


def chain_recipe(data: dict, out: Path) -> dict:
    """Two stages as the reference runs them: each learns masks for its prune steps (4: one epoch over 128 of the
    160 samples, the weights' rate warming up), is pruned, and the pruned model is distilled for the rest of the
    stage (here one epoch) with a fresh optimizer and a cosine schedule from the full rate: main run -> distil_1
    -> stage_2 -> distil_2."""
    masks = stage_recipe(data, out, target_sparsity=0.25, steps=4, mask_lr=2.0)
    masks |= {"epochs": 1, "schedule": {"name": "cosine", "warmup_epochs": 1, "warmup_lr": 0.0}}
    stage_2 = {"name": "stage_2", "loss": copy.deepcopy(masks["loss"])}
    stage_2["loss"]["prune"]["target_sparsity"] = 1 / 3
    distil = {"epochs": 1, "schedule": {"name": "cosine"}, "loss": {"zero_shot": {"class_names": list(DIGIT_NAMES)}}}
    return masks | {"then": [{"name": "distil_1"} | distil, stage_2, {"name": "distil_2"} | distil]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"then.1.loss.prune.target_sparsity": 1.5}, r"then\[1\]\.loss\.prune\.target_sparsity: expected a fraction"),
        ({"then.1.loss.prune.ramp_steps": -2}, r"then\[1\]\.loss\.prune\.ramp_steps: expected an integer >= 0"),
        ({"then.2.output_dir": "x"}, r"then\[2\]\.output_dir: set by the main recipe"),
        ({"then.2.name": "stage_2"}, r"then\[2\]\.name: expected a distinct folder name"),
        ({"then.2.epochs": 0}, r"then\[2\]\.epochs: expected an integer >= 1"),
        ({"then.2.student": {"size": 3}}, r"then\[2\]\.student: expected a mapping of student fields"),
        ({"epochs": 2}, r"^epochs: loss\.prune\.steps makes the run 4 steps long, one epoch over a subset"),
        ({"then.1.loss.prune.steps": 6}, r"then\.stage_2: loss\.prune\.steps: 6 steps of 32 need 192 samples"),
        ({"mixed_precision": "fp16"}, r"mixed_precision: fp16 is not supported with loss\.prune"),
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


def student_of(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "recipe.yaml").read_text())["student"]


def test_a_stage_learns_masks_for_its_steps_prunes_then_distils_with_a_fresh_schedule(data, tmp_path, monkeypatch):
    out = tmp_path / "chain"
    masks_1, distil_1, masks_2, distil_2 = run_recipe(chain_recipe(data, out))

    # 1. Masks for the prune steps only: 4 steps of the 5 an epoch of data.train has, every one with the target.
    assert masks_1["steps"] == 4 and len(metric(out, "train/sparsity_target")) == 4
    assert masks_1["pruned_sparsity"] > 0.1
    # 2. Pruned at the prune step: the stage's result is the pruned model, which the distillation trains.
    assert student_of(out / "distil_1") == {
        "model": str(out / "pruned_model.json"), "kwargs": {}, "checkpoint": str(out / "pruned_model.safetensors")
    }  # fmt: skip
    assert distil_1["params"] == masks_1["pruned_params"]
    # 3. Distilled with a fresh optimizer and schedule, over all of data.train, without masks: the rate starts
    # again from the full 1e-4 and follows a cosine over the run's 5 steps (logged after each step).
    assert distil_1["steps"] == 5 and metric(out / "distil_1", "train/sparsity_target") == []
    cosine = [0.5e-4 * (1 + math.cos(math.pi * k / 5)) for k in range(1, 6)]
    assert metric(out / "distil_1", "train/lr") == pytest.approx(cosine)
    # 4. The next stage learns masks on the distilled model (not on the pruned weights before distillation).
    assert student_of(out / "stage_2") == {
        "model": str(out / "pruned_model.json"), "kwargs": {},
        "checkpoint": str(out / "distil_1" / "model.safetensors"),
    }  # fmt: skip
    assert masks_2["tower_params"] == masks_1["pruned_tower_params"]
    assert sum(masks_2["pruned_tower_params"]) < sum(masks_1["pruned_tower_params"]) < sum(masks_1["tower_params"])
    assert student_of(out / "distil_2")["model"] == str(out / "stage_2" / "pruned_model.json")
    assert distil_2["params"] == masks_2["pruned_params"]

    # A re-run finds every run finished and trains nothing; another recipe in the same folder is refused.
    monkeypatch.setattr(distill.trainer.Trainer, "fit", lambda self: pytest.fail(f"re-trained {self.plan.out}"))
    again = run_recipe(chain_recipe(data, out))  # done: each run's summary.json, as it is
    assert [s["params"] for s in again] == [s["params"] for s in (masks_1, distil_1, masks_2, distil_2)]
    changed = chain_recipe(data, out)
    changed["then"][1]["loss"]["prune"]["target_sparsity"] = 0.4
    with pytest.raises(RecipeError, match=r"then\.stage_2: output_dir .* holds a finished run"):
        run_recipe(changed)


def test_distill_eval_scores_a_masked_run_as_the_run_did(data, pruned_run):
    """distill-eval rebuilds the masked CLIP student (masks included) and reports the run's zero-shot top-1."""
    out, summary = pruned_run
    proc = run_cli("distill-eval", [str(out)], data["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["top1"] == pytest.approx(summary["top1"], abs=1e-3)
