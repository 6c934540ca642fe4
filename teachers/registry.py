"""The teacher registry: spec prefix ("timm", "module", "ensemble", "store") -> builder, and `create_teacher`."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import torch

from .base import Teacher, TeacherError

__all__ = ["create_teacher", "list_teachers", "parse_options", "register_teacher"]


class TeacherBuilder(Protocol):
    def __call__(
        self,
        spec: str,
        body: str,
        num_classes: int | None,
        checkpoint: str | os.PathLike[str] | None,
        device: str | torch.device,
    ) -> Teacher: ...


_TEACHERS: dict[str, TeacherBuilder] = {}


def register_teacher(prefix: str) -> Callable[[TeacherBuilder], TeacherBuilder]:
    """Decorator registering a builder for specs "PREFIX:BODY"; it is called with the whole spec and the body."""

    def wrap(fn: TeacherBuilder) -> TeacherBuilder:
        if prefix in _TEACHERS and _TEACHERS[prefix] is not fn:
            raise TeacherError(f"teacher prefix '{prefix}' is already registered")
        _TEACHERS[prefix] = fn
        return fn

    return wrap


def list_teachers() -> list[str]:
    """The registered spec prefixes."""
    return sorted(_TEACHERS)


def create_teacher(
    spec: str,
    num_classes: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> Teacher:
    """Build a teacher from a spec such as "timm:resnet18", "module:pkg.mod:factory",
    "ensemble:timm:resnet18@a.pth,timm:resnet34@b.safetensors" or "store:PATH"."""
    if not isinstance(spec, str) or not spec.strip():
        raise TeacherError(f"teacher spec must be a non-empty string, got {spec!r}")
    if num_classes is not None and (
        not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1
    ):
        raise TeacherError(f"teacher {spec}: num_classes must be a positive integer, got {num_classes!r}")
    spec = spec.strip()
    prefix, sep, body = spec.partition(":")
    known = ", ".join(f"'{p}:'" for p in list_teachers())
    if not sep or prefix not in _TEACHERS:
        hint = f" (did you mean 'timm:{spec}'?)" if not sep else ""
        raise TeacherError(f"teacher spec '{spec}' has no known prefix; expected one of {known}{hint}")
    if not body:
        raise TeacherError(f"teacher spec '{spec}' is empty after '{prefix}:'")
    return _TEACHERS[prefix](spec, body, num_classes, checkpoint, device)


def parse_options(body: str, allowed: tuple[str, ...], spec: str) -> tuple[str, dict[str, str]]:
    """Split "NAME?key=value&key2=value2" into NAME and its options; unknown keys are an error."""
    name, _, query = body.partition("?")
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            expected = ", ".join(f"{k}=VALUE" for k in allowed) or "none"
            raise TeacherError(f"teacher spec '{spec}': unknown option '{item}'; accepted options: {expected}")
        options[key] = value
    return name, options


def parse_bool(value: str, key: str, spec: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise TeacherError(f"teacher spec '{spec}': option {key}={value!r} is not a boolean (use 1 or 0)")
