"""A user's first hour: typos refused at once (before torch and timm load), each named once and plainly; the CPU
threads a run takes, said in its first lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from store_helpers import manifest
from train_helpers import ROOT

from distill.recipe import RecipeError, parse_recipe
from logit_store import StoreError, create_store, open_store

HEAVY = ("torch", "timm", "open_clip", "accelerate", "zarr")


def test_input_errors_of_the_command_line_or_the_recipe_come_before_torch(tmp_path):
    """Each typo is one line and exit 2, in well under a second of the process's own CPU time (loading torch and
    timm alone takes seconds of it; ~50 s of wall time on a loaded machine), and torch is never imported."""
    (tmp_path / "folder" / "cat").mkdir(parents=True)
    (tmp_path / "folder" / "dog").mkdir()
    recipe = {"method": "tinyvit", "student": {"model": "resnet18"}, "epochs": 1, "batch_size": 8,
              "data": {"train": "digits", "val": "digits", "img_size": 32}, "output_dir": str(tmp_path / "run")}  # fmt: skip
    sources = (("prefix", "foo:bar"), ("store", f"store:{tmp_path / 'typo.zarr'}"), ("close", "tim:resnet18"))
    for name, source in sources:
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe | {"teacher": {"source": source}}))
    save = ["--out", str(tmp_path / "s.zarr"), "--epochs", "1"]
    cases = [
        ("train", [str(tmp_path / "prefix.yaml")], "teacher.source: teacher spec 'foo:bar' has no known prefix"),
        ("train", [str(tmp_path / "close.yaml")], "'tim:resnet18' has no known prefix; expected one of 'ensemble:', "
         "'module:', 'open_clip:', 'store:', 'timm:' (did you mean 'timm:resnet18'?)"),
        ("train", [str(tmp_path / "store.yaml")], f"teacher.source: the store {tmp_path / 'typo.zarr'} does not exist"),
        ("save_logits", ["--teacher", "foo:bar", "--data", "digits", "--k", "3", *save], "'foo:bar' has no known prefix"),
        ("save_logits", ["--teacher", "timm:resnet18", "--data", "digits", "--k", "20", *save],
         "--k 20 is larger than the 10 classes of digits"),
        ("save_logits", ["--teacher", "timm:resnet18", "--data", str(tmp_path / "folder"), "--k", "3", *save],
         f"--k 3 is larger than the 2 classes of {tmp_path / 'folder'}"),
        ("evaluate", [str(tmp_path / "runs" / "typo")], f"error: {tmp_path / 'runs' / 'typo'} does not exist ("),
        ("store", ["info", str(tmp_path / "typo.zarr")], f"error: {tmp_path / 'typo.zarr'} does not exist"),
    ]  # fmt: skip
    probe = textwrap.dedent("""
        import contextlib, io, json, sys, time
        from distill import cli
        from logit_store.cli import main as store
        results = []
        for name, argv in json.loads(sys.argv[1]):
            err = io.StringIO()
            started = time.process_time()
            with contextlib.redirect_stderr(err):
                try:
                    code = (store if name == "store" else getattr(cli, name))(argv)
                except SystemExit as exit:
                    code = exit.code
            results.append([code, err.getvalue(), time.process_time() - started])
        heavy = sorted(m for m in sys.argv[2].split(",") if m in sys.modules)
        print(json.dumps({"results": results, "imported": heavy}))
    """)
    argv = json.dumps([[name, args] for name, args, _ in cases])
    proc = subprocess.run([sys.executable, "-c", probe, argv, ",".join(HEAVY)], capture_output=True, text=True,
                          cwd=ROOT, env=os.environ | {"DISTILL_CACHE": str(tmp_path / "cache")})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["imported"] == []
    for (name, _, message), (code, stderr, cpu_seconds) in zip(cases, report["results"], strict=True):
        assert code == 2 and stderr.count("\n") == 1 and message in stderr, (name, stderr)
        assert cpu_seconds < 1.0, (name, cpu_seconds)
    evaluated = report["results"][-2][1]
    assert evaluated.count(str(tmp_path / "runs" / "typo")) == 1  # the path is named once


def test_a_missing_store_is_said_not_to_exist(tmp_path):
    with pytest.raises(StoreError, match=r"typo\.zarr does not exist \(no store there\)$"):
        open_store(tmp_path / "typo.zarr")
    (tmp_path / "other").mkdir()
    with pytest.raises(StoreError, match=r"other is not a logit store: it has no manifest\.json$"):
        open_store(tmp_path / "other")
    create_store(tmp_path / "real.zarr", manifest()).close()
    open_store(tmp_path / "real.zarr").close()


def test_an_unknown_recipe_key_suggests_the_close_one():
    recipe = {"method": "supervised", "student": {"model": "x"}, "data": {"train": "a", "val": "b"}, "epochs": 1,
              "batch_size": 8, "output_dir": "o"}  # fmt: skip
    with pytest.raises(
        RecipeError, match=r"^optimiser: unknown key; expected one of \[.*\]; did you mean 'optimizer'\?$"
    ):
        parse_recipe(recipe | {"optimiser": {"lr": 0.1}})
    with pytest.raises(RecipeError, match=r"^data\.img_szie: unknown key; .*; did you mean 'img_size'\?$"):
        parse_recipe(recipe | {"data": {"train": "a", "val": "b", "img_szie": 32}})
    with pytest.raises(RecipeError, match=r"^zzzz: unknown key; expected one of \[[^?]*\]$"):  # nothing close
        parse_recipe(recipe | {"zzzz": 1})


THREADS_PROBE = """
import json, sys
import torch
from distill.threads import choose_threads, cpu_threads
lines = {"library": [cpu_threads(1, "cpu"), torch.get_num_threads()]}  # before a tool chooses: left as they are
choose_threads()
for processes, device in ((2, "cuda"), (2, "cpu"), (1, "cpu")):
    lines[f"{processes} {device}"] = [cpu_threads(processes, device), torch.get_num_threads()]
