"""The command-line tools as a user meets them: help, messages that point the way, pipes."""

from __future__ import annotations

import subprocess
from dataclasses import fields

import pytest
from store_helpers import manifest, write_epoch
from train_helpers import SCRIPTS, base_recipe, make_method

from distill.cli import SaveConfig
from distill.recipe import RecipeError, StudentConfig
from logit_store import create_store


def test_save_help_lists_every_option_with_its_meaning_and_default():
    out = subprocess.run([str(SCRIPTS / "distill-save-logits"), "--help"], capture_output=True, text=True).stdout
    text = " ".join(out.split())  # argparse wraps lines
    for f in fields(SaveConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "the teacher's input size (default: 224)" in text and "zarr or lmdb (default: zarr)" in text


def test_store_info_into_a_closed_pipe_exits_quietly(tmp_path):
    store = create_store(tmp_path / "s.zarr", manifest())
    write_epoch(store, 0)
    proc = subprocess.run(f"{SCRIPTS / 'distill-store'} info {tmp_path / 's.zarr'} | head -1", shell=True,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("store") and proc.stderr == ""


def test_an_unknown_student_suggests_timm_names():
    with pytest.raises(RecipeError, match=r"student\.model: Unknown model \(resnt18\); did you mean resnet18"):
        make_method("supervised").build_student(StudentConfig("resnt18"), 32)


def test_an_unknown_tracker_is_named(tmp_path):
    from distill.recipe import parse_recipe

    recipe = base_recipe({"train": "a", "val": "b"}, tmp_path, trackers=["tensorboard", "wandbb"])
    with pytest.raises(RecipeError, match=r"trackers: unknown \['wandbb'\]; accelerate's are"):
        parse_recipe(recipe)
