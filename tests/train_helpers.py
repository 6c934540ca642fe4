"""Small real data, recipes and runners for the trainer tests: a few digits per class as an image folder."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from distill.data_digits import prepare_digits
from distill.recipe import METHODS, Recipe
from distill.schema import parse_section

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(sys.executable).parent  # the environment's console scripts: distill-train, distill-save-logits


def small_digits(root: Path, per_class_train: int = 16, per_class_val: int = 6) -> dict[str, str]:
    """Folders train/ and val/ with the first images of each digit class (real PNGs)."""
    source = prepare_digits(str(root / "cache"))
    out = {}
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for class_dir in sorted((source / split).iterdir()):
            target = root / "small" / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for png in sorted(class_dir.iterdir())[:n]:
                shutil.copy(png, target / png.name)
        out[split] = str(root / "small" / split)
    return out


def base_recipe(data: dict[str, str], output_dir: Path, method: str = "supervised", **changes: Any) -> dict[str, Any]:
    recipe = {
        "method": method,
        "student": {"model": "test_vit"},
        "data": {"train": data["train"], "val": data["val"], "img_size": 32},
        "augmentation": "basic",
        "epochs": 2,
        "batch_size": 32,
        "optimizer": {"name": "adamw", "lr": 0.002},
        "log_every": 1,
        "output_dir": str(output_dir),
    }
    for key, value in changes.items():
        node = recipe
        *parents, leaf = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return copy.deepcopy(recipe)


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def env_for(root: Path) -> dict[str, str]:
    return os.environ | {"DISTILL_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}


def run_cli(
    program: str, args: list[str], root: Path, launcher: list[str] | None = None, env_extra: dict | None = None, **kw
):
    """A console script of the environment (e.g. distill-train), optionally under a launcher such as torchrun."""
    script = str(SCRIPTS / program)
    cmd = [*launcher, script] if launcher else [script]
    env = env_for(root) | (env_extra or {})
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, cwd=ROOT, **kw)


def make_method(name: str, loss: dict[str, Any] | None = None, num_classes: int = 10, **recipe: Any):
    """The method `name` as a run of a minimal recipe would build it (its loss section validated)."""
    from distill.method import create_method

    teacher = {} if METHODS.get(name).teacher == "none" else {"source": "timm:test_vit"}
    raw = {"method": name, "student": {"model": "test_vit"}, "data": {"train": "-", "val": "-"}, "epochs": 1,
           "batch_size": 1, "output_dir": "-", "teacher": teacher, "loss": loss or {}} | recipe  # fmt: skip
    return create_method(parse_section(Recipe, raw, ""), num_classes)
