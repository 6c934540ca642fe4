"""Recipe files: the schema of `distill-train RECIPE.yaml`, validated before anything runs.

A recipe is YAML; every section maps onto a dataclass below. Validation walks the
dataclasses' type hints, so an unknown key, a wrong type or a missing field is reported
with its key path (`optimizer.lr: expected a number, got 'fast'`). The `loss` section's
schema belongs to the method: a `MethodSpec` found by name in `METHODS`, whose entries
come from the `distill.methods` entry points of every installed package. Nothing here
imports torch: a recipe is refused in the time it takes to start Python.

A recipe may name follow-up runs under `then`; each one trains the previous run's result
(see `follow_ups`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from logit_store.registry import Registry

from .augment import load_augmentation
from .errors import RecipeError
from .files import BadYaml, load_yaml_file, load_yaml_text
from .schema import parse_section, to_dict

__all__ = [
    "METHODS",
    "DataConfig",
    "EmaConfig",
    "EvalConfig",
    "FollowUp",
    "MethodSpec",
    "OptimizerConfig",
    "Recipe",
    "RecipeError",
    "RecordConfig",
    "ScheduleConfig",
    "StudentConfig",
    "TeacherConfig",
    "apply_overrides",
    "follow_ups",
    "load_recipe_file",
    "method_config",
    "parse_recipe",
    "parse_section",
    "to_dict",
]


@dataclass
class NoLoss:
    """The `loss` section of a method that has no settings."""


@dataclass(frozen=True)
class MethodSpec:
    """What the recipe layer knows of a method without importing it (and torch).

    `method` is the "module:Class" path of its `distill.method.Method` subclass, imported when a run
    starts; `loss` the dataclass of the recipe's `loss` section; `teacher` whether the method takes
    one ("none", "optional", "required") and `outputs` what it must give ("logits" or "embeddings").
    A package adds a method by an entry point in the `distill.methods` group naming its spec.
    """

    method: str
    loss: type = NoLoss
    teacher: Literal["none", "optional", "required"] = "required"
    outputs: Literal["logits", "embeddings"] = "logits"


# accelerate's log_with names (accelerate.tracking.LOGGER_TYPE_TO_CLASS, written out so recipes validate without it);
# each needs its package installed, which accelerate checks when the run starts.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")

METHODS: Registry[MethodSpec] = Registry("method", RecipeError, group="distill.methods", duplicates="warn")


@dataclass
class StudentConfig:
    model: str  # a timm model name (the `students` package registers more)
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    checkpoint: str | None = None  # initial weights (safetensors or torch.load(weights_only=True))


@dataclass
class RecordConfig:
    """Where a live teacher's outputs go while the student trains (`distill.record`): a logits store as
    distill-save-logits writes it, with the run's views, epochs and seed."""

    path: str  # the store: a path or an fsspec URL (resumed, or grown for more epochs, when it exists)
    k: int  # classes kept per record
    backend: str = "zarr"  # zarr or lmdb (a local path)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise RecipeError(f"k: expected an integer >= 1, got {self.k}")


@dataclass
class TeacherConfig:
    source: str | None = None  # store:PATH, or a live teacher spec as in distill-save-logits
    checkpoint: str | None = None  # a live teacher's weights (with a store source: the fallback's)
    epochs: Literal["strict", "cycle"] = "strict"  # train epoch e reads store epoch e (strict) or e % E (cycle)
    record: RecordConfig | None = None  # a live teacher's outputs kept in a store as the run computes them
    fallback: str | None = None  # a store source's own teacher (live spec): computes what the store lacks


@dataclass
class DataConfig:
    train: str  # dataset spec of the training images: a class-folder PATH, csv:PATH, wds:PATTERN, pairs:PATH, digits
    val: str  # dataset spec of the validation images (same forms)
    img_size: int = 224  # the student's input size, and the size views are made at
    workers: int = 0  # DataLoader worker processes (kept alive between epochs)
    skip_unreadable: bool = False  # drop images that cannot be decoded instead of failing

    def __post_init__(self) -> None:
        if self.workers < 0:  # torch's DataLoader would refuse it only once the run has started
            raise RecipeError(f"workers: expected an integer >= 0, got {self.workers}")


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # any timm optimizer name
    lr: float = 1e-3  # peak learning rate (after warm-up)
    weight_decay: float = 0.05  # the optimizer's weight decay
    momentum: float = 0.9  # for optimizers that take one (sgd, rmsprop)
    clip_grad: float | None = None  # max gradient norm
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.optim.create_optimizer_v2

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise RecipeError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise RecipeError(f"clip_grad: expected a number > 0 or null, got {self.clip_grad}")


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # any timm scheduler name
    warmup_epochs: int = 0  # epochs of linear warm-up from warmup_lr
    warmup_lr: float = 1e-6  # learning rate at the first step of warm-up
    min_lr: float = 0.0  # learning rate the schedule decays to
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.scheduler.create_scheduler_v2


