"""A timm user's first hour: a pretrained checkpoint with another head as a student's start, a ViT at another
input size than its name's, the teacher spec syntax where it is looked for, and no pretrained tag claimed by an
export trained from scratch."""

from __future__ import annotations

import json
import logging

import pytest
import timm
import torch
from safetensors.torch import save_file
from train_helpers import base_recipe, make_method, run_cli, small_digits, write_recipe

from distill.cli import parse_save_config
from distill.errors import RecipeError
from distill.export import CONFIG_FILE, export_model
from distill.recipe import StudentConfig, parse_recipe
from distill.views import EvalView
from teachers.checkpoint import CheckpointError, load_checkpoint

# ---- a checkpoint with another head ----------------------------------------------------------------------


def test_a_checkpoint_with_another_class_count_loads_all_but_the_classifier(tmp_path, caplog):
    torch.manual_seed(0)
    pretrained = timm.create_model("test_resnet", num_classes=10)  # a small ResNet: stands in for in1k weights
    save_file(pretrained.state_dict(), str(tmp_path / "ten.safetensors"))
    method = make_method("supervised", num_classes=3)
    cfg = StudentConfig(model="test_resnet", checkpoint=str(tmp_path / "ten.safetensors"))
    with caplog.at_level(logging.WARNING):
        student = method.build_student(cfg, 32, None)
    saved, loaded = pretrained.state_dict(), student.state_dict()
    assert student.num_classes == 3 and loaded["fc.weight"].shape == (3, saved["fc.weight"].shape[1])
    for key, tensor in loaded.items():
        if key not in ("fc.weight", "fc.bias"):
            assert torch.equal(tensor, saved[key]), key
    assert not torch.equal(loaded["fc.weight"], saved["fc.weight"][:3])  # newly initialised, not a slice
    (line,) = [r.getMessage() for r in caplog.records if "classifier" in r.getMessage()]
    assert "newly initialised" in line and "ten.safetensors" in line
    assert "fc.weight: checkpoint [10, " in line and "vs model [3, " in line and "fc.bias: checkpoint [10]" in line


def test_any_other_mismatch_is_still_refused_naming_it(tmp_path):
    state = timm.create_model("test_resnet", num_classes=10).state_dict()
    state["conv1.0.weight"] = torch.zeros(1, 3, 3, 3)  # another stem width: not a head to drop
    save_file(state, str(tmp_path / "other.safetensors"))
    model = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(CheckpointError, match=r"conv1\.0\.weight: checkpoint \[1, 3, 3, 3\]"):
        load_checkpoint(model, tmp_path / "other.safetensors", new_head=True)
    state = timm.create_model("test_resnet", num_classes=10).state_dict()
    save_file(state, str(tmp_path / "ten.safetensors"))
    with pytest.raises(CheckpointError, match=r"fc\.weight: checkpoint \[10, \d+\] vs model \[3, \d+\]"):
        load_checkpoint(model, tmp_path / "ten.safetensors")  # a teacher's checkpoint: its head must fit


# ---- a ViT at the data's size ----------------------------------------------------------------------------

TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}  # vit_tiny_patch16_224's code, a cheap shape


def test_a_vit_student_is_built_at_the_datas_size(tmp_path):
    method = make_method("supervised", num_classes=10)
    model = method.build_student(StudentConfig(model="vit_tiny_patch16_224", kwargs=TINY_VIT), 32, None)
    assert model.patch_embed.img_size == (32, 32) and model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    kept = method.build_student(StudentConfig("vit_tiny_patch16_224", TINY_VIT | {"img_size": 64}), 32, None)
    assert kept.patch_embed.img_size == (64, 64)  # the recipe's own img_size wins


def test_a_vit_student_trains_on_32_px_digits(tmp_path):
    """vit_tiny_patch16_224 (a tiny shape by kwargs) at 32 px, one step, started from a 224 px file with a
    1000-class head (its position embeddings resampled by timm, its head dropped, as for any pretrained file)."""
    data = small_digits(tmp_path, per_class_train=4, per_class_val=2)
    weights = str(tmp_path / "in1k.safetensors")
    save_file(timm.create_model("vit_tiny_patch16_224", **TINY_VIT).state_dict(), weights)
    kwargs = TINY_VIT | {"pretrained": True, "pretrained_cfg_overlay": {"file": weights}}
    student = {"model": "vit_tiny_patch16_224", "kwargs": kwargs}
    recipe = base_recipe(data, tmp_path / "run", epochs=1, batch_size=40, student=student, trackers=[])
    proc = run_cli("distill-train", [str(write_recipe(tmp_path / "r.yaml", recipe))], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs"] == 1 and "top1" in summary


# ---- the teacher spec syntax -------------------------------------------------------------------------------


def test_teacher_kwargs_in_a_recipe_points_at_the_spec_syntax():
    raw = base_recipe({"train": "digits", "val": "digits"}, "runs/x", method="tinyvit")
    raw["teacher"] = {"source": "timm:resnet18", "kwargs": {"pretrained": True}}
    with pytest.raises(RecipeError) as err:
        parse_recipe(raw)
    message = str(err.value)
    assert message.startswith("teacher.kwargs: not a key") and "timm:NAME?file=PATH&class_map=FILE" in message


@pytest.mark.parametrize("program", ["distill-train", "distill-save-logits", "distill-eval"])
def test_help_lists_the_teacher_specs(program, tmp_path):
    proc = run_cli(program, ["--help"], tmp_path)
    assert proc.returncode == 0
    for form in ("timm:NAME?file=PATH&class_map=FILE", "timm:NAME?KEY=VALUE", "module:pkg.mod:factory", "store:PATH"):
        assert form in proc.stdout, form


def test_save_logits_teacher_option_names_the_options(capsys):
    with pytest.raises(SystemExit):
        parse_save_config(["--help"])
    assert "timm:NAME[?file=PATH&class_map=FILE&KEY=VALUE]" in " ".join(capsys.readouterr().out.split())


# ---- config.json claims no weights the student never had ---------------------------------------------------

PREPROCESSING = ("mean", "std", "input_size", "crop_pct", "interpolation")


@pytest.mark.parametrize("pretrained", [False, True])
def test_config_json_names_a_pretrained_tag_only_for_a_student_that_started_from_it(tmp_path, pretrained):
    model = timm.create_model("resnet10t", num_classes=3)  # its pretrained_cfg: tag c3_in1k, hf_hub_id, url
    assert model.pretrained_cfg["tag"] == "c3_in1k"
    kwargs = {"pretrained": True} if pretrained else {}
    recipe = {"student": {"model": "resnet10t", "kwargs": kwargs}, "method": "supervised"}
    view = EvalView(32, 1.0, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    export_model(model, tmp_path, recipe, view, ["a", "b", "c"])
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == [0.25] * 3
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear" and set(PREPROCESSING) <= set(cfg)
    for key in ("hf_hub_id", "url", "file"):
        assert key not in cfg
    if pretrained:
        assert cfg["tag"] == "c3_in1k"
    else:
        assert not {"tag", "origin_url", "license", "paper_ids"} & set(cfg), cfg
    assert model.pretrained_cfg["tag"] == "c3_in1k"  # the model's own config untouched
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=False)
    assert loaded.num_classes == 3
