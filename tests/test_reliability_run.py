"""Faults around a training run (issue "Reliability, third round"): two runs racing for one output_dir, numbers
that are not finite, Ctrl-C, a damaged last checkpoint, read-only mounts and too-long names, and TensorBoard's
writer thread on a full disk.

Each fault is injected deterministically: a patched function at a known call, never a sleep.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from train_helpers import ROOT, base_recipe, small_digits, write_recipe

import distill.checkpoint
import distill.plan
import distill.trainer
from distill.checkpoint import write_file
from distill.cli import save_logits as save_main
from distill.cli import train as train_main
from distill.recipe import RecipeError
from distill.run import run_recipe


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability_run")
    return {"root": root, **small_digits(root)}


@pytest.fixture(autouse=True)
def cache(data, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(data["root"] / "cache"))


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (but the lock file, which holds nothing) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ---- 1. a run that finishes between another's check and its lock -----------------------------------------


def test_a_run_that_finishes_after_anothers_check_is_never_overwritten(data, tmp_path, monkeypatch):
    """Run B (another recipe) checks an empty output_dir; run A starts and finishes there before B takes the lock
    (the hook runs A to its end at the moment B asks for the lock). B must find A's finished run and refuse,
    leaving every file of A as it was; it used to check first, lock later, and overwrite A, both exiting 0."""
    out = tmp_path / "run"
    recipe_a = base_recipe(data, out, epochs=1)
    recipe_b = base_recipe(data, out, epochs=1, optimizer={"name": "sgd", "lr": 0.01})
    real, finished = distill.checkpoint.lock_output_dir, {}

    def a_finishes_first(folder: Path):
        if not finished:
            finished["A"] = None  # A's own lock is the real one
            assert run_recipe(recipe_a)[0]["epochs"] == 1
            finished["A"] = files_of(out)
        return real(folder)

    for module in (distill.plan, distill.trainer):  # wherever a run takes its lock
        if hasattr(module, "lock_output_dir"):
            monkeypatch.setattr(module, "lock_output_dir", a_finishes_first)
    with pytest.raises(RecipeError, match=r"output_dir .*run holds a finished run \(summary\.json\)"):
        run_recipe(recipe_b)
    assert finished["A"] and "summary.json" in finished["A"]
    assert files_of(out) == finished["A"]


def test_a_refused_plan_leaves_no_folder_it_made(data, tmp_path):
    """The lock is taken before the plan checks anything; a plan refused after that removes the folder it made."""
    recipe = base_recipe(data, tmp_path / "run", student={"model": "test_vit", "kwargs": {"num_classes": 7}})
    with pytest.raises(RecipeError, match=r"student\.kwargs\.num_classes"):
        run_recipe(recipe)
    assert list(tmp_path.iterdir()) == []


# ---- 2. numbers that are not finite; negative workers ----------------------------------------------------

REFUSALS = """
import json, sys
sys.path.insert(0, "tests")
from distill.cli import train, save_logits
results = []
for prog, argv in json.loads(sys.argv[1]):
    try:
        code = (train if prog == "train" else save_logits)(argv)
    except SystemExit as exit:
        code = exit.code
    results.append(code)
