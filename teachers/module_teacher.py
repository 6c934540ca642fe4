"""Teachers from user code: "module:pkg.mod:factory" calls `factory(num_classes=...)` and expects an nn.Module."""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .base import TeacherError
from .live import ModelTeacher

__all__ = ["create_module_model", "create_module_teacher", "resolve_factory"]


def resolve_factory(target: str, spec: str = "") -> Callable[..., Any]:
    """The callable named by "pkg.mod:factory" (the factory may be dotted, e.g. "pkg.mod:Class.build")."""
    spec = spec or f"module:{target}"
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise TeacherError(f"teacher spec '{spec}': expected 'module:package.module:factory'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise TeacherError(f"teacher {spec}: cannot import module '{module_name}': {err}") from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise TeacherError(f"teacher {spec}: module '{module_name}' has no attribute '{attr_path}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TeacherError(f"teacher {spec}: '{target}' is a {type(obj).__name__}, not a callable factory")
    return obj


def accepts_num_classes(factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def create_module_model(target: str, num_classes: int | None = None, spec: str = "") -> nn.Module:
    """Call the factory, passing num_classes when it is given and the factory accepts it."""
    spec = spec or f"module:{target}"
    factory = resolve_factory(target, spec)
    model = factory(num_classes=num_classes) if num_classes is not None and accepts_num_classes(factory) else factory()
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
    """A model built by user code as a teacher; body is "pkg.mod:factory"."""
    model = create_module_model(body, num_classes, spec)
    return ModelTeacher(model, spec, num_classes=num_classes, checkpoint=checkpoint, device=device)
