"""A run's files on disk (imports nothing heavy, so the policy is checked before torch loads): the output-dir policy, resumable checkpoints and the final weights.

Policy: a run writes into its `output_dir` only. Re-running the same recipe there resumes from the
last checkpoint; another recipe's run, a finished run (summary.json) or a folder that holds no run
of this toolkit is refused, naming the first differing key; nothing is ever overwritten.

Checkpoints are accelerate's `save_state` under `checkpoints/step_N`, written as `step_N.partial`
and made visible by one rename, so a kill at any moment leaves the previous one intact.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import RecipeError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn

__all__ = ["check_output_dir", "remove_checkpoints", "save_checkpoint", "save_weights", "write_recipe"]

RECIPE_FILE = "recipe.yaml"
SUMMARY_FILE = "summary.json"


def check_output_dir(out: Path, resolved: dict[str, Any]) -> Path | None:
    """Check `out` can take this run (reads only); the checkpoint to resume from, if any."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output_dir {out} is a file, not a folder")
    if (out / SUMMARY_FILE).exists():
        raise RecipeError(f"output_dir {out} holds a finished run ({SUMMARY_FILE}): choose another output_dir")
    saved = out / RECIPE_FILE
    if saved.exists():
        previous = yaml.safe_load(saved.read_text())
        if not same_run(previous, resolved):
            key = _first_difference(previous, resolved)
            raise RecipeError(
                f"output_dir {out} holds a run of another recipe ({key} differs): choose another output_dir"
            )
    elif out.exists() and any(out.iterdir()):
        raise RecipeError(f"output_dir {out} is not empty and holds no run of this toolkit (no {RECIPE_FILE})")
    checkpoints = sorted((out / "checkpoints").glob("step_*[0-9]"))
    return checkpoints[-1] if checkpoints else None


def same_run(saved: Any, resolved: dict[str, Any]) -> bool:
    """Whether a run's saved recipe is this recipe's run: equal but for the follow-ups under `then`, which
    do not change this run (they are runs of their own, in folders of their own)."""
    return isinstance(saved, dict) and {k: v for k, v in saved.items() if k != "then"} == {
        k: v for k, v in resolved.items() if k != "then"
    }


def write_recipe(out: Path, resolved: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    return path or "the recipe"


def save_checkpoint(accelerator: Accelerator, out: Path, step: int) -> None:
    """accelerate's state into checkpoints/step_N, made visible by one rename; older ones removed after."""
    final = out / "checkpoints" / f"step_{step:08d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        partial.rename(final)
        for old in (out / "checkpoints").glob("step_*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def remove_checkpoints(out: Path) -> None:
    """A finished run's result is its weights: its resumable state goes."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def save_weights(model: nn.Module, path: Path) -> None:
    """A safetensors state dict. Clones, so weights shared between modules are written under every name
    and the file loads into any copy of the model as a plain state dict."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(path))
