"""CLIP teachers: a live open_clip model's L2-normalised image and text embeddings ("open_clip:NAME").

teacher = create_teacher("open_clip:ViT-B-32", checkpoint="clip.safetensors")   # or "open_clip:ViT-B-32?pretrained=openai"
img = teacher.image_embeddings(images)                 # [B, D] float32, unit rows
txt = teacher.text_embeddings(tokens)                 # [B, D]

An embeddings store ("store:PATH") answers the same calls by (epoch, ids): `teachers.store_teacher`.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from collections.abc import Iterator
from typing import Any

import open_clip
import torch
from torch import nn

import students.tinyclip  # noqa: F401  (registers the TinyCLIP configs with open_clip)

from .base import TeacherError
from .live import LiveTeacher
from .registry import parse_options

__all__ = ["OpenCLIPTeacher", "create_open_clip_model", "create_open_clip_teacher"]


class OpenCLIPTeacher(LiveTeacher):
    """A live open_clip model: L2-normalised image embeddings of views, text embeddings of caption tokens."""

    outputs = "embeddings"

    def __init__(
        self,
        model: nn.Module,
        spec: str,
        name: str,
        checkpoint: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(model, spec, checkpoint, device)
        self.name = name
        self.context_length = int(model.context_length)
        blank = torch.zeros(1, self.context_length, dtype=torch.long)
        self.embed_dim = int(self._run(self.model.encode_text, blank).shape[-1])
        self.tokenizer = open_clip.get_tokenizer(name)

    def _embed(self, encode: Any, x: torch.Tensor) -> torch.Tensor:
        out = self._run(lambda v: encode(v, normalize=True), x)
        return torch.nn.functional.normalize(self._target(out, x), dim=-1)

    def image_embeddings(
        self, images: torch.Tensor, epoch: int | None = None, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TeacherError(f"teacher {self.spec}: images must be a floating-point tensor")
        return self._embed(self.model.encode_image, images)

    def text_embeddings(self, tokens: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise TeacherError(
                f"teacher {self.spec}: tokens of shape {list(tokens.shape)}, expected [batch, {self.context_length}] "
                "(its context length)"
            )
        return self._embed(self.model.encode_text, tokens)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions)


def create_open_clip_model(name: str, pretrained: str | None = None, spec: str = "") -> nn.Module:
    """`open_clip.create_model(name, pretrained)`; an unknown name or unavailable weights name the spec."""
    spec = spec or f"open_clip:{name}"
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else "; see open_clip.list_models()"
        raise TeacherError(f"teacher {spec}: open_clip has no model config named '{name}'{hint}")
    try:
        with _quiet_random_init(pretrained):
            return open_clip.create_model(name, pretrained=pretrained)
    except Exception as err:
        if pretrained:
            raise TeacherError(
                f"teacher {spec}: the pretrained weights '{pretrained}' of '{name}' could not be loaded "
                f"({type(err).__name__}: {err}); download them where there is network access and pass the file "
                "as the checkpoint (.safetensors or .pth), without ?pretrained="
            ) from err
        raise TeacherError(f"teacher {spec}: open_clip could not create '{name}': {err}") from err


_OPEN_CLIP_DIR = os.path.dirname(os.path.abspath(open_clip.__file__)) + os.sep


def _not_open_clip_warning(record: logging.LogRecord) -> bool:
    """A root-logger filter: False (drop) for a record of warning level or below from open_clip's own files."""
    return record.levelno > logging.WARNING or not os.path.abspath(record.pathname).startswith(_OPEN_CLIP_DIR)


@contextlib.contextmanager
def _quiet_random_init(pretrained: str | None) -> Iterator[None]:
    """open_clip warns at every model built without pretrained weights, and here that is the intent. It has no
    logger of its own (it calls `logging.warning`, the root logger), so raising a level would silence every
    library: instead, while the model is built, the root logger drops the warnings that open_clip's files log
    on it. A root-logger filter sees only records logged on the root logger itself, never other loggers'."""
    if pretrained:
        yield
        return
    root = logging.getLogger()
    root.addFilter(_not_open_clip_warning)
    try:
        yield
    finally:
        root.removeFilter(_not_open_clip_warning)


def create_open_clip_teacher(
    spec: str,
    body: str,
    num_classes: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> OpenCLIPTeacher:
    """ "open_clip:NAME" with a checkpoint file, or "open_clip:NAME?pretrained=TAG"; num_classes is unused."""
    name, options = parse_options(body, ("pretrained",), spec)
    pretrained = options.get("pretrained")
    if pretrained and checkpoint is not None:
        raise TeacherError(f"teacher {spec}: give either ?pretrained=TAG or a checkpoint ({checkpoint}), not both")
    return OpenCLIPTeacher(create_open_clip_model(name, pretrained, spec), spec, name, checkpoint, device)
