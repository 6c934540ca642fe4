"""Teachers from user code: "module:pkg.mod:factory" calls `factory(num_classes=...)` and expects an nn.Module."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import TeacherError
from .live import ModelTeacher
from .registry import parse_options, yaml_value

__all__ = ["create_module_model", "create_module_teacher", "resolve_factory"]


def resolve_factory(target: str, spec: str = "") -> Callable[..., Any]:
    """The callable named by "pkg.mod:factory" (the factory may be dotted, e.g. "pkg.mod:Class.build")."""
    spec = spec or f"module:{target}"
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise TeacherError(f"teacher spec '{spec}': expected 'module:package.module:factory'")
    try:
        obj: Any = _import_from_here(module_name)
    except ImportError as err:
        raise TeacherError(
            f"teacher {spec}: cannot import module '{module_name}' ({err}); it is looked for on the Python path "
            "and in the working directory: set PYTHONPATH to the folder that holds it"
        ) from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise TeacherError(f"teacher {spec}: module '{module_name}' has no attribute '{attr_path}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TeacherError(f"teacher {spec}: '{target}' is a {type(obj).__name__}, not a callable factory")
    return obj


def _import_from_here(module_name: str) -> Any:
    """Import a module as `python -m` would: the working directory is looked in too (a console script's
    path holds only its own folder)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        top = module_name.split(".")[0]
        here = os.getcwd()
        if err.name != top or here in sys.path or not (Path(here, top).is_dir() or Path(here, f"{top}.py").is_file()):
            raise
        sys.path.append(here)
        return importlib.import_module(module_name)


def accepts_num_classes(factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def create_module_model(
    target: str, num_classes: int | None = None, spec: str = "", kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """Call the factory with `kwargs`, and num_classes when it is given and the factory accepts it."""
    spec = spec or f"module:{target}"
    factory = resolve_factory(target, spec)
    kwargs = dict(kwargs or {})
    if num_classes is not None and accepts_num_classes(factory):
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise TeacherError(f"teacher {spec}: the factory refused its arguments {sorted(kwargs)}: {err}") from err
    if not isinstance(model, nn.Module):
        raise TeacherError(f"teacher {spec}: the factory returned a {type(model).__name__}, expected an nn.Module")
    return model


def create_module_teacher(
    spec: str,
    body: str,
    num_classes: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> ModelTeacher:
    """A model built by user code as a teacher; body is "pkg.mod:factory", with keyword arguments for the factory
    after a "?" (`module:pkg.mod:factory?depth=4&width=[64,128]`, YAML values)."""
    target, options = parse_options(body, (), spec, extra=True)
    model = create_module_model(target, num_classes, spec, {key: yaml_value(v) for key, v in options.items()})
    return ModelTeacher(model, spec, num_classes=num_classes, checkpoint=checkpoint, device=device)
