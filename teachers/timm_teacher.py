"""timm teachers: "timm:NAME" (random init, or a --checkpoint) and "timm:NAME?pretrained=1"."""

from __future__ import annotations

import difflib
import os

import timm
import torch
from torch import nn

from .base import TeacherError
from .live import ModelTeacher
from .registry import parse_bool, parse_options

__all__ = ["create_timm_model", "create_timm_teacher"]


def create_timm_model(name: str, num_classes: int | None = None, pretrained: bool = False, spec: str = "") -> nn.Module:
    """`timm.create_model(name, pretrained, num_classes)`; an unknown name is a TeacherError with close names."""
    spec = spec or f"timm:{name}"
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else "; see timm.list_models()"
        raise TeacherError(f"teacher {spec}: timm has no model named '{name}'{hint}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as err:
        if pretrained:
            raise TeacherError(
                f"teacher {spec}: the pretrained weights of '{name}' could not be fetched ({type(err).__name__}: {err}); "
                f"download them where there is network access and pass them with --checkpoint PATH "
                f"(.safetensors or .pth), without ?pretrained=1"
            ) from err
        raise TeacherError(f"teacher {spec}: timm could not create '{name}': {err}") from err


def create_timm_teacher(
    spec: str,
    body: str,
    num_classes: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> ModelTeacher:
    """A timm model as a teacher; body is "NAME" or "NAME?pretrained=1"."""
    name, options = parse_options(body, ("pretrained",), spec)
    pretrained = parse_bool(options["pretrained"], "pretrained", spec) if "pretrained" in options else False
    if pretrained and checkpoint is not None:
        raise TeacherError(f"teacher {spec}: give either ?pretrained=1 or a checkpoint ({checkpoint}), not both")
    model = create_timm_model(name, num_classes, pretrained, spec)
    return ModelTeacher(model, spec, num_classes=num_classes, checkpoint=checkpoint, device=device)