@dataclass
class EmaConfig:
    decay: float = 0.9998  # timm ModelEmaV3's decay per optimizer step


@dataclass
class EvalConfig:
    """Evaluation views: the shorter side resized to img_size / crop_pct, the centre img_size square cropped
    (timm's and the references' evaluation). Unset, crop_pct and interpolation are the student's timm
    defaults (its pretrained config), else timm's 0.875 and bicubic. crop_pct 1.0 keeps the whole of a square
    image: for tiny images such as digits, where a crop would cut the object."""

    every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    batch_size: int = 256  # images per evaluation batch
    crop_pct: float | None = None  # in (0, 1]
    interpolation: Literal["bilinear", "bicubic"] | None = None  # of the resize

    def __post_init__(self) -> None:
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise RecipeError(f"crop_pct: expected a fraction in (0, 1], got {self.crop_pct}")


@dataclass
class Recipe:
    method: str  # a name in METHODS (the distill.methods entry points)
    student: StudentConfig  # the model trained
    data: DataConfig  # the images
    epochs: int  # training epochs (a store must hold as many, or teacher.epochs: cycle)
    batch_size: int  # images per optimizer step, summed over processes and accumulation steps
    output_dir: str  # the run's folder: checkpoints, model.safetensors, summary.json, logs
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # where the targets come from
    augmentation: str | dict[str, Any] = "basic"  # preset, YAML file, or Augmentation fields
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # timm's create_optimizer_v2
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # timm's create_scheduler_v2, stepped per step
    ema: EmaConfig | None = None  # with EMA, the EMA weights are the run's result
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation views and cadence
    loss: dict[str, Any] = field(default_factory=dict)  # the method's section: its MethodSpec.loss fields
    seed: int = 0  # init, sampling order, and the replay seed (must equal a store's global seed)
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is still the step's images)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # null: the launcher's (accelerate config, env)
    sync_bn: bool | None = None  # BatchNorm over all processes; null: on when there are several and BatchNorm
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # accelerate's log_with names; CSV always
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints (0: end of epoch only)
    log_every: int = 10  # optimizer steps between logged training metrics
    then: list[dict[str, Any]] = field(default_factory=list)  # follow-up runs on this run's result

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            _positive(self, name)
        _positive(self.data, "img_size", "data.")
        _positive(self.eval, "every", "eval.")
        _positive(self.eval, "batch_size", "eval.")
        if self.checkpoint_every < 0:
            raise RecipeError(f"checkpoint_every: expected >= 0, got {self.checkpoint_every}")
        unknown = sorted(set(self.trackers) - set(TRACKERS))
        if unknown:
            raise RecipeError(f"trackers: unknown {unknown}; accelerate's are {list(TRACKERS)} (CSV is always kept)")


def parse_recipe(raw: dict[str, Any]) -> Recipe:
    """A validated Recipe: its schema, the method and its loss section, the augmentation, the teacher the
    method takes, and every follow-up run under `then`. Errors name the key path."""
    _check_teacher_keys(raw)
    recipe = parse_section(Recipe, raw, "")
    method_config(recipe)
    try:
        load_augmentation(recipe.augmentation)
    except RecipeError as err:
        raise RecipeError(f"augmentation: {err}") from None
    for run in follow_ups(recipe):
        try:
            parse_recipe(run.recipe)
        except RecipeError as err:
            raise RecipeError(f"then[{run.index}].{err}") from None
    return recipe


def _check_teacher_keys(raw: Any) -> None:
    """A teacher key the section does not have (kwargs, file, class_map...): its options go in the spec."""
    section = raw.get("teacher") if isinstance(raw, dict) else None
    known = {f.name for f in dataclasses.fields(TeacherConfig)}
    unknown = sorted(str(key) for key in section if key not in known) if isinstance(section, dict) else []
    if unknown:
        raise RecipeError(
            f"teacher.{unknown[0]}: not a key (teacher takes {', '.join(sorted(known))}); a live teacher's options "
            "go in its spec: source: timm:NAME?file=PATH&class_map=FILE&img_size=32 (model keyword arguments as "
            "KEY=VALUE, YAML values; `distill-train --help` lists the specs)"
        )


def method_config(recipe: Recipe) -> tuple[MethodSpec, Any]:
    """The recipe's method spec and its parsed `loss` section; checks the teacher the method takes."""
    try:
        spec = METHODS.get(recipe.method)
    except RecipeError as err:
        raise RecipeError(f"method: {err}") from None
    loss = parse_section(spec.loss, recipe.loss, "loss")
    source = recipe.teacher.source
    if spec.teacher == "none" and source:
        raise RecipeError(f"teacher.source: method {recipe.method!r} trains on labels only and takes no teacher")
    if spec.teacher == "required" and not source:
        raise RecipeError(f"teacher.source: method {recipe.method!r} needs a teacher: store:PATH or a live spec")
    _check_record_keys(recipe.teacher, spec, recipe.method)
    return spec, loss