print(json.dumps({"codes": results, "torch": "torch" in sys.modules}))
"""


def test_non_finite_numbers_and_negative_workers_are_refused_before_anything_is_created(tmp_path):
    """In a recipe, a --set, a free-form mapping, or an option: one line naming the key, exit 2, before torch is
    imported and before any file is made (the data paths do not exist: a recipe let through fails later)."""
    out = tmp_path / "run"
    raw = {"method": "minivit", "student": {"model": "test_vit"}, "teacher": {"source": "timm:test_vit"},
           "data": {"train": str(tmp_path / "none"), "val": str(tmp_path / "none")}, "epochs": 1, "batch_size": 8,
           "output_dir": str(out)}  # fmt: skip
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    workers = write_recipe(tmp_path / "w.yaml", raw | {"data": raw["data"] | {"workers": -1}})
    nested = write_recipe(tmp_path / "n.yaml", raw | {"optimizer": {"kwargs": {"betas": [0.9, float("inf")]}}})
    cases = [
        ("train", [str(recipe), "--set", "optimizer.lr=.inf"], r"optimizer\.lr: expected a finite number, got inf"),
        ("train", [str(recipe), "--set", "loss.temperature=.nan"], r"loss\.temperature: expected a finite number"),
        ("train", [str(nested)], r"optimizer\.kwargs\.betas\[1\]: expected a finite number, got inf"),
        ("train", [str(workers)], r"data\.workers: expected an integer >= 0, got -1"),
        ("save", ["--teacher", "timm:test_vit", "--data", "digits", "--out", str(tmp_path / "s.zarr"),
                  "--epochs", "1", "--k", "3", "--workers", "-1"], r"option 'workers' must be >= 0, got -1"),
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", REFUSALS, json.dumps([c[:2] for c in cases])], cwd=ROOT,
                          capture_output=True, text=True, env=os.environ | {"DISTILL_CACHE": str(tmp_path / "c")})  # fmt: skip
    assert proc.returncode == 0 and proc.stdout, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result == {"codes": [2] * len(cases), "torch": False}, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == len(cases), proc.stderr
    for line, (_, _, expected) in zip(errors, cases, strict=True):
        assert re.search(expected, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.yaml", "r.yaml", "w.yaml"]


def nan_from_step(monkeypatch, step: int) -> None:
    """The supervised loss becomes nan from optimizer step `step` on (a run that diverges there)."""
    from recipes.supervised.method import Supervised

    real = Supervised.loss
    calls = {"n": 0}

    def loss(self, student, batch, teacher):
        calls["n"] += 1
        losses = real(self, student, batch, teacher)
        return losses | {"loss": losses["loss"] * float("nan")} if calls["n"] >= step else losses

    monkeypatch.setattr(Supervised, "loss", loss)


def test_a_non_finite_loss_stops_the_run_naming_its_step(data, tmp_path, monkeypatch, capsys):
    """Found at the next checkpoint (step 4; no log in between): one line naming step 3, exit 2; the checkpoint of
    step 2 is kept and finite; no weights or summary of the diverged model are written."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(data, out, epochs=1, log_every=100, checkpoint_every=2))
    nan_from_step(monkeypatch, 3)
    assert train_main([str(recipe)]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert line.endswith("r.yaml: step 3: the loss is not finite (nan or inf): the run diverged and stopped; its "
                         "checkpoints hold no non-finite weights. Lower optimizer.lr or set optimizer.clip_grad, "
                         "and train in another output_dir"), line  # fmt: skip
    assert not (out / "summary.json").exists() and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    weights = load_file(str(out / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert all(w.isfinite().all() for w in weights.values())


# ---- 3. Ctrl-C; 4. a damaged last checkpoint ---------------------------------------------------------------


def interrupt_after_step(patch: pytest.MonkeyPatch, step: int) -> None:
    """Ctrl-C (KeyboardInterrupt) right after optimizer step `step`, its bookkeeping (and checkpoint) done."""
    real = distill.trainer.Trainer.after_step

    def after_step(self, steps_per_epoch: int) -> None:
        real(self, steps_per_epoch)
        if self.state.global_step == step:
            raise KeyboardInterrupt

    patch.setattr(distill.trainer.Trainer, "after_step", after_step)


@pytest.fixture(scope="module")
def interrupted(data, tmp_path_factory):
    """A run of 2 epochs of 5 steps, checkpointed every 2 steps, interrupted by Ctrl-C after step 7: it keeps its
    last two checkpoints, steps 5 (epoch 1's end) and 6. The recipe's output_dir is relative ("run"), so a copy
    of the folder elsewhere is the same run there."""
    base = tmp_path_factory.mktemp("interrupted")
    recipe = write_recipe(base / "r.yaml", base_recipe(data, Path("run"), epochs=2, checkpoint_every=2))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(base)
        patch.setenv("DISTILL_CACHE", str(data["root"] / "cache"))
        interrupt_after_step(patch, 7)
        result = cli_call(lambda: train_main([str(recipe)]))
    return {"base": base, "recipe": recipe, **result}


def cli_call(call) -> dict:
    """The exit code of an in-process CLI call (SystemExit's or its return) and what it printed to stderr; a
    KeyboardInterrupt that escapes the CLI is reported as such (it would stop pytest itself)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = call()
        except SystemExit as exit:
            code = exit.code
        except KeyboardInterrupt:
            code = "KeyboardInterrupt escaped"
    return {"code": code, "stderr": err.getvalue()}


def copy_run(interrupted, tmp_path: Path, monkeypatch) -> Path:
    shutil.copytree(interrupted["base"] / "run", tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "run"


def test_ctrl_c_while_training_is_one_line_exit_130_and_the_same_command_resumes(interrupted, tmp_path, monkeypatch):
    assert interrupted["code"] == 130
    assert "Traceback" not in interrupted["stderr"]
    (line,) = [line for line in interrupted["stderr"].splitlines() if "distill-train" in line]
    assert line == "distill-train: interrupted; run the same command again to resume from its last checkpoint"
    out = copy_run(interrupted, tmp_path, monkeypatch)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "step_00000005", "step_00000006"]
    assert train_main([str(interrupted["recipe"])]) == 0
    assert "resuming from run/checkpoints/step_00000006 (epoch 1, step 6)" in (out / "train.log").read_text()
    assert json.loads((out / "summary.json").read_text())["steps"] == 10


DAMAGE = {
    "state.pt": lambda f: f.write_bytes(b""),
    "rng_0.pt": lambda f: f.write_bytes(b""),
    "model.safetensors": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
}
WHY = {
    "state.pt": "state.pt is empty (0 bytes)",
    "rng_0.pt": "rng_0.pt is empty (0 bytes)",
    "model.safetensors": "model.safetensors cannot be read (Error while deserializing header: incomplete metadata, "
    "file not fully covered)",
}


@pytest.mark.parametrize("name", DAMAGE)
def test_a_damaged_last_checkpoint_names_the_file_and_the_checkpoint_before_it(
    interrupted, tmp_path, monkeypatch, capsys, name
):
    out = copy_run(interrupted, tmp_path, monkeypatch)
    damaged = out / "checkpoints" / "step_00000006"
    DAMAGE[name](damaged / name)
    before = files_of(out)
    assert train_main([str(interrupted["recipe"])]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert line.endswith(f"r.yaml: checkpoint run/checkpoints/step_00000006 is damaged: {WHY[name]}; delete that "
                         "folder to resume from the checkpoint before it, run/checkpoints/step_00000005"), line  # fmt: skip
    after = files_of(out)
    assert {k: v for k, v in after.items() if k != "train.log"} == {k: v for k, v in before.items() if k != "train.log"}
    if name == "state.pt":  # the way out works: the run resumes from step 5 and finishes
        shutil.rmtree(damaged)
        assert train_main([str(interrupted["recipe"])]) == 0
        assert "resuming from run/checkpoints/step_00000005 (epoch 1, step 5)" in (out / "train.log").read_text()


# ---- 5. read-only mounts and names too long ----------------------------------------------------------------

EROFS = OSError(errno.EROFS, os.strerror(errno.EROFS))


def test_a_read_only_mount_at_a_write_and_at_its_cleanup_reports_the_write(tmp_path, monkeypatch):
    """On a read-only mount, removing even a file that is not there fails (EROFS): the cleanup of a failed write
    must not replace the write's own error."""
    failed = OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "f.partial"))

    def read_only_open(*_args, **_kwargs):
        raise failed

    def read_only_unlink(self, missing_ok: bool = False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(distill.checkpoint, "open", read_only_open, raising=False)
    monkeypatch.setattr(Path, "unlink", read_only_unlink)
    with pytest.raises(OSError) as err:
        write_file(tmp_path / "f", lambda fh: fh.write(b"x"))
    assert err.value is failed


def test_a_read_only_output_dir_is_one_line_and_exit_2(data, tmp_path, monkeypatch, capsys):
    """The first checkpoint's weights cannot be written (EROFS), nor can their temporary file be removed."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(data, out, epochs=1))
    real_open, real_unlink = open, Path.unlink

    def opener(path, mode="r", *args, **kwargs):
        if Path(path).name == "model.safetensors.partial":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *args, **kwargs)

    def unlink(self, missing_ok: bool = False):
        if self.name.endswith(".partial"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(distill.checkpoint, "open", opener, raising=False)
    monkeypatch.setattr(Path, "unlink", unlink)
    assert train_main([str(recipe)]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err
    assert line.endswith(f"r.yaml: cannot write {out}/checkpoints/best.partial/model.safetensors.partial: its file "
                         "system is read-only"), line  # fmt: skip


def test_a_name_too_long_is_one_line_naming_the_path_and_creates_nothing(data, tmp_path, capsys):
    long = "x" * 300
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(data, tmp_path / long / "run", epochs=1))
    assert train_main([str(recipe)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"distill-train: error: {recipe}: path {tmp_path / long / 'run'}"), line
    assert line.endswith(": a folder or file name in it is longer than the file system allows (often 255 bytes)")
    store = tmp_path / (long + ".zarr")
    argv = ["--teacher", "timm:test_convnext", "--data", data["train"], "--out", str(store), "--epochs", "1",
            "--k", "3", "--img-size", "32", "--batch-size", "32"]  # fmt: skip
    assert save_main(argv) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert line.startswith(f"distill-save-logits: error: path {store}.tmp-"), line
    assert line.endswith("a folder or file name in it is longer than the file system allows (often 255 bytes)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


# ---- 6. TensorBoard's writer thread on a full disk ---------------------------------------------------------


def test_a_full_disk_in_tensorboards_writer_thread_prints_only_the_one_line(data, tmp_path, monkeypatch, capsys):
    """TensorBoard writes events on a thread of its own; its failed write used to be printed as that thread's
    traceback (Python's threading.excepthook) before the run's disk-full line. Every write from the 3rd on fails."""
    from tensorboard.summary.writer.record_writer import RecordWriter

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(data, out, epochs=1))
    calls = {"n": 0}
    real_write = RecordWriter.write

    def write(self, data):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    reported = []
    previous = threading.excepthook
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.exc_value) or previous(args))
    monkeypatch.setattr(RecordWriter, "write", write)
    assert train_main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert reported == [] and "Traceback" not in err and "Exception in thread" not in err, err
    (line,) = [line for line in err.splitlines() if "error" in line]
    assert line.endswith(f"r.yaml: disk full: cannot write {out} (no space left on its file system); free space, "
                         "then run again"), line  # fmt: skip
    assert not (out / "summary.json").exists()


# ---- 3. Ctrl-C while saving --------------------------------------------------------------------------------


def test_ctrl_c_while_saving_is_one_line_exit_130_and_the_same_command_resumes(data, tmp_path, monkeypatch, capsys):
    """Interrupted at the 4th batch, after the first shard (64 records) is committed."""
    from logit_store import ShardWriter

    real, calls = ShardWriter.write, {"n": 0}

    def write(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    argv = ["--teacher", "timm:test_convnext", "--data", data["train"], "--out", str(tmp_path / "s.zarr"),
            "--epochs", "1", "--k", "3", "--img-size", "32", "--batch-size", "32"]  # fmt: skip
    with monkeypatch.context() as patch:
        patch.setattr(ShardWriter, "write", write)
        interrupted = cli_call(lambda: save_main(argv))
    assert interrupted["code"] == 130
    err = interrupted["stderr"]
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "distill-save-logits" in line]
    assert (
        line == "distill-save-logits: interrupted; run the same command again to resume after its last committed shard"
    )
    assert save_main(argv) == 0
    assert "resuming" in capsys.readouterr().err
