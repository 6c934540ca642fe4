"""The method contract (docs/methods/README.md): the hooks' documented order, recorded from real runs, and the
page's complete method trained as its author would install it."""

from __future__ import annotations

import csv
import inspect
import json
import re
import subprocess
import textwrap
import tomllib

import pytest
import yaml
from train_helpers import ROOT, SCRIPTS, base_recipe, env_for, small_digits

import distill.method
import distill.trainer
from distill.method import Method
from distill.recipe import METHODS, MethodSpec
from distill.run import run_recipe

pytestmark = pytest.mark.usefixtures("single_thread")

# A method that records every hook it is called with, per instance, and otherwise does what the base class does.
RECORDER = """
    import itertools

    import torch.nn.functional as F

    from distill.method import Method

    CALLS = []  # (instance serial, hook name)
    PROGRESS = []  # (global step, epoch, lr) as the context tells them in after_step
    _serials = itertools.count()


    class Recording(Method):
        def __init__(self, *args):
            super().__init__(*args)
            self.serial = next(_serials)

        def setup(self, context):
            CALLS.append((self.serial, "setup"))
            self.context = context

        def loss(self, student, batch, teacher):
            CALLS.append((self.serial, "loss"))
            return {"loss": F.cross_entropy(student(batch["image"]), batch["label"])}

        def after_step(self, student, batch):
            CALLS.append((self.serial, "after_step"))
            context = self.context
            PROGRESS.append((context.global_step(), context.epoch(), context.param_groups()[0]["lr"]))
            return {}


    def _recorded(name):
        def hook(self, *args, **kwargs):
            CALLS.append((self.serial, name))
            return getattr(Method, name)(self, *args, **kwargs)

        return hook


    for _name in HOOKS:
        if _name not in vars(Recording):
            setattr(Recording, _name, _recorded(_name))
"""


def documented_hooks() -> list[str]:
    """The hooks in the order the docstring of distill/method.py lists them."""
    doc = distill.method.__doc__
    section = doc[doc.index("called in this order") : doc.index("What a hook learns")]
    return list(dict.fromkeys(re.findall(r"\b([a-z_]+)\(", section)))


def test_every_hook_of_the_base_class_is_documented():
    hooks = {name for name, value in vars(Method).items() if inspect.isfunction(value) and not name.startswith("_")}
    assert set(documented_hooks()) == hooks
    assert len(documented_hooks()) == len(hooks)  # each listed once


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    """The recording method, registered as `recording`: a function that hands what it recorded since the last call
    (the hooks called on each instance, in creation order; the progress the context told in after_step)."""
    (tmp_path / "hook_recorder.py").write_text(f"HOOKS = {documented_hooks()!r}\n" + textwrap.dedent(RECORDER))
    monkeypatch.syspath_prepend(str(tmp_path))
    import hook_recorder

    METHODS.register("recording", MethodSpec(method="hook_recorder:Recording", teacher="none"))

    def recorded() -> tuple[list[list[str]], list[tuple[int, int, float]]]:
        by_instance: dict[int, list[str]] = {}
        for serial, name in hook_recorder.CALLS:
            by_instance.setdefault(serial, []).append(name)
        progress = list(hook_recorder.PROGRESS)
        hook_recorder.CALLS.clear()
        hook_recorder.PROGRESS.clear()
        return list(by_instance.values()), progress

    return recorded


def logged_lr(out) -> dict[int, float]:
    """step -> the learning rate the trainer logged for it (metrics.csv)."""
    with open(out / "metrics.csv", newline="") as f:
        return {int(step): float(value) for step, name, value in list(csv.reader(f))[1:] if name == "train/lr"}


CHECK = ["check_run", "check_teacher", "training_ids"]  # the check of every run before the first one writes
PLAN = [*CHECK, "build_student"]
STEP = ["loss", "loss", "after_step"]  # grad_accum 2: two micro-batches per optimizer step
END = ["evaluate", "state_dict", "state_dict", "finish", "result_student"]  # best checkpoint, then the step's