print(json.dumps(lines))
"""


def threads_of(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-c", THREADS_PROBE], capture_output=True, text=True, cwd=ROOT,
                          env=clean | env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_cpu_run_takes_its_share_of_the_cores_unless_omp_num_threads_says_otherwise():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    unset = threads_of()
    torch_default = unset["library"][1]
    assert unset["library"] == [f"cpu threads: {torch_default} per process (as this program set them)", torch_default]
    assert unset["2 cuda"] == [None, torch_default]  # a GPU run's threads are torch's: nothing set, nothing said
    for processes in (2, 1):
        share = max(1, cores // processes)
        assert unset[f"{processes} cpu"] == [f"cpu threads: {share} per process (set OMP_NUM_THREADS to change)", share]
    given = threads_of(OMP_NUM_THREADS="1")
    assert given["2 cpu"] == given["1 cpu"] == ["cpu threads: 1 per process (OMP_NUM_THREADS=1)", 1]


def test_a_launch_that_started_fewer_processes_than_asked_says_so(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` starts one process, leaving MASTER_ADDR (set for 2) without
    WORLD_SIZE; torchrun and accelerate's multi-process launchers set WORLD_SIZE."""
    from distill.threads import launch_warning

    for name in ("WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    assert launch_warning(1) is None  # no launcher
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert launch_warning(1) is None  # accelerate launch of one process
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # ... of several, which started one
    assert launch_warning(1).startswith("warning: accelerate launch was asked for several processes but started only")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_warning(2) is None
    assert launch_warning(1) == "warning: WORLD_SIZE is 2, but this run has 1 process(es)"


def test_a_finished_run_whose_store_was_deleted_is_not_refused_early(tmp_path):
    """Stores are large and often deleted once students are trained: the early check leaves a finished run's
    folder to the engine (which says it is done), and refuses the same missing store for a run not yet made."""
    from distill.precheck import check_recipe_inputs

    recipe = {"method": "tinyvit", "student": {"model": "resnet18"}, "epochs": 1, "batch_size": 8,
              "data": {"train": "digits", "val": "digits"}, "output_dir": str(tmp_path / "run"),
              "teacher": {"source": f"store:{tmp_path / 'gone.zarr'}"}}  # fmt: skip
    with pytest.raises(RecipeError, match=r"^teacher\.source: the store .*gone\.zarr does not exist"):
        check_recipe_inputs(parse_recipe(recipe))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    check_recipe_inputs(parse_recipe(recipe))
