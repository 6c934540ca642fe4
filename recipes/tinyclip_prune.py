"""TinyCLIP automatic inheritance in progressive stages: `python -m recipes.tinyclip_prune RECIPE.yaml [--set ...]`.

One command prunes a CLIP model (usually the teacher itself) in stages and then distils the result (see
recipes/tinyclip_prune_digits.yaml):

1. stage k (k = 1, 2, ...): an ordinary `tinyclip` run (`distill.train.train`, in this process) of the `stage`
   section with `loss.prune` (`recipes.tinyclip`): masks are learnt toward the stage's target sparsity, then the
   model is physically pruned. `keep` lists the fraction of the original model (masked towers, without the
   token embedding) kept after each stage, e.g. [0.75, 0.5, 0.25]; stage k's target, relative to the model
   entering it, is `1 - keep[k] / keep[k - 1]` (`stage_target_sparsities`). Stage 1 starts from `student`;
   each later stage from the previous stage's pruned model.
2. final (optional): the `final` section, an ordinary distill-train recipe (method `tinyclip` unless it says
   otherwise), trains the last pruned model without masks.

The `stage` and `final` sections are distill-train recipes without `student` and `output_dir` (filled in:
`output_dir/stage_k`, `output_dir/final`), and the stage's `loss.prune` without `target_sparsity` (filled in).
Outputs in `output_dir`: recipe.yaml, stage_k/ (full runs, each with pruned_model.json and
pruned_model.safetensors), final/, summary.json. A re-run of the same recipe skips the runs that finished
(summary.json) and resumes an unfinished one from its checkpoints.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distill.method import get_method
from distill.recipe import Recipe, RecipeError, StudentConfig, parse_section, to_dict
from distill.train import recipe_cli
from distill.train import train as train_run
from students.clip_pruning import stage_target_sparsities

__all__ = ["TinyClipPruneRecipe", "final_recipe", "main", "run", "stage_recipe"]

FILLED = ("student", "output_dir")


@dataclass
class TinyClipPruneRecipe:
    output_dir: str
    student: StudentConfig  # the model entering stage 1: usually the teacher's config and checkpoint
    keep: list[float]  # fraction of the original model kept after each stage, decreasing
    stage: dict[str, Any]  # a tinyclip recipe with loss.prune, for every stage (student, output_dir filled in)
    final: dict[str, Any] | None = None  # a distill-train recipe for the last pruned model (likewise)

    def __post_init__(self) -> None:
        if not self.keep:
            raise RecipeError("keep: expected at least one fraction")
        before = 1.0
        for i, kept in enumerate(self.keep):
            if not 0 < kept < before:
                raise RecipeError(f"keep[{i}]: expected a fraction in (0, {before:g}) (decreasing), got {kept}")
            before = kept


def _filled(section: dict[str, Any], name: str, student: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    given = [key for key in FILLED if key in section]
    if given:
        raise RecipeError(f"{name}.{given[0]}: set by the tinyclip_prune recipe; leave it out")
    return copy.deepcopy(section) | {"student": student, "output_dir": str(output_dir)}


def stage_recipe(cfg: TinyClipPruneRecipe, k: int, student: dict[str, Any]) -> dict[str, Any]:
    """Stage k's (1-based) distill-train recipe."""
    raw = _filled(cfg.stage, "stage", student, Path(cfg.output_dir) / f"stage_{k}")
    if raw.setdefault("method", "tinyclip") != "tinyclip":
        raise RecipeError(f"stage.method: the pruning stages run method tinyclip, got {raw['method']!r}")
    prune = raw.get("loss", {}).get("prune") if isinstance(raw.get("loss"), dict) else None
    if not isinstance(prune, dict):
        raise RecipeError("stage.loss.prune: missing; the stages need it (ramp_steps, ...) without target_sparsity")
    if "target_sparsity" in prune:
        raise RecipeError("stage.loss.prune.target_sparsity: set from keep for each stage; leave it out")
    target = stage_target_sparsities([1.0, *cfg.keep])[k - 1]
    raw["loss"]["prune"] = prune | {"target_sparsity": target}
    return raw


