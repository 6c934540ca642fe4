"""StoreTeacher: a teacher replayed from a store by (epoch, sample ids), ignoring the images.

A logits store answers `logits` (its records rebuilt at T = 1); an embeddings store answers
`image_embeddings` by (epoch, ids) and `text_embeddings` by ids (its text plane).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from logit_store import LogitStore, NotCommittedError, StoreError, StoreInputError, open_store
from logit_store.sparse import rebuild_log_probs

from .base import Teacher, TeacherError

__all__ = ["StoreTeacher", "create_store_teacher"]


class StoreTeacher(Teacher):
    """Answers from a store (see the module docstring); `describe()` is the store manifest's teacher entry.

    Logits come back as a log-distribution, and log-probabilities are valid logits: softmax(logits / T)
    equals the store's rebuild at temperature T.
    """

    def __init__(self, store_or_path: LogitStore | str | os.PathLike[str]) -> None:
        self.store = store_or_path if isinstance(store_or_path, LogitStore) else open_store(store_or_path)
        m = self.store.manifest
        self.location = str(self.store.location)
        self.spec = f"store:{self.location}"
        self.outputs = "embeddings" if m.kind == "embeddings" else "logits"
        self.num_classes, self.embed_dim = m.num_classes, m.embed_dim
        self.weights_sha256 = m.teacher.get("weights_sha256")

    def describe(self) -> dict[str, Any]:
        return dict(self.store.manifest.teacher)

    def read(self, epoch: int | None, ids: torch.Tensor | np.ndarray | list[int] | None, what: str = "records") -> Any:
        """The stored records of `ids` in plane `epoch`; a missing plane, range or id is a TeacherError naming them."""
        if epoch is None or ids is None:
            raise TeacherError(
                f"teacher {self.spec} answers from a store: {what} need the epoch and the sample ids "
                f"(got epoch={epoch!r}, ids={'None' if ids is None else 'given'})"
            )
        ids_np = (ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)).reshape(-1)
        if ids_np.size and ids_np.dtype.kind not in "iu":
            raise TeacherError(f"teacher {self.spec}: ids must be integers, got dtype {ids_np.dtype}")
        try:
            return self.store.read(int(epoch), ids_np.astype(np.int64))
        except (NotCommittedError, StoreInputError) as err:
            raise TeacherError(
                f"store {self.location} has no {what} for epoch {epoch}, ids {_summary(ids_np)}: {err}"
            ) from err

    def logits(self, images: torch.Tensor, epoch: int | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, num_classes] float32 log-probabilities rebuilt from the store, on the images' device."""
        if self.outputs != "logits":
            raise self._not_given("logits")
        records = self.read(epoch, ids)
        if isinstance(images, torch.Tensor) and images.ndim and images.shape[0] != len(records):
            raise TeacherError(f"teacher {self.spec}: {images.shape[0]} images but {len(records)} ids (epoch {epoch})")
        device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        values = torch.from_numpy(np.ascontiguousarray(records.values)).to(device)
        indices = torch.from_numpy(records.indices.astype(np.int64)).to(device)
        tail_lse = torch.from_numpy(np.ascontiguousarray(records.tail_lse)).to(device)
        return rebuild_log_probs(values, indices, tail_lse, self.num_classes, temperature=1.0)

    def image_embeddings(
        self, images: torch.Tensor, epoch: int | None = None, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._embeddings(epoch, ids, images.device, f"image embeddings of epoch {epoch}")

    def text_embeddings(self, tokens: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.outputs != "embeddings":
            raise self._not_given("embeddings")
        return self._embeddings(self.store.text_plane, ids, tokens.device, "text embeddings")

    def _embeddings(self, plane: int | None, ids: torch.Tensor | None, device: torch.device, what: str) -> torch.Tensor:
        if self.outputs != "embeddings":
            raise self._not_given("embeddings")
        rows = self.read(plane, ids, what)
        return torch.from_numpy(rows.embedding.astype(np.float32)).to(device)


def _summary(ids: np.ndarray) -> str:
    if ids.size <= 8:
        return str(ids.tolist())
    return f"[{ids.min()}..{ids.max()}] ({ids.size} ids)"


def create_store_teacher(
    spec: str,
    body: str,
    num_classes: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> StoreTeacher:
    """ "store:PATH" (a local path or an fsspec URL), of either kind. device is unused: results follow the
    images' device. A logits store must hold `num_classes` classes when that is given."""
    if checkpoint is not None:
        raise TeacherError(f"teacher {spec}: a store takes no checkpoint ({checkpoint})")
    try:
        teacher = StoreTeacher(open_store(body))
    except StoreError as err:
        raise TeacherError(f"teacher {spec}: cannot open the store: {err}") from err
    if teacher.outputs == "logits" and num_classes is not None and num_classes != teacher.num_classes:
        raise TeacherError(
            f"teacher {spec}: the store holds {teacher.num_classes} classes, but num_classes={num_classes} was asked for"
        )
    return teacher
