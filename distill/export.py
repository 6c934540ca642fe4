"""A finished run's weights as timm users keep them, and the way back from them to the run.

`export_model` writes `model.safetensors` with its metadata (the architecture, its keyword arguments, the
class count and names, the input size, mean/std and the evaluation transform, the method and the run's
recipe) and, for a timm student, a `config.json` beside it in timm's `pretrained_cfg` form (timm's own
`save_config_for_hf`), so that

    timm.create_model("local-dir:RUN_DIR", pretrained=True)

rebuilds the student and `timm.data.resolve_data_config` + `create_transform` its evaluation without this
toolkit. `find_run` goes back: from a run folder or any weights file of a run (its checkpoints included),
the recipe that built it, read from the folder or from the weights' metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from .checkpoint import CHECKPOINTS, RECIPE_FILE, public, save_weights
from .errors import RecipeError
from .files import MAX_DEPTH, nesting_depth
from .recipe import load_recipe_file
from .views import EvalView

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "eval_config",
    "export_model",
    "find_run",
    "metadata_value",
    "untrusted_json",
    "weights_metadata",
]

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
# What a timm pretrained_cfg says of the weights it names (where they come from, what they were trained on, their
# licence and paper): kept in config.json only for a student that started from those weights (student.kwargs
# pretrained: true), and stripped from any weights distill-eval is given (it fetches nothing). What describes the
# model's input (mean, std, input_size, crop_pct, interpolation) always stays.
WEIGHTS_SOURCE_KEYS = frozenset(
    {"tag", "hf_hub_id", "hf_hub_filename", "url", "file", "source", "state_dict", "origin_url", "license",
     "paper_ids", "paper_name", "notes"}
)  # fmt: skip
RECIPE_KEY = "distill.recipe"  # the run's recipe (credentials redacted), as JSON, in the weights' metadata


def eval_config(view: EvalView) -> dict[str, Any]:
    """The evaluation transform in timm's data-config keys (`resolve_data_config`, `create_transform`)."""
    return {
        "input_size": (3, view.img_size, view.img_size),
        "interpolation": view.interpolation.value,
        "mean": tuple(view.mean),
        "std": tuple(view.std),
        "crop_pct": view.crop_pct,
        "crop_mode": "center",
    }


def weights_metadata(
    model: nn.Module, recipe: dict[str, Any], view: EvalView, class_names: list[str]
) -> dict[str, str]:
    """The safetensors metadata of a run's weights (string values, as the format requires)."""
    fields = {
        "architecture": recipe["student"]["model"],
        "model_args": recipe["student"].get("kwargs") or {},
        "num_classes": getattr(model, "num_classes", len(class_names)),
        "label_names": class_names,
        "method": recipe["method"],
    } | eval_config(view)
    return {"format": "pt"} | {k: json.dumps(v) for k, v in fields.items()} | {RECIPE_KEY: json.dumps(public(recipe))}


def export_model(model: nn.Module, out: Path, recipe: dict[str, Any], view: EvalView, class_names: list[str]) -> None:
    """`out/model.safetensors` with its metadata, and `out/config.json` when the student is a timm model."""
    save_weights(model, out / WEIGHTS_FILE, weights_metadata(model, recipe, view, class_names))
    if getattr(model, "pretrained_cfg", None) is None:  # not a timm model (an open_clip one): weights alone
        return
    from timm.models._hub import save_config_for_hf  # (timm exports it from no public module)

    names = {"label_names": class_names} if class_names else {}
    source_cfg = model.pretrained_cfg
    if not (recipe["student"].get("kwargs") or {}).get("pretrained"):  # its tag would claim weights it never had
        model.pretrained_cfg = {k: v for k, v in source_cfg.items() if k not in WEIGHTS_SOURCE_KEYS}
    try:
        save_config_for_hf(model, str(out / CONFIG_FILE), model_config=names, data_config=eval_config(view))
    finally:
        model.pretrained_cfg = source_cfg


def find_run(target: str | Path) -> tuple[dict[str, Any], Path, dict[str, str]]:
    """(the recipe, the weights, their metadata) of a run folder, of a weights file in one
    (`RUN/model.safetensors`, `RUN/checkpoints/best/model.safetensors`), or of weights carrying their recipe in
    their metadata."""
    path = Path(target)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise RecipeError(f"{target}: expected a run folder with {WEIGHTS_FILE} or a .safetensors file; none found")
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own errors for a file that is not one
        raise RecipeError(f"{weights}: not a readable safetensors file: {err}") from None
    folders = [weights.parent] + ([weights.parents[2]] if weights.parent.parent.name == CHECKPOINTS else [])
    for folder in folders:
        if (folder / RECIPE_FILE).is_file():  # read as any recipe is: its aliases and depth capped
            return load_recipe_file(folder / RECIPE_FILE), weights, metadata
    if RECIPE_KEY not in metadata:
        raise RecipeError(
            f"{weights}: no {RECIPE_FILE} beside it and no recipe in its metadata (weights of a run of this "
            "toolkit carry one); give the run folder"
        )
    recipe = metadata_value(metadata, RECIPE_KEY, weights)
    if not isinstance(recipe, dict):
        raise RecipeError(f"{weights}: metadata {RECIPE_KEY}: expected a recipe mapping, got {type(recipe).__name__}")
    return recipe, weights, metadata


def metadata_value(metadata: dict[str, str], key: str, weights: Path) -> Any:
    """The JSON value of `key` in the metadata of `weights` (None when absent), decoded as untrusted JSON."""
    return None if key not in metadata else untrusted_json(metadata[key], f"{weights}: metadata {key}")


def untrusted_json(text: str, where: str) -> Any:
    """JSON from a file that came from elsewhere: a RecipeError naming `where` when it does not parse or nests
    deeper than MAX_DEPTH (json recurses per level: a deep enough document is a RecursionError, and anything
    walking a merely deep one later may be)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise RecipeError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:
        raise RecipeError(f"{where}: not valid JSON: {err}") from None
    if nesting_depth(value) > MAX_DEPTH:
        raise RecipeError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    return value