def final_recipe(cfg: TinyClipPruneRecipe, student: dict[str, Any]) -> dict[str, Any]:
    raw = _filled(cfg.final or {}, "final", student, Path(cfg.output_dir) / "final")
    raw.setdefault("method", "tinyclip")
    return raw


def pruned_student(stage_dir: Path) -> dict[str, Any]:
    return {"model": str(stage_dir / "pruned_model.json"), "checkpoint": str(stage_dir / "pruned_model.safetensors")}


def check(raw: dict[str, Any], section: str) -> None:
    """Validate a filled-in run recipe before anything runs; errors name the keys under `section`."""
    try:
        recipe = parse_section(Recipe, raw, "")
        method_cls = get_method(recipe.method)
        method_cls(parse_section(method_cls.LossConfig, recipe.loss, "loss"), 1)
    except RecipeError as err:
        raise RecipeError(f"{section}.{err}") from None


def run_once(raw: dict[str, Any]) -> dict[str, Any]:
    """distill-train the recipe, or read the summary of its finished run."""
    done = Path(raw["output_dir"]) / "summary.json"
    return json.loads(done.read_text()) if done.exists() else train_run(raw)


def run(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate a tinyclip_prune recipe mapping, run its stages and final run; return the summary it writes."""
    cfg = parse_section(TinyClipPruneRecipe, raw, "")
    out = Path(cfg.output_dir)
    students = [to_dict(cfg.student)] + [pruned_student(out / f"stage_{k}") for k in range(1, len(cfg.keep) + 1)]
    stages = [stage_recipe(cfg, k, students[k - 1]) for k in range(1, len(cfg.keep) + 1)]
    final = final_recipe(cfg, students[-1]) if cfg.final is not None else None
    for recipe, section in [*((r, "stage") for r in stages), *([(final, "final")] if final else [])]:
        check(recipe, section)
    resolved = to_dict(cfg)
    saved = out / "recipe.yaml"
    started = any(Path(r["output_dir"]).exists() for r in [*stages, *([final] if final else [])])
    if started and saved.exists() and yaml.safe_load(saved.read_text()) != resolved:
        raise RecipeError(f"output_dir {out} holds a run of another tinyclip_prune recipe: choose another output_dir")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(resolved, sort_keys=False))

    rows, kept = [], 1.0
    for k, recipe in enumerate(stages, start=1):
        result = run_once(recipe)
        kept *= 1 - result["pruned_sparsity"]
        rows.append({
            "stage": k,
            "target_sparsity": recipe["loss"]["prune"]["target_sparsity"],
            "sparsity": result["pruned_sparsity"],
            "kept": kept,
            "keep": cfg.keep[k - 1],
            "params": result["pruned_params"],
            "tower_params": result["pruned_tower_params"],
            "tower_params_before": result["tower_params"],
            "top1": result["top1"],
            "top5": result["top5"],
            "pruned_model": result["pruned_model"],
        })  # fmt: skip
        print(f"stage {k}: towers {rows[-1]['tower_params']} params, kept {kept:.3f} (keep {cfg.keep[k - 1]:g}), "
              f"zero-shot top-1 {result['top1']:.2f}", flush=True)  # fmt: skip
    summary: dict[str, Any] = {
        "stages": rows,
        "kept": kept,
        "params": rows[-1]["params"],
        "top1": rows[-1]["top1"],
        "top5": rows[-1]["top5"],
    }
    if final is not None:
        result = run_once(final)
        summary["final"] = {key: result[key] for key in ("params", "top1", "top5", "epochs")}
        summary |= {"top1": result["top1"], "top5": result["top5"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    return recipe_cli("tinyclip_prune", __doc__, run, argv, ("params", "kept", "top1", "top5"))


if __name__ == "__main__":
    sys.exit(main())