def _check_record_keys(teacher: TeacherConfig, spec: MethodSpec, method: str) -> None:
    """teacher.record takes a live logits teacher; teacher.fallback a store source."""
    is_store = (teacher.source or "").strip().startswith("store:")
    if teacher.record is not None:
        if not teacher.source or is_store:
            raise RecipeError("teacher.record: records a live teacher's outputs; teacher.source must be a live spec")
        if spec.outputs != "logits":
            raise RecipeError(f"teacher.record: method {method!r} learns from embeddings; only logits are recorded")
    if teacher.fallback is not None:
        if not is_store:
            raise RecipeError("teacher.fallback: computes what a store lacks; teacher.source must be store:PATH")
        if teacher.fallback.strip().startswith("store:"):
            raise RecipeError(f"teacher.fallback: expected a live teacher spec, got {teacher.fallback!r}")
        if spec.outputs != "logits":
            raise RecipeError(f"teacher.fallback: method {method!r} learns from embeddings; only logits are topped up")


# ---- follow-up runs --------------------------------------------------------------------------------------

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class FollowUp:
    """A run under `then`: it trains the previous run's result in `output_dir/name`.

    `recipe` holds the main recipe's sections with the item's over them (a section the item gives
    replaces the main one whole; another `method` drops the main `loss` and `teacher`), and as its student the
    main student with the item's `student` fields over it, a placeholder until the previous run
    has finished: then the student is that run's result with `student_changes` over it.
    """

    index: int
    name: str
    recipe: dict[str, Any]
    student_changes: dict[str, Any]


def follow_ups(recipe: Recipe) -> list[FollowUp]:
    """The runs of `recipe.then`, in order (see FollowUp)."""
    main = {k: v for k, v in to_dict(recipe).items() if k != "then"}
    runs, names = [], set()
    for i, item in enumerate(recipe.then):
        where = f"then[{i}]"
        if not isinstance(item, dict):
            raise RecipeError(f"{where}: expected a mapping (a recipe without student and output_dir)")
        item = copy.deepcopy(item)
        name = item.pop("name", f"then_{i + 1}")
        if not isinstance(name, str) or not _RUN_NAME.fullmatch(name) or name in names:
            raise RecipeError(f"{where}.name: expected a distinct folder name (letters, digits, _ . -), got {name!r}")
        names.add(name)
        for key in ("output_dir", "then"):
            if key in item:
                raise RecipeError(f"{where}.{key}: set by the main recipe (output_dir/{name}); leave it out")
        changes = item.pop("student", {})
        if not isinstance(changes, dict) or not set(changes) <= {f.name for f in dataclasses.fields(StudentConfig)}:
            raise RecipeError(f"{where}.student: expected a mapping of student fields to change in the result")
        other_method = item.get("method", recipe.method) != recipe.method
        base = {k: v for k, v in main.items() if not (other_method and k in ("loss", "teacher"))}
        raw = base | item | {"output_dir": str(Path(recipe.output_dir) / name), "student": main["student"] | changes}
        runs.append(FollowUp(i, name, raw, changes))
    return runs


def _positive(obj: Any, name: str, prefix: str = "") -> None:
    if getattr(obj, name) < 1:
        raise RecipeError(f"{prefix}{name}: expected an integer >= 1, got {getattr(obj, name)}")


# ---- files and overrides ---------------------------------------------------------------------------------


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`key.path=value` pairs over a recipe mapping; values are parsed as YAML (`lr=3e-4`, `ema=null`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected KEY.PATH=VALUE")
        *parents, leaf = key.split(".")
        node = data
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {'.'.join(parents[: i + 1])} is not a mapping")
            node = child
        try:
            node[leaf] = load_yaml_text(raw) if raw else ""
        except BadYaml as err:  # `[unclosed`, a `!!python/object` tag, an alias bomb
            raise RecipeError(
                f"--set {item!r}: expected a YAML value (a number, a string, [a, list], {{a: mapping}}, null): {err}"
            ) from None
    return data


def load_recipe_file(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The recipe mapping of a YAML file with `--set` overrides applied (validated by the trainer).

    Read by `load_yaml_file`: a regular file of at most MAX_YAML_BYTES (a FIFO would hang, /dev/zero never end)
    within its alias and depth caps."""
    try:
        data = load_yaml_file(path, "a recipe")
    except BadYaml as err:
        raise RecipeError(f"recipe {path}: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: expected a mapping of sections, got {type(data).__name__}")
    return apply_overrides(data, list(overrides))
