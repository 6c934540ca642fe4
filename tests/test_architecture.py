"""The house rules: which package imports which, one error root, one registry, methods found by entry points."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import FrameType

import pytest
import torch
import yaml
from train_helpers import ROOT, SCRIPTS, base_recipe, env_for, small_digits

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


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(packages: list[str]) -> dict[str, list[str]]:
    """Module -> the modules of `packages` it imports: every import statement, at any depth (functions, TYPE_CHECKING
    blocks), relative ones resolved; `from P import N` is an edge to module P.N when there is one, else to P."""
    files = {module_name(path): path for package in packages for path in sorted((ROOT / package).rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[name] = sorted(t for t in targets if t in files and t != name)
    return graph


def import_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """A cycle through each back edge of a depth-first search: none means the graph has no cycle."""
    cycles: list[list[str]] = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in graph[node]:
            if state.get(target) == "open":
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node)
    return cycles


def test_import_cycle_search_finds_a_cycle():
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert import_cycles(graph) == [["a", "b", "c", "a"]] and import_cycles({"a": ["b"], "b": []}) == []


@pytest.mark.parametrize("package", ["distill", "logit_store"])
def test_no_import_cycles_inside_a_package(package):
    """No module of the package imports, at any depth or only for type checking, one that imports it back."""
    graph = import_graph([package])
    assert len(graph) > 10 and any(graph.values())  # the walk found the modules and their imports
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


# The toolkit's own code, where a call stack is walked for its callers (the environment's packages are not).
TOOLKIT = set(MAY_IMPORT)


def toolkit_frames(frame: FrameType | None) -> list[tuple[str, str]]:
    """(file relative to the repository, function) of each frame of the toolkit's code, innermost first."""
    frames = []
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(ROOT) and path.relative_to(ROOT).parts[0] in TOOLKIT:
            frames.append((path.relative_to(ROOT).as_posix(), frame.f_code.co_name))
        frame = frame.f_back
    return frames


def run_recording_updates(recipe: dict) -> tuple[dict, list[tuple[str, list[tuple[str, str]]]]]:
    """Run `recipe` in this process; its summary and every backward pass and optimizer step (any optimizer) taken,
    as ("backward" or the optimizer's class, the toolkit frames it was called from)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from distill.run import run_recipe

    calls = []
    real_backward = torch.autograd.backward

    def backward(*args, **kwargs):
        calls.append(("backward", toolkit_frames(sys._getframe(1))))
        return real_backward(*args, **kwargs)

    def step(optimizer, args, kwargs):
        calls.append((type(optimizer).__name__, toolkit_frames(sys._getframe(1))))

    handle = register_optimizer_step_pre_hook(step)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.autograd, "backward", backward)  # what Tensor.backward and accelerate's call
            (summary,) = run_recipe(recipe)
    finally:
        handle.remove()
    return summary, calls


LOOP = ("distill/trainer.py", "_fit")  # the one training loop
TRAIN_STEP = ("distill/trainer.py", "train_step")


@pytest.mark.usefixtures("single_thread")
def test_one_training_loop(tmp_path):
    """Every backward pass and optimizer step of a run is taken inside the Trainer's loop: the trainer's own, from
    its train_step, once per step; a method's own optimizer (Cream's meta network) only from a hook the loop calls."""
    data = small_digits(tmp_path)
    supervised = base_recipe(data, tmp_path / "supervised", epochs=1, batch_size=32)
    summary, calls = run_recording_updates(supervised)
    assert summary["steps"] == 5
    assert [(what, frames[0]) for what, frames in calls] == [("backward", TRAIN_STEP), ("AdamW", TRAIN_STEP)] * 5
    cream = base_recipe(
        data, tmp_path / "cream", "cream", epochs=1, batch_size=16, student={"model": "cream_supernet",
        "kwargs": {"tiny": True}}, loss={"flops_budget": 3.5, "board_size": 32, "board_start_epoch": 0,
        "meta_update_every": 2, "heldout_every": 5, "heldout_batch_size": 16},
    )  # fmt: skip
    summary, calls = run_recording_updates(cream)
    assert summary["steps"] == 8 and summary["meta_updates"] > 0
    assert all(LOOP in frames for _, frames in calls)  # all of them inside the loop
    trainer = [what for what, frames in calls if frames[0] == TRAIN_STEP]
    assert trainer == ["backward", "AdamW"] * 8
    own = [(what, frames[0]) for what, frames in calls if frames[0] != TRAIN_STEP]
    assert own == [("Adam", ("recipes/cream/board.py", "meta_update"))] * summary["meta_updates"]
    assert all(("recipes/cream/method.py", "loss") in frames for what, frames in calls if what == "Adam")


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
