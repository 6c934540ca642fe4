"""The teacher registry: spec prefix ("timm", "module", "ensemble", "store", "open_clip") -> builder.

Builders are imported on first use, so a store teacher never imports open_clip. Other packages add
prefixes through the `distill.teachers` entry points. Every builder has the signature of
`TeacherBuilder` and is called with the whole spec and the part after "PREFIX:".
"""

from __future__ import annotations

import difflib
import os
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from logit_store.registry import Registry

from .base import Teacher, TeacherError

if TYPE_CHECKING:
    import torch

__all__ = ["TEACHERS", "create_teacher", "parse_bool", "parse_options", "yaml_value"]


class TeacherBuilder(Protocol):
    def __call__(
        self,
        spec: str,
        body: str,
        num_classes: int | None,
        checkpoint: str | os.PathLike[str] | None,
        device: str | torch.device,
    ) -> Teacher: ...


TEACHERS: Registry[TeacherBuilder] = Registry("teacher spec prefix", TeacherError, group="distill.teachers")
TEACHERS.register("timm", "teachers.timm_teacher:create_timm_teacher")
TEACHERS.register("module", "teachers.module_teacher:create_module_teacher")
TEACHERS.register("ensemble", "teachers.ensemble:create_ensemble_teacher")
TEACHERS.register("store", "teachers.store_teacher:create_store_teacher")
TEACHERS.register("open_clip", "teachers.clip_teacher:create_open_clip_teacher")


def create_teacher(
    spec: str,
    num_classes: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> Teacher:
    """Build a teacher from a spec such as "timm:resnet18", "module:pkg.mod:factory",
    "ensemble:timm:resnet18@a.pth,timm:resnet34@b.safetensors", "store:PATH" or "open_clip:NAME"."""
    if not isinstance(spec, str) or not spec.strip():
        raise TeacherError(f"teacher spec must be a non-empty string, got {spec!r}")
    if num_classes is not None and (
        not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1
    ):
        raise TeacherError(f"teacher {spec}: num_classes must be a positive integer, got {num_classes!r}")
    spec = spec.strip()
    prefix, body = split_spec(spec)
    if not body:
        raise TeacherError(f"teacher spec '{spec}' is empty after '{prefix}:'")
    return TEACHERS.get(prefix)(spec, body, num_classes, checkpoint, device)


def split_spec(spec: str) -> tuple[str, str]:
    """(prefix, body) of a teacher spec whose prefix is registered; else a TeacherError listing the known ones,
    with the closest prefix or, for a bare name, the spec it was likely meant as."""
    spec = spec.strip()
    prefix, sep, body = spec.partition(":")
    if sep and prefix in TEACHERS:
        return prefix, body
    known = ", ".join(f"'{p}:'" for p in TEACHERS.names())
    close = difflib.get_close_matches(prefix, TEACHERS.names(), n=1) if sep else []
    hint = f" (did you mean '{close[0]}:{body}'?)" if close else _hint(spec, sep)
    raise TeacherError(f"teacher spec '{spec}' has no known prefix; expected one of {known}{hint}")


def _hint(spec: str, sep: str) -> str:
    """A bare path that holds a store's manifest was meant as a store; any other bare name as a timm model."""
    if sep:
        return ""
    if os.path.exists(os.path.join(os.path.expanduser(spec), "manifest.json")):
        return f" (did you mean 'store:{spec}'?)"
    return f" (did you mean 'timm:{spec}'?)"


def parse_options(body: str, allowed: tuple[str, ...], spec: str, extra: bool = False) -> tuple[str, dict[str, str]]:
    """Split "NAME?key=value&key2=value2" into NAME and its options; a key not in `allowed` is an error,
    unless `extra` (the builder passes such keys to the model)."""
    name, _, query = body.partition("?")
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key or (key not in allowed and not extra):
            expected = ", ".join(f"{k}=VALUE" for k in allowed) or "none"
            raise TeacherError(f"teacher spec '{spec}': unknown option '{item}'; accepted options: {expected}")
        options[key] = value
    return name, options


def yaml_value(text: str) -> Any:
    """A keyword's value in a spec, read as YAML (`0.1`, `[8,4,2,1]`, `true`); other text stays a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_bool(value: str, key: str, spec: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise TeacherError(f"teacher spec '{spec}': option {key}={value!r} is not a boolean (use 1 or 0)")
