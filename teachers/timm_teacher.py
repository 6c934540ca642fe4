"""timm teachers: "timm:NAME" with options and model keyword arguments after a "?".

    timm:resnet50                                   random init, or the weights of --checkpoint
    timm:resnet50?pretrained=1                      timm's pretrained weights (downloaded, or timm's cache)
    timm:resnet50?file=resnet50.safetensors         pretrained weights from a local file (timm's
                                                    pretrained_cfg_overlay=dict(file=...))
    timm:hf-hub:timm/resnet50.a1_in1k?pretrained=1  a Hugging Face hub name
    timm:tiny_vit_5m_224?window_sizes=[8,4,2,1]&drop_path_rate=0.1   model kwargs (YAML values)
    timm:vit_tiny_patch16_224?img_size=32&file=in1k.safetensors      a ViT at another input size: a teacher is
                                                    built at its name's size unless the spec says img_size (timm
                                                    resamples pretrained position embeddings to it)

A pretrained head with another class count than the data's is refused, naming both, unless
`class_map=FILE` says which teacher class each data class is (one teacher index per line, in the
data's class order): the teacher's logits are then those classes' columns. With a checkpoint the
model is built for the data's classes and the checkpoint must fit it.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .base import TeacherError
from .live import ModelTeacher
from .registry import parse_bool, parse_options, yaml_value

__all__ = ["create_timm_model", "create_timm_teacher"]

OPTIONS = ("pretrained", "file", "class_map")


def create_timm_model(name: str, spec: str, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, **kwargs)`; an unknown name is a TeacherError with close names."""
    hub = name.startswith(("hf-hub:", "hf_hub:"))
    if not name or not (hub or timm.is_model(name)):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else "; see timm.list_models()"
        raise TeacherError(f"teacher {spec}: timm has no model named '{name}'{hint}")
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as err:  # keyword arguments the model refuses
        raise TeacherError(f"teacher {spec}: timm could not create '{name}': {err}") from err
    except Exception as err:
        if kwargs.get("pretrained"):
            raise TeacherError(
                f"teacher {spec}: the pretrained weights of '{name}' could not be loaded ({type(err).__name__}: "
                f"{err}); download them where there is network access and give the file with ?file=PATH or "
                "--checkpoint PATH"
            ) from err
        raise


def create_timm_teacher(
    spec: str,
    body: str,
    num_classes: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> ModelTeacher:
    """A timm model as a teacher (see the module docstring)."""
    name, options = parse_options(body, OPTIONS, spec, extra=True)
    kwargs = {key: yaml_value(value) for key, value in options.items() if key not in OPTIONS}
    pretrained = parse_bool(options.get("pretrained", "0"), "pretrained", spec) or "file" in options
    if pretrained and checkpoint is not None:
        raise TeacherError(f"teacher {spec}: give either pretrained weights or a checkpoint ({checkpoint}), not both")
    if pretrained:
        overlay = {"pretrained_cfg_overlay": {"file": options["file"]}} if "file" in options else {}
        model = create_timm_model(name, spec, pretrained=True, **overlay, **kwargs)  # its own head
        indices = _class_indices(model, options.get("class_map"), num_classes, spec)
        return ModelTeacher(model, spec, class_indices=indices, device=device)
    if "class_map" in options:
        raise TeacherError(f"teacher {spec}: class_map selects classes of a pretrained head; give ?pretrained=1")
    model = create_timm_model(name, spec, **kwargs, **({} if num_classes is None else {"num_classes": num_classes}))
    return ModelTeacher(model, spec, num_classes=num_classes, checkpoint=checkpoint, device=device)


def _class_indices(model: nn.Module, class_map: str | None, num_classes: int | None, spec: str) -> list[int] | None:
    """The teacher's class of each data class from `class_map`; refuse a head that does not fit the data."""
    classes = int(getattr(model, "num_classes", 0))
    if class_map is None:
        if num_classes is not None and classes != num_classes:
            raise TeacherError(
                f"teacher {spec} has {classes} classes but the data has {num_classes}: give ?class_map=FILE (the "
                f"teacher's class index of each data class, one per line) or --checkpoint with a {num_classes}-class "
                "head; a new random head would teach nothing"
            )
        return None
    try:
        indices = [int(line) for line in Path(class_map).read_text().split()]
    except (OSError, ValueError) as err:
        raise TeacherError(f"teacher {spec}: class_map {class_map}: one integer per line expected ({err})") from err
    if num_classes is not None and len(indices) != num_classes:
        raise TeacherError(
            f"teacher {spec}: class_map {class_map} has {len(indices)} lines, the data {num_classes} classes"
        )
    if not all(0 <= i < classes for i in indices):
        raise TeacherError(
            f"teacher {spec}: class_map {class_map} names classes outside the teacher's 0..{classes - 1}"
        )
    return indices
