"""The command-line tools as a user meets them: help, messages that point the way, pipes."""

from __future__ import annotations

import subprocess
from dataclasses import MISSING, fields

import pytest
from store_helpers import manifest, write_epoch
from train_helpers import SCRIPTS, base_recipe, make_method

from distill.recipe import RecipeError, StudentConfig
from distill.save_config import SaveConfig
from logit_store import create_store


def test_save_help_lists_every_option_with_its_meaning_and_default():
    out = subprocess.run([str(SCRIPTS / "distill-save-logits"), "--help"], capture_output=True, text=True).stdout
    text = " ".join(out.split())  # argparse wraps lines
    for f in fields(SaveConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "the teacher's input size (default: 224)" in text and "zarr or lmdb (default: zarr)" in text
    for f in fields(SaveConfig):  # each option says its default, or that it is required
        meaning = " ".join(f.metadata["help"].split())
        if f.default is MISSING:
            assert meaning + " (required" in text, f.name
        else:
            assert "(default: " in meaning and meaning in text, f.name


def test_store_info_into_a_closed_pipe_exits_quietly(tmp_path):
    store = create_store(tmp_path / "s.zarr", manifest())
    write_epoch(store, 0)
    proc = subprocess.run(f"{SCRIPTS / 'distill-store'} info {tmp_path / 's.zarr'} | head -1", shell=True,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("store") and proc.stderr == ""


def test_an_unknown_student_suggests_timm_names():
    with pytest.raises(RecipeError, match=r"student\.model: Unknown model \(resnt18\); did you mean resnet18"):
        make_method("supervised").build_student(StudentConfig("resnt18"), 32, None)


def test_an_unknown_tracker_is_named(tmp_path):
    from distill.recipe import parse_recipe

    recipe = base_recipe({"train": "a", "val": "b"}, tmp_path, trackers=["tensorboard", "wandbb"])
    with pytest.raises(RecipeError, match=r"trackers: unknown \['wandbb'\]; accelerate's are"):
        parse_recipe(recipe)


def test_save_from_a_training_recipe_takes_its_data_views_size_seed_and_store(tmp_path):
    from train_helpers import write_recipe

    from distill.cli import parse_save_config

    recipe = base_recipe({"train": "digits", "val": "digits"}, tmp_path / "run", method="tinyvit", epochs=3,
                         seed=5, teacher={"source": f"store:{tmp_path / 't.zarr'}"},
                         augmentation={"hflip": 0.0, "scale": [0.5, 1.0]})  # fmt: skip
    path = write_recipe(tmp_path / "student.yaml", recipe)
    cfg = parse_save_config(["--from-recipe", str(path), "--teacher", "timm:test_vit", "--k", "3"])
    assert (cfg.data, cfg.img_size, cfg.seed, cfg.epochs, cfg.out) == ("digits", 32, 5, 3, str(tmp_path / "t.zarr"))
    assert cfg.aug == {"hflip": 0.0, "scale": [0.5, 1.0]}
    with pytest.raises(SystemExit):
        parse_save_config(["--from-recipe", str(path), "--teacher", "timm:test_vit", "--k", "3", "--img-size", "64"])
