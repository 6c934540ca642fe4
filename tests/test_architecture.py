"""The house rules: which package imports which, one error root, one registry, methods found by entry points."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import yaml
from train_helpers import ROOT, SCRIPTS, env_for, small_digits

from distill.errors import DatasetError, RecipeError
from logit_store.errors import DistillError, StoreError
from logit_store.registry import Registry
from teachers.base import TeacherError
from teachers.checkpoint import CheckpointError

# package -> the toolkit's packages it may import (docs/ARCHITECTURE.md)
MAY_IMPORT = {
    "logit_store": set(),
    "students": set(),
    "teachers": {"logit_store", "students"},
    "distill": {"logit_store", "teachers", "students"},
    "recipes": {"logit_store", "teachers", "students", "distill"},
}


def imported_packages(path: Path) -> set[str]:
    """The top-level names of everything a module imports (absolute imports only; relative ones stay home)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_packages_import_only_the_floors_below(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        ours = imported_packages(path) & set(MAY_IMPORT)
        assert ours <= MAY_IMPORT[package] | {package}, f"{path.relative_to(ROOT)} imports {ours - MAY_IMPORT[package]}"


def test_one_training_loop():
    """Only the Trainer steps an optimizer over data batches: no method or program has a loop of its own."""
    steppers = []
    for package in MAY_IMPORT:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            if ".backward(" in text and "optimizer.step()" in text:
                steppers.append(str(path.relative_to(ROOT)))
    assert steppers == ["distill/trainer.py"]


def test_every_input_error_derives_from_one_root():
    for error in (StoreError, RecipeError, DatasetError, TeacherError, CheckpointError):
        assert issubclass(error, DistillError) and issubclass(error, ValueError)


def test_registry_registers_lists_imports_lazily_and_names_close_matches(tmp_path, monkeypatch):
    registry: Registry[object] = Registry("widget", RecipeError)
    registry.register("json-dumps", "json:dumps")  # a path: imported on first use
    registry.register("spam", print)
    assert registry.names() == ["json-dumps", "spam"] and registry.names("j*") == ["json-dumps"]
    import json

    assert registry.get("json-dumps") is json.dumps
    registry.register("json-dumps", json.dumps)  # the object its path named: the same registration
    with pytest.raises(ValueError, match="widget 'spam' is already registered"):
        registry.register("spam", len)
    with pytest.raises(RecipeError, match=r"unknown widget 'spma'; installed: json-dumps, spam; did you mean 'spam'\?"):
        registry.get("spma")
    relaxed: Registry[object] = Registry("widget", duplicates="warn")
    relaxed.register("a", print)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        relaxed.register("a", len)
    assert relaxed.get("a") is print and "already registered" in str(caught[0].message)
    (tmp_path / "needs_a_dependency.py").write_text("import no_such_dependency_anywhere\nthing = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    missing: Registry[object] = Registry("widget", RecipeError)
    missing.register("x", "needs_a_dependency:thing")  # an optional dependency that is not installed
    with pytest.raises(RecipeError, match="widget 'x' needs the package 'no_such_dependency_anywhere'"):
        missing.get("x")
    missing.register("typo", "no_such_module_of_ours:thing")  # a registration's own module missing: a bug
    with pytest.raises(ModuleNotFoundError):
        missing.get("typo")


THIRD_PARTY = {
    "myplugin/__init__.py": """
        from dataclasses import dataclass
        from distill.recipe import MethodSpec

        @dataclass
        class HalfLoss:
            scale: float = 0.5

        SPEC = MethodSpec(method="myplugin.method:Half", loss=HalfLoss, teacher="none")
    """,
    "myplugin/method.py": '''
        import torch.nn.functional as F
        from distill.method import Method

        class Half(Method):
            """Cross-entropy times a scale: a method of another package."""
            def loss(self, student, batch, teacher):
                return {"loss": self.cfg.scale * F.cross_entropy(student(batch["image"]), batch["label"])}

            def after_step(self, student, batch):
                if self.cfg.scale < 0:
                    raise ValueError("a bug in a plugin")  # not an input error: a traceback
                return {}
    ''',
    "myplugin-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n",
    "myplugin-0.1.dist-info/entry_points.txt": "[distill.methods]\nhalf = myplugin:SPEC\n",
}


def test_a_method_from_another_package_runs_by_its_entry_point(tmp_path):
    """A package that declares a `distill.methods` entry point adds a method; nothing in the toolkit names it."""
    site = tmp_path / "site"
    for name, text in THIRD_PARTY.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(textwrap.dedent(text))
    data = small_digits(tmp_path, per_class_train=4, per_class_val=2)
    recipe = {
        "method": "half", "student": {"model": "test_vit"}, "epochs": 1, "batch_size": 20,
        "data": {"train": data["train"], "val": data["val"], "img_size": 32}, "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    path = tmp_path / "r.yaml"
    env = env_for(tmp_path) | {"PYTHONPATH": str(site)}

    def run(**changes):
        path.write_text(yaml.safe_dump(recipe | changes))
        return subprocess.run([str(SCRIPTS / "distill-train"), str(path)], env=env, capture_output=True, text=True)

    proc = run(method="hlaf")
    assert proc.returncode == 2 and "did you mean 'half'" in proc.stderr and "tinyvit" in proc.stderr
    proc = run(loss={"scale": "big"})
    assert proc.returncode == 2 and "loss.scale: expected a number, got str 'big'" in proc.stderr
    proc = run()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"method": "half"' in proc.stdout
    proc = run(loss={"scale": -1.0}, output_dir=str(tmp_path / "bug"))
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError: a bug in a plugin" in proc.stderr


def test_clis_answer_help_and_recipe_errors_without_importing_torch(tmp_path):
    probe = textwrap.dedent(f"""
        import sys
        from distill.cli import evaluate, train
        for cli, argv in ((train, ["--help"]), (train, [{str(tmp_path / "r.yaml")!r}]), (evaluate, ["--help"])):
            try:
                cli(argv)
            except SystemExit:
                pass
        heavy = sorted(m for m in ("torch", "timm", "open_clip", "accelerate", "zarr") if m in sys.modules)
        print("imported:", heavy)
    """)
    recipe = {"method": "tinyvit", "student": {"model": "x"}, "data": {"train": "d", "val": "d"}, "epochs": 1,
              "batch_size": 8, "output_dir": "o", "teacher": {"source": "store:s"}, "loss": {"temprature": 2}}  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert "imported: []" in proc.stdout, proc.stdout + proc.stderr
    assert "usage: distill-train" in proc.stdout and "loss.temprature: unknown key" in proc.stderr
    assert "usage: distill-eval" in proc.stdout


def test_trackers_written_out_are_accelerates():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    from distill.recipe import TRACKERS

    assert set(TRACKERS) == set(LOGGER_TYPE_TO_CLASS)


def test_optional_list_fields_keep_the_item_error():
    """`list[int] | None`: a list with a bad item names the item, not the whole union."""
    from dataclasses import dataclass

    from distill.schema import parse_section

    @dataclass
    class Section:
        pairs: list[list[int]] | None = None

    assert parse_section(Section, {"pairs": None}, "loss").pairs is None
    with pytest.raises(RecipeError, match=r"^loss\.pairs\[1\]\[0\]: expected an integer, got str 'a'$"):
        parse_section(Section, {"pairs": [[1, 2], ["a", 3]]}, "loss")
    with pytest.raises(RecipeError, match=r"^loss\.pairs: expected .*, got str 'x'$"):
        parse_section(Section, {"pairs": "x"}, "loss")
