"""Recipe files: the schema of `distill-train RECIPE.yaml`, validated before anything runs.

A recipe is YAML; every section maps onto a dataclass below. Validation walks the
dataclasses' type hints, so an unknown key, a wrong type or a missing field is reported
with its key path (`optimizer.lr: expected a number, got 'fast'`). The `loss` section's
schema belongs to the method (`Method.LossConfig`), so it is validated once the method
is known.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "DataConfig",
    "EmaConfig",
    "EvalConfig",
    "OptimizerConfig",
    "Recipe",
    "RecipeError",
    "ScheduleConfig",
    "StudentConfig",
    "TeacherConfig",
    "apply_overrides",
    "load_recipe_file",
    "parse_section",
    "to_dict",
]


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the key path at fault."""


@dataclass
class StudentConfig:
    model: str  # a timm model name (the `students` package registers more)
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    checkpoint: str | None = None  # initial weights (safetensors or torch.load(weights_only=True))


@dataclass
class TeacherConfig:
    source: str | None = None  # store:PATH, or a live teacher spec as in distill-save-logits
    checkpoint: str | None = None  # a live teacher's weights
    epochs: Literal["strict", "cycle"] = "strict"  # train epoch e reads store epoch e (strict) or e % E (cycle)


@dataclass
class DataConfig:
    train: str
    val: str
    img_size: int = 224
    workers: int = 0
    skip_unreadable: bool = False


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # any timm optimizer name
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    clip_grad: float | None = None  # max gradient norm
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.optim.create_optimizer_v2


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # any timm scheduler name
    warmup_epochs: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0


@dataclass
class EmaConfig:
    decay: float = 0.9998


@dataclass
class EvalConfig:
    every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    batch_size: int = 256


@dataclass
class Recipe:
    method: str  # a module in recipes/ (e.g. tinyvit, supervised) or a dotted module path
    student: StudentConfig
    data: DataConfig
    epochs: int
    batch_size: int  # images per optimizer step, summed over processes and accumulation steps
    output_dir: str
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    augmentation: str | dict[str, Any] = "basic"  # preset, YAML file, or AugRecipe fields
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EmaConfig | None = None  # with EMA, the EMA weights are the run's result
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: dict[str, Any] = field(default_factory=dict)  # the method's LossConfig fields
    seed: int = 0  # init, sampling order, and the replay seed (must equal a store's global seed)
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints (0: end of epoch only)
    log_every: int = 10  # optimizer steps between logged training metrics

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            _positive(self, name)
        _positive(self.data, "img_size", "data.")
        _positive(self.eval, "every", "eval.")
        _positive(self.eval, "batch_size", "eval.")
        if self.checkpoint_every < 0:
            raise RecipeError(f"checkpoint_every: expected >= 0, got {self.checkpoint_every}")


def _positive(obj: Any, name: str, prefix: str = "") -> None:
    if getattr(obj, name) < 1:
        raise RecipeError(f"{prefix}{name}: expected an integer >= 1, got {getattr(obj, name)}")


# ---- validation ------------------------------------------------------------------------------------------


def parse_section(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from `data`, checking keys and types; errors name `path.key`."""
    where = path or "the recipe"
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RecipeError(f"{_join(path, unknown[0])}: unknown key; expected one of {sorted(known)}")
    values = {}
    for name, f in known.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(f"{_join(path, name)}: missing required field ({_describe(hints[name])})")
            continue
        values[name] = _coerce(hints[name], data[name], _join(path, name))
    try:
        return cls(**values)
    except RecipeError as err:
        raise RecipeError(f"{path + ': ' if path else ''}{err}") from None


def _coerce(kind: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, path)
            except RecipeError as err:
                errors.append(err)
        deeper = [e for e in errors if str(e).startswith(path + ".")]  # the value had the right shape
        if deeper:
            raise deeper[0]
        raise RecipeError(f"{path}: expected {_describe(kind)}, got {_show(value)}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{path}: expected one of {list(args)}, got {_show(value)}")
        return value
    if dataclasses.is_dataclass(kind):
        return parse_section(kind, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list, got {_show(value)}")
        return [_coerce(args[0], item, f"{path}[{i}]") for i, item in enumerate(value)] if args else list(value)
    if origin is dict or kind is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise RecipeError(f"{path}: expected a mapping with string keys, got {_show(value)}")
        return dict(value)
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind in (int, str, bool) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise RecipeError(f"{path}: expected {_describe(kind)}, got {_show(value)}")


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + str(list(args))
    if dataclasses.is_dataclass(kind) or origin is dict or kind is dict:
        return "a mapping"
    if origin is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, str(kind))


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, dict | list) else type(value).__name__


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ---- files and overrides ---------------------------------------------------------------------------------


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` as a string (its floats need a dot); recipes mean a number."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.[\d_]+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: plain data only


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
        node[leaf] = _load_yaml(raw) if raw else ""
    return data


def load_recipe_file(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The recipe mapping of a YAML file with `--set` overrides applied (validated by the trainer)."""
    try:
        data = _load_yaml(Path(path).read_text())
    except OSError as err:
        raise RecipeError(f"recipe {path}: cannot read: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: expected a mapping of sections, got {_show(data)}")
    return apply_overrides(data, list(overrides))


def to_dict(obj: Any) -> Any:
    """A recipe (or section) back to plain YAML-able data."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
