"""CLIP teachers: L2-normalised image and text embeddings, from a live open_clip model or an embeddings store.

teacher = create_teacher("open_clip:ViT-B-32", checkpoint="clip.safetensors")   # or "open_clip:ViT-B-32?pretrained=openai"
img = teacher.image_embeddings(images)                 # [B, D] float32, unit rows
txt = teacher.text_embeddings(tokens, ids)            # [B, D]
stored = create_teacher("store:clip_teacher.zarr")    # an embeddings store answers by (epoch, ids)
img = stored.image_embeddings(images, epoch, ids)
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import numpy as np
import open_clip
import torch
from torch import nn

import students  # noqa: F401  (registers the TinyCLIP configs with open_clip)
from logit_store import LogitStore, NotCommittedError, StoreInputError

from .base import TeacherError
from .checkpoint import file_sha256, load_checkpoint, state_dict_sha256
from .registry import parse_options, register_teacher

__all__ = ["EmbeddingStoreTeacher", "EmbeddingTeacher", "OpenCLIPTeacher", "create_open_clip_teacher"]


class EmbeddingTeacher(ABC):
    """A source of a CLIP teacher's L2-normalised embeddings: one per augmented view, one per caption.

    Results are float32 [B, embed_dim] on the device of the images (or tokens), plain tensors.
    """

    spec: str
    embed_dim: int
    weights_sha256: str | None = None

    @abstractmethod
    def image_embeddings(
        self, images: torch.Tensor, epoch: int | None = None, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embeddings of a batch of (already augmented) images."""

    @abstractmethod
    def text_embeddings(self, tokens: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of a batch of captions, given as tokens (live teachers) or by sample id (stores)."""

    def describe(self) -> dict[str, Any]:
        """The teacher entry of a store manifest."""
        return {"spec": self.spec, "weights_sha256": self.weights_sha256, "embed_dim": self.embed_dim}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, embed_dim={self.embed_dim})"


class OpenCLIPTeacher(EmbeddingTeacher):
    """A live open_clip model in eval mode (bfloat16 autocast on CUDA)."""

    def __init__(self, model: nn.Module, spec: str, name: str, device: str | torch.device = "cpu") -> None:
        self.spec, self.name = spec, name
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.context_length = int(model.context_length)
        with torch.inference_mode():
            blank = torch.zeros(1, self.context_length, dtype=torch.long, device=self.device)
            self.embed_dim = int(self.model.encode_text(blank).shape[-1])
        self.tokenizer = open_clip.get_tokenizer(name)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _run(self, encode: Any, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            out = encode(x.to(self.device, non_blocking=True), normalize=True)
        # float32 and outside inference mode, so autograd may save it as a target.
        return torch.nn.functional.normalize(out.float(), dim=-1).to(x.device).clone()

    def image_embeddings(
        self, images: torch.Tensor, epoch: int | None = None, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TeacherError(f"teacher {self.spec}: images must be a floating-point tensor")
        return self._run(self.model.encode_image, images)

    def text_embeddings(self, tokens: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise TeacherError(
                f"teacher {self.spec}: tokens of shape {list(tokens.shape)}, expected [batch, {self.context_length}] "
                "(its context length)"
            )
        return self._run(self.model.encode_text, tokens)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions)


class EmbeddingStoreTeacher(EmbeddingTeacher):
    """Answers from an embeddings store: image embeddings by (epoch, ids), text embeddings by ids."""

    def __init__(self, store: LogitStore) -> None:
        self.store, self.location = store, str(store.location)
        self.spec = f"store:{self.location}"
        self.embed_dim = store.manifest.embed_dim
        self.weights_sha256 = store.manifest.teacher.get("weights_sha256")

    def describe(self) -> dict[str, Any]:
        return dict(self.store.manifest.teacher)

    def _read(self, plane: int, ids: torch.Tensor | None, device: torch.device, what: str) -> torch.Tensor:
        if ids is None:
            raise TeacherError(f"teacher {self.spec} answers from a store: {what} needs the sample ids")
        ids_np = ids.detach().cpu().numpy().reshape(-1).astype(np.int64)
        try:
            rows = self.store.read(plane, ids_np)
        except (NotCommittedError, StoreInputError) as err:
            raise TeacherError(f"embeddings store {self.location} cannot answer {what}: {err}") from err
        return torch.from_numpy(rows.embedding.astype(np.float32)).to(device)

    def image_embeddings(
        self, images: torch.Tensor, epoch: int | None = None, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if epoch is None:
            raise TeacherError(f"teacher {self.spec} answers from a store: image embeddings need the epoch")
        return self._read(int(epoch), ids, images.device, f"image embeddings of epoch {epoch}")

    def text_embeddings(self, tokens: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return self._read(self.store.text_plane, ids, tokens.device, "text embeddings")

    def __repr__(self) -> str:
        return f"EmbeddingStoreTeacher({self.location}, embed_dim={self.embed_dim})"


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


@contextlib.contextmanager
def _quiet_random_init(pretrained: str | None) -> Iterator[None]:
    """open_clip warns on the root logger at every model built without pretrained weights; here that is the intent."""
    if pretrained:
        yield
        return
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@register_teacher("open_clip")
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
    model = create_open_clip_model(name, pretrained, spec)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, what=spec)
    teacher = OpenCLIPTeacher(model, spec, name, device)
    teacher.weights_sha256 = (
        file_sha256(checkpoint) if checkpoint is not None else state_dict_sha256(teacher.model.state_dict())
    )
    return teacher
