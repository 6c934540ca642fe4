"""The command-line tools `distill-train`, `distill-save-logits` and `distill-eval`.

Arguments and recipes are parsed and validated here, before torch and friends are imported: `--help`
and a recipe's error answer in the time Python takes to start. An input error (any `DistillError`)
is one line naming the file, key or option at fault and exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

from logit_store.errors import DistillError, disk_full_named
from logit_store.location import redact_text

from .errors import RecipeError, paths_named
from .files import BadYaml, load_yaml_file
from .precheck import check_recipe_inputs, check_save_inputs
from .recipe import load_recipe_file, parse_recipe
from .save_config import OPTION_TYPES, TEACHER_SPECS, SaveConfig

__all__ = ["eval_parser", "evaluate", "parse_save_config", "save_logits", "save_parser", "train", "train_parser"]

TRAIN_DOC = """Train a student by a method recipe: `distill-train RECIPE.yaml [--set key.path=value ...]`.

Runs as it is on one process, or under `accelerate launch` / `torchrun` with several (data
parallel; `batch_size` is the global batch, so the steps are the same for any process count).
Re-running the same command in the same `output_dir` resumes from the last checkpoint (a finished
run is done: it says so, prints its summary line and writes nothing; more `epochs` extend it); runs
under the recipe's `then` follow in `output_dir/NAME`. Writes `model.safetensors`,
`summary.json`, `metrics.csv`, TensorBoard logs and `training_curves.png` to each run's folder.
"""


def train_parser() -> argparse.ArgumentParser:
    """`distill-train`'s arguments (also what docs/cli.md is generated from)."""
    parser = argparse.ArgumentParser(
        prog="distill-train",
        description=TRAIN_DOC,
        epilog=TEACHER_SPECS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="recipe YAML file (see recipes/configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key")
    return parser


def train(argv: list[str] | None = None) -> int:
    """`distill-train`: prints one JSON line of figures per run."""
    args = train_parser().parse_args(argv)

    def run() -> list[dict[str, Any]]:
        recipe = parse_recipe(load_recipe_file(args.recipe, args.set))
        check_recipe_inputs(recipe)  # what the recipe alone shows wrong, before the engine loads
        from .run import run_recipe  # torch, timm and accelerate load from here on

        with disk_full_named(recipe.output_dir), paths_named(recipe.output_dir):  # any file of the run: logs,
            return run_recipe(recipe)  # trackers, summary (files name themselves)

    ok, summaries = _guarded("distill-train", args.recipe, run, resumes="from its last checkpoint")
    return _report(summaries) if ok else 2


def _report(summaries: list[dict[str, Any]]) -> int:
    """One JSON line of figures per run, from the main process only; then the process group ends."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        for summary in summaries:
            print(json.dumps({k: _rounded(v) for k, v in summary.items() if isinstance(v, int | float | str)}))
    state.destroy_process_group()  # the last run is over (a no-op on one process)
    return 0


# ---- distill-save-logits -------------------------------------------------------------------------------

SAVE_DOC = """Run a teacher once over replayed views and keep its top-k logits in a store.

    distill-save-logits --teacher timm:resnet50 --checkpoint teacher.safetensors \\
        --data PATH --out teacher.zarr --epochs 10 --k 10 [--aug tinyvit] [--img-size 224]

A CLIP teacher (--teacher open_clip:NAME) on image-caption data (--data pairs:FILE.csv,
wds:..., digits-captions) writes an embeddings store instead: its L2-normalised image
embedding of every view and text embedding of every caption (no --k).

