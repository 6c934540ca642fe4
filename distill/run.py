"""A recipe's runs: the main one in `output_dir`, then each follow-up under `then` in `output_dir/NAME`.

A follow-up trains what the run before it produced (`Method.result_student`, recorded in that
run's summary.json), with the follow-up's own `student` fields over it: Cream retrains the
path its search chose, a TinyCLIP pruning stage prunes the model the stage before left,
a fine-tune starts from the pretrained weights. Every run is checked before the first one
starts; re-running the recipe skips the runs that finished (saying so, their summaries returned as they
are: a recipe whose runs all finished is done, and writes nothing) and resumes the one that did not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from .checkpoint import RECIPE_FILE, SUMMARY_FILE, same_run, saved_recipe
from .errors import RecipeError
from .plan import Plan, make_plan
from .recipe import Recipe, follow_ups, parse_recipe, parse_section, to_dict
from .trainer import Trainer

__all__ = ["run_recipe"]


def run_recipe(raw: dict[str, Any] | Recipe) -> list[dict[str, Any]]:
    """Train a recipe (a mapping as in a recipe file, or a parsed Recipe) and its follow-ups; the summary of
    each run, in order (of a finished one, its summary.json). A recipe that cannot run is a RecipeError (or
    another DistillError) naming its key."""
    recipe = raw if isinstance(raw, Recipe) else parse_recipe(raw)
    runs: list[tuple[str | None, Recipe, dict[str, Any]]] = [(None, recipe, {})]
    runs += [(f.name, parse_recipe(f.recipe), f.student_changes) for f in follow_ups(recipe)]
    state = PartialState(cpu=not torch.cuda.is_available())
    # Check every run before the first one writes anything; a finished run is kept, with its summary.
    summaries: list[dict[str, Any] | None] = []
    for i, (name, run, changes) in enumerate(runs):
        previous = summaries[-1] if summaries else None
        if previous is not None:  # its result is known: this run's recipe is final
            runs[i] = (name, run := _with_student(run, previous["result_student"] | changes), changes)
        summary = _finished_summary(run) if i == 0 or previous is not None else None
        if summary is None:
            _named(name, lambda run=run: make_plan(run, state.num_processes, state.device, build_student=False))
        summaries.append(summary)
    for (_, run, _), summary in zip(runs, summaries, strict=True):
        if summary is not None and state.is_main_process:  # done: kept as it is, nothing written
            print(f"already finished: {run.output_dir} ({SUMMARY_FILE})", flush=True)
    for i, (name, run, changes) in enumerate(runs):
        if summaries[i] is not None:
            continue
        if i > 0:  # the previous run has just finished: its result is this run's student
            run = _with_student(run, summaries[i - 1]["result_student"] | changes)
        plan = _named(name, lambda run=run: make_plan(run, state.num_processes, state.device))
        try:
            summaries[i] = Trainer(plan).fit()
        finally:
            if plan.lock is not None:  # (fit lets it go; this is for a Trainer that failed before fit)
                plan.lock.release()
    return summaries


def _with_student(run: Recipe, student: dict[str, Any]) -> Recipe:
    return parse_section(Recipe, to_dict(run) | {"student": student}, "")


def _finished_summary(run: Recipe) -> dict[str, Any] | None:
    """The summary of this very run when its output_dir holds it finished, else None."""
    out = Path(run.output_dir)
    if not (out / SUMMARY_FILE).exists() or not (out / RECIPE_FILE).exists():
        return None
    if not same_run(saved_recipe(out), to_dict(run)):
        return None  # another recipe's run: the plan refuses it, naming the key
    return json.loads((out / SUMMARY_FILE).read_text())


def _named(name: str | None, build: Callable[[], Plan]) -> Plan:
    """Errors of a follow-up's plan name it: `then.NAME: ...`."""
    try:
        return build()
    except RecipeError as err:
        raise RecipeError(f"then.{name}: {err}" if name else str(err)) from None
