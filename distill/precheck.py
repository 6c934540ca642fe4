"""Input errors the command line and the recipe alone show, found before torch and timm load.

Loading the engine takes seconds (a minute on a loaded machine); a typo in a teacher spec, a store path that
does not exist or a `--k` larger than the data's classes should not wait for it. Each check here needs
only the spec, the file system and the class sub-folders of a folder dataset, and raises the error the
engine would raise later (a `RecipeError` naming the option or key). What it cannot tell without the
engine (a csv's or tar shards' classes, a remote store) it leaves to the engine.
"""

from __future__ import annotations

import os

from teachers.registry import TeacherError, split_spec

from .errors import RecipeError
from .recipe import Recipe, follow_ups, parse_recipe
from .save_config import SaveConfig

__all__ = ["check_recipe_inputs", "check_save_inputs", "known_classes"]

DIGITS_CLASSES = 10  # scikit-learn's digits (distill.data_digits)


def check_teacher(spec: str, where: str) -> None:
    """A teacher spec's prefix is a registered one, and a local `store:PATH` exists."""
    try:
        prefix, body = split_spec(spec)
    except TeacherError as err:
        raise RecipeError(f"{where}: {err}") from None
    if prefix == "store" and body and ("://" not in body or body.startswith("file://")):
        path = body.removeprefix("file://")  # as the store's location reads it (no ~ expansion)
        if not os.path.exists(path):
            raise RecipeError(
                f"{where}: the store {body} does not exist; write it first with distill-save-logits "
                "(--from-recipe takes its options from the training recipe)"
            )


def check_recipe_inputs(recipe: Recipe) -> None:
    """The teacher of the run and of each follow-up under `then` (see the module docstring)."""
    if recipe.teacher.source and not _finished(recipe):
        check_teacher(recipe.teacher.source, "teacher.source")
        if recipe.teacher.fallback:
            check_teacher(recipe.teacher.fallback, "teacher.fallback")
    for run in follow_ups(recipe):
        parsed = parse_recipe(run.recipe)
        source = parsed.teacher.source
        if source and source != recipe.teacher.source and not _finished(parsed):
            check_teacher(source, f"then[{run.index}].teacher.source")


def _finished(recipe: Recipe) -> bool:
    """A run whose folder holds a finished run: the engine says whether it is this recipe's (done, whatever
    became of its store since) or another's, so nothing is refused here."""
    return os.path.exists(os.path.join(recipe.output_dir, "summary.json"))


def check_save_inputs(cfg: SaveConfig) -> None:
    """distill-save-logits' teacher spec, and `--k` against the classes of the data where they can be counted."""
    check_teacher(cfg.teacher, "--teacher")
    prefix = cfg.teacher.strip().partition(":")[0]
    if cfg.k is None or prefix in ("open_clip", "store"):  # embeddings, or a store's own shape: the engine's
        return
    classes = known_classes(cfg.data)
    if classes and cfg.k > classes:
        raise RecipeError(f"--k {cfg.k} is larger than the {classes} classes of {cfg.data}")


def known_classes(spec: str) -> int | None:
    """The class count of `digits` (10) or of a class-folder PATH (its sub-folders, as `FolderDataset` counts
    them); None for any other spec, or a folder without sub-folders (unlabelled: the teacher's classes)."""
    if spec == "digits":
        return DIGITS_CLASSES
    if ":" in spec and not os.path.exists(os.path.expanduser(spec)):  # csv:, wds:, pairs:, ...
        return None
    root = os.path.expanduser(spec)
    try:
        return sum(1 for e in os.scandir(root) if not e.name.startswith(".") and e.is_dir()) or None
    except OSError:  # not there, not a folder: the dataset's own error, from the engine
        return None
