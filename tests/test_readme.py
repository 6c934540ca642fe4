"""The README: the front door within ~200 lines, its walkthrough run as pasted, its method commands real recipes.
(Every fenced snippet of the README and docs/ is run or marked: tests/test_doc_snippets.py.)"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
from train_helpers import ROOT

from distill.recipe import load_recipe_file, parse_recipe

README = (ROOT / "README.md").read_text()
# The own-loop snippet reads the walkthrough's folder and store: tests/test_own_loop.py makes them and runs it.
OWN_LOOP = re.findall(r"## Train from a store in your own loop\n.*?```python\n(.*?)```", README, flags=re.S)


def test_the_readme_is_a_front_door_of_at_most_200_lines():
    assert len(README.splitlines()) <= 200


def test_the_own_loop_section_follows_your_own_data():
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    assert headings[headings.index("Your own data") + 1] == "Train from a store in your own loop"


def test_each_method_line_runs_a_published_recipe():
    """Every `distill-train recipes/configs/X.yaml` the README names is a recipe that validates, one per method."""
    named = re.findall(r"`distill-train (recipes/configs/\S+\.yaml)`", README)
    methods = {parse_recipe(load_recipe_file(ROOT / path)).method for path in named}
    assert {"tinyvit", "minivit", "tinyclip", "cream"} <= methods, named


WALKTHROUGH = re.findall(r"## Your own data.*?```sh\n(.*?)```", README, flags=re.S)


def run_walkthrough(folder: Path) -> subprocess.CompletedProcess:
    """The walkthrough's shell block in a folder holding the repository's .venv and recipes (a fresh clone's
    root, as far as the block can tell), stopping at the first step that fails."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(folder), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "-e", "-c", WALKTHROUGH[0]], cwd=folder, capture_output=True, text=True, env=env)


def walkthrough_files(folder: Path) -> dict[str, str]:
    """sha256 of every file the walkthrough wrote or read under `folder` (the repository's links left out)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.relative_to(folder).parts[0] not in (".venv", "recipes"):
            files[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    folder = tmp_path_factory.mktemp("walkthrough")
    for name in (".venv", "recipes"):
        (folder / name).symlink_to(ROOT / name)
    return folder, run_walkthrough(folder)


@pytest.mark.slow
def test_your_own_data_walkthrough_runs_as_pasted(walkthrough):
    """Teacher fine-tuned from a file with a 1000-class head, store, ViT student at 32 px and scores, every step
    exiting 0."""
    folder, proc = walkthrough
    assert len(WALKTHROUGH) == 1 and proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "in1k.safetensors" in proc.stderr and "fc.weight: checkpoint [1000, 512] vs model [10, 512]" in proc.stderr
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    student = json.loads((folder / "runs" / "my_student" / "summary.json").read_text())
    assert scores["top1"] == pytest.approx(student["top1"], abs=1e-3) and scores["teacher_top1"] > 50
    config = json.loads((folder / "runs" / "my_student" / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert "tag" not in config["pretrained_cfg"]  # trained from scratch: no augreg_in21k_ft_in1k weights claimed


@pytest.mark.slow
def test_the_walkthrough_run_again_exits_0_and_changes_no_file(walkthrough):
    folder, first = walkthrough
    assert first.returncode == 0, first.stderr[-3000:]
    before = walkthrough_files(folder)
    assert any(name.startswith("runs/my_student/") for name in before) and "in1k.safetensors" in before
    again = run_walkthrough(folder)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    after = walkthrough_files(folder)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, changed
    assert json.loads(again.stdout.strip().splitlines()[-1]) == json.loads(first.stdout.strip().splitlines()[-1])
