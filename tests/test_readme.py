"""The README's snippets run as pasted: every Python block in a fresh directory, every YAML block as a recipe."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from train_helpers import ROOT

from distill.recipe import parse_recipe

README = (ROOT / "README.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", README, flags=re.S)
YAML = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)


def test_the_readme_has_snippets():
    assert PYTHON and YAML


@pytest.mark.parametrize("snippet", PYTHON, ids=lambda s: s.splitlines()[0][:40])
def test_python_snippet_runs_as_pasted(snippet, tmp_path):
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("snippet", YAML, ids=lambda s: s.splitlines()[0][:40])
def test_yaml_snippet_is_a_valid_recipe(snippet):
    parse_recipe(yaml.safe_load(snippet))


@pytest.mark.slow
def test_your_own_data_walkthrough_runs_as_pasted(tmp_path):
    """The walkthrough's shell block in a folder holding the repository's .venv and recipes (a fresh clone's
    root, as far as the block can tell): teacher, store, student and scores, every step exiting 0."""
    (block,) = re.findall(r"## Your own data.*?```sh\n(.*?)```", README, flags=re.S)
    for name in (".venv", "recipes"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    student = json.loads((tmp_path / "runs" / "my_student" / "summary.json").read_text())
    assert scores["top1"] == pytest.approx(student["top1"], abs=1e-3) and scores["teacher_top1"] > 50