def test_a_run_calls_the_hooks_in_the_documented_order(recorder, tmp_path, monkeypatch):
    data = small_digits(tmp_path, per_class_train=4, per_class_val=2)  # 40 images: 2 steps of 20

    def recipe(out):
        return base_recipe(data, tmp_path / out, "recording", epochs=1, batch_size=20, grad_accum=2,
                           checkpoint_every=1)  # fmt: skip

    run_recipe(recipe("whole"))
    (check, run), progress = recorder()
    assert check == CHECK
    assert run == [*PLAN, "optimized_module", "setup", *STEP, "state_dict", *STEP, *END]
    lr = logged_lr(tmp_path / "whole")
    assert progress == [(1, 0, lr[1]), (2, 0, lr[2])] and lr[1] != lr[2]  # the context's progress, as logged

    class Stop(Exception):
        pass

    def checkpoint_then_stop(trainer):  # a run that dies right after its first checkpoint (step 1)
        step_checkpoint(trainer)
        raise Stop

    step_checkpoint = distill.trainer.Trainer.checkpoint
    with monkeypatch.context() as patch:
        patch.setattr(distill.trainer.Trainer, "checkpoint", checkpoint_then_stop)
        with pytest.raises(Stop):
            run_recipe(recipe("resumed"))
    (_, run), _ = recorder()
    assert run == [*PLAN, "optimized_module", "setup", *STEP, "state_dict"]
    run_recipe(recipe("resumed"))
    (_, run), progress = recorder()
    assert run == [*PLAN, "optimized_module", "setup", "load_state_dict", *STEP, *END]
    assert progress == [(2, 0, lr[2])]  # the resumed state, through the context set up before it was loaded
    assert list(dict.fromkeys(run)) == documented_hooks()  # every hook, first called in the documented order


# ---- the page's complete method --------------------------------------------------------------------------

PAGE = ROOT / "docs" / "methods" / "README.md"


def page_package() -> tuple[dict[str, str], dict[str, str]]:
    """The page's python blocks ({path: code}, each block's first line `# PATH`) and its entry points."""
    text = PAGE.read_text()
    files = dict(re.findall(r"```python\n# (\S+)\n(.*?)```", text, flags=re.S))
    toml = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    assert files and len(toml) == 1, "the page lost its method's code blocks"
    return files, tomllib.loads(toml[0])["project"]["entry-points"]["distill.methods"]


def test_the_method_page_holds_a_complete_method_that_trains(tmp_path):
    files, entry_points = page_package()
    assert sum(len(code.splitlines()) for code in files.values()) <= 60  # a page's worth: minimal
    site = tmp_path / "site"
    for path, code in files.items():
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_text(code)
    info = site / "hinton_kd-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hinton_kd\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[distill.methods]\n" + "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    )
    (name,) = entry_points
    data = small_digits(tmp_path, per_class_train=4, per_class_val=2)
    recipe = base_recipe(data, tmp_path / "run", name, epochs=1, batch_size=20, teacher={"source": "timm:test_vit"},
                         loss={"temperature": 2.0, "alpha": 0.25})  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = env_for(tmp_path) | {"PYTHONPATH": str(site)}
    proc = subprocess.run([str(SCRIPTS / "distill-train"), str(path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hinton KD at temperature 2.0, alpha 0.25" in proc.stdout + proc.stderr  # its setup logged
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == name and summary["steps"] == 2
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    logged: dict[str, list[float]] = {}
    for _, key, value in rows:
        logged.setdefault(key, []).append(float(value))
    assert len(logged["train/kd"]) == len(logged["train/label"]) == len(logged["train/loss"]) == 2  # log_every 1
    for loss, kd, label in zip(logged["train/loss"], logged["train/kd"], logged["train/label"], strict=True):
        assert loss == pytest.approx(0.25 * kd + 0.75 * label, rel=1e-5)  # the page's loss, as logged
    proc = subprocess.run(
        [str(SCRIPTS / "distill-train"), str(path)], env=env | {"PYTHONPATH": ""}, capture_output=True, text=True
    )
    assert proc.returncode == 2 and f"unknown method {name!r}" in proc.stderr  # found by its entry point alone
