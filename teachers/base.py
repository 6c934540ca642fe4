"""The one teacher interface: logits or CLIP embeddings for a batch of views, live or replayed from a store."""

from __future__ import annotations

from abc import ABC
from typing import TYPE_CHECKING, Any, Literal

from logit_store import DistillError, LogitStore

if TYPE_CHECKING:
    import torch

__all__ = ["Teacher", "TeacherError"]


class TeacherError(DistillError):
    """A teacher that cannot be built or cannot answer; the message names the spec, file or key at fault."""


class Teacher(ABC):
    """A source of a teacher's outputs for a batch of (already augmented) views.

    `outputs` says what it gives: "logits" (`logits`: float32 [B, num_classes]) or "embeddings"
    (`image_embeddings`, `text_embeddings`: L2-normalised float32 [B, embed_dim]). Results are on
    the images' (or tokens') device, as plain tensors that a backpropagated loss may use as targets.

    `store` is the logit store a teacher replays, None for a live model: a replayed teacher answers
    by (epoch, ids) and ignores the images, and holds `store.manifest.epochs` epochs of views.
    `model` is the one live module behind a live teacher (for methods that hook into it), None for a store
    or an ensemble; `context_length` the caption tokens a live CLIP teacher reads, None otherwise.
    """

    spec: str
    outputs: Literal["logits", "embeddings"] = "logits"
    num_classes: int = 0
    embed_dim: int = 0
    weights_sha256: str | None = None
    store: LogitStore | None = None
    model: torch.nn.Module | None = None
    context_length: int | None = None

    def logits(self, images: torch.Tensor, epoch: int | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, num_classes] float32 logits for a batch of views."""
        raise self._not_given("logits")

    def image_embeddings(
        self, images: torch.Tensor, epoch: int | None = None, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, embed_dim] L2-normalised embeddings of a batch of views."""
        raise self._not_given("embeddings")

    def text_embeddings(self, tokens: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, embed_dim] L2-normalised embeddings of captions: by tokens (live) or by sample id (store)."""
        raise self._not_given("embeddings")

    @property
    def source(self) -> str:
        """How a run names its teacher: "store:LOCATION" (credentials redacted) or "live:SPEC"."""
        return f"store:{self.store.location}" if self.store is not None else f"live:{self.spec}"

    def describe(self) -> dict[str, Any]:
        """The teacher entry of a store manifest: spec, weights_sha256 and the output width."""
        width = {"embed_dim": self.embed_dim} if self.outputs == "embeddings" else {"num_classes": self.num_classes}
        return {"spec": self.spec, "weights_sha256": self.weights_sha256, **width}

    def _not_given(self, what: str) -> TeacherError:
        return TeacherError(f"teacher {self.spec} gives {self.outputs}, not {what}")

    def __repr__(self) -> str:
        width = f"embed_dim={self.embed_dim}" if self.outputs == "embeddings" else f"num_classes={self.num_classes}"
        return f"{type(self).__name__}(spec={self.spec!r}, {width})"