Runs as it is on one process, or under `accelerate launch` / `torchrun` with several:
each process computes and writes its own shards. Re-running the same command resumes
after the last committed shard.
"""


_REQUIRED = [f.name for f in fields(SaveConfig) if f.default is MISSING]


def save_parser() -> argparse.ArgumentParser:
    """`distill-save-logits`'s options: one per `SaveConfig` field (also what docs/cli.md is generated from)."""
    parser = argparse.ArgumentParser(
        prog="distill-save-logits",
        description=SAVE_DOC,
        epilog=TEACHER_SPECS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with the same keys as the options (underscores or dashes)")
    parser.add_argument(
        "--from-recipe",
        metavar="RECIPE.yaml",
        help="take data, augmentation, image size, seed and epochs (and the store from teacher.source: store:PATH) "
        "from the training recipe the students will use, so they cannot disagree",
    )
    for f in fields(SaveConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
        else:
            parser.add_argument(
                flag, type=OPTION_TYPES[str(f.type).replace(" | dict", "")], default=None, help=_option_help(f)
            )
    return parser


def parse_save_config(argv: list[str] | None = None) -> SaveConfig:
    """Options from the command line over those of `--config FILE.yaml`."""
    parser = save_parser()
    args = vars(parser.parse_args(argv))
    config_path, recipe_path = args.pop("config"), args.pop("from_recipe")
    values = _read_options(config_path, parser) if config_path else {}
    values |= {key: value for key, value in args.items() if value is not None}
    if recipe_path:
        values = _from_recipe(recipe_path, values, parser)
    missing = [name for name in _REQUIRED if name not in values]
    if missing:
        parser.error(f"missing required option(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
    try:
        return SaveConfig(**values)
    except RecipeError as err:
        parser.error(str(err))
        raise


def _option_help(f: Any) -> str:
    """An option's meaning and its default, or that it is required (and where --from-recipe gives it)."""
    if f.default is not MISSING:
        return f.metadata["help"]
    given = " (required, unless --from-recipe gives it)" if f.name in RECIPE_KEYS else " (required)"
    return f.metadata["help"] + given


def _read_options(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        data = load_yaml_file(path, "a --config file")
    except BadYaml as err:
        parser.error(f"--config {path}: {err}")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of options")
    values = {str(key).replace("-", "_"): value for key, value in data.items()}
    known = {f.name for f in fields(SaveConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"--config {path}: unknown key(s) {unknown}; known: {sorted(known)}")
    return values


# The options a training recipe decides, by the recipe's own key.
RECIPE_KEYS = {"data": "data.train", "aug": "augmentation", "img_size": "data.img_size", "seed": "seed",
               "skip_unreadable": "data.skip_unreadable", "epochs": "epochs", "out": "teacher.source"}  # fmt: skip


def _from_recipe(path: str, values: dict[str, Any], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The options RECIPE_KEYS names, read from a training recipe; giving them too is refused."""
    try:
        recipe = parse_recipe(load_recipe_file(path))
    except DistillError as err:
        parser.error(f"--from-recipe {path}: {err}")
    source = recipe.teacher.source or ""
    taken = {"data": recipe.data.train, "aug": recipe.augmentation, "img_size": recipe.data.img_size,
             "seed": recipe.seed, "skip_unreadable": recipe.data.skip_unreadable, "epochs": recipe.epochs}  # fmt: skip
    if source.startswith("store:"):
        taken["out"] = source.removeprefix("store:")
    both = sorted(set(taken) & set(values))
    if both:
        parser.error(
            f"--from-recipe {path} sets {', '.join(f'--{k.replace(chr(95), chr(45))} ({RECIPE_KEYS[k]})' for k in both)}; "
            "give them in the recipe only"
        )
    return values | taken


def save_logits(argv: list[str] | None = None) -> int:
    """`distill-save-logits`."""
    cfg = parse_save_config(argv)

    def run() -> None:
        check_save_inputs(cfg)  # what the options alone show wrong, before the engine loads
        from .save import run as save  # torch, timm and accelerate load from here on

        with paths_named(cfg.out):
            save(cfg)

    ok, _ = _guarded("distill-save-logits", None, run, resumes="after its last committed shard")
    return 0 if ok else 2


# ---- distill-eval --------------------------------------------------------------------------------------

EVAL_DOC = """Score a finished run's student on any dataset with the run's own evaluation (its method's metrics on
the views of its recipe's evaluation transform); prints one JSON line.

    distill-eval RUN_DIR|WEIGHTS [--data SPEC] [--teacher SPEC [--teacher-checkpoint PATH]]

WEIGHTS is a run's model.safetensors (or checkpoints/best/model.safetensors), or weights of a run moved
elsewhere: they carry their recipe in their metadata. Top-1/top-5 in percent; a CLIP student reports
zero-shot top-1. --teacher scores a live classifier on the same views (teacher_top1, teacher_top5).
"""


def eval_parser() -> argparse.ArgumentParser:
    """`distill-eval`'s arguments (also what docs/cli.md is generated from)."""
    parser = argparse.ArgumentParser(
        prog="distill-eval",
        description=EVAL_DOC,
        epilog=TEACHER_SPECS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", metavar="RUN_DIR|WEIGHTS", help="a run folder or a weights file of a run")
    parser.add_argument("--data", help="dataset spec to score on (default: the run's data.val)")
    parser.add_argument(
        "--teacher", help="a live teacher spec to score on the same views (timm:NAME[?file=PATH&...], see below)"
    )
    parser.add_argument("--teacher-checkpoint", help="the teacher's weights (.safetensors, or .pth)")
    parser.add_argument("--batch-size", type=int, help="evaluation batch (default: the recipe's eval.batch_size)")
    return parser


def evaluate(argv: list[str] | None = None) -> int:
    """`distill-eval`."""
    parser = eval_parser()
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")

    def run() -> dict[str, Any]:
        if not os.path.exists(args.run):  # a typo: said before the engine loads
            raise RecipeError(f"{args.run} does not exist (expected a run folder or a run's .safetensors weights)")
        from .score import score_run  # torch, timm and accelerate load from here on

        return score_run(args.run, args.data, args.teacher, args.teacher_checkpoint, args.batch_size)

    ok, result = _guarded("distill-eval", args.run, run)
    if ok:
        print(json.dumps({k: _rounded(v) for k, v in result.items()}))
    return 0 if ok else 2


# ---- shared --------------------------------------------------------------------------------------------


def _guarded(prog: str, source: str | None, run: Callable[[], Any], resumes: str | None = None) -> tuple[bool, Any]:
    """(True, `run()`), or (False, None) after printing an input error as one line. A command that `resumes`
    (where from, in words) answers Ctrl-C with one line saying so and exit code 130 (128 + SIGINT), as shells do."""
    from logit_store.cli import log_to_stderr  # imported with the run: it loads zarr

    from .threads import choose_threads

    choose_threads()  # a CPU run's threads: cores per process unless OMP_NUM_THREADS says (distill.threads)
    log_to_stderr()  # the store's log lines ("replacing ...") print as plain lines, whatever logging is set up
    try:
        return True, run()
    except DistillError as err:  # credentials of any URL in the message are never printed
        named = source and not str(err).startswith(source)  # a message naming the file already is not told it twice
        print(redact_text(f"{prog}: error: {source + ': ' if named else ''}{err}"), file=sys.stderr)
        return False, None
    except KeyboardInterrupt:
        if resumes is None:
            raise
        if os.environ.get("RANK", "0") == "0":  # once, not from every process of a launch
            print(f"\n{prog}: interrupted; run the same command again to resume {resumes}", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None


INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C (128 + SIGINT)


def _rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) and math.isfinite(value) else value
