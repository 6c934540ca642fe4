"""StoreTeacher: a teacher that answers from a logit store by (epoch, sample ids), ignoring the images."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from logit_store import LogitStore, NotCommittedError, Records, StoreInputError, open_store
from logit_store.sparse import rebuild_log_probs

from .base import Teacher, TeacherError
from .clip_teacher import EmbeddingStoreTeacher
from .registry import register_teacher

__all__ = ["StoreTeacher", "create_store_teacher"]


class StoreTeacher(Teacher):
    """Answers `logits(images, epoch, ids)` with the stored records rebuilt at T = 1.

    The result is a log-distribution, and log-probabilities are valid logits:
    softmax(logits / T) equals the store's rebuild at temperature T. The images only give the
    batch size and the device of the result. `describe()` is the store manifest's teacher entry.
    """

    def __init__(self, store_or_path: LogitStore | str | os.PathLike[str]) -> None:
        self.store = store_or_path if isinstance(store_or_path, LogitStore) else open_store(store_or_path)
        self.location = str(self.store.location)
        self.spec = f"store:{self.location}"
        self.num_classes = self.store.manifest.num_classes
        self.weights_sha256 = self.store.manifest.teacher.get("weights_sha256")

    def describe(self) -> dict[str, Any]:
        return dict(self.store.manifest.teacher)

    def read(self, epoch: int | None, ids: torch.Tensor | np.ndarray | list[int] | None) -> Records:
        """The stored records of `ids` in `epoch`; a missing epoch, range or id is a TeacherError naming them."""
        if epoch is None or ids is None:
            raise TeacherError(
                f"teacher {self.spec} answers from a logit store: logits() needs the epoch and the sample ids "
                f"(got epoch={epoch!r}, ids={'None' if ids is None else 'given'})"
            )
        ids_np = (ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)).reshape(-1)
        if ids_np.size and ids_np.dtype.kind not in "iu":
            raise TeacherError(f"teacher {self.spec}: ids must be integers, got dtype {ids_np.dtype}")
        try:
            return self.store.read(int(epoch), ids_np.astype(np.int64))
        except (NotCommittedError, StoreInputError) as err:
            raise TeacherError(
                f"logit store {self.location} has no records for epoch {epoch}, ids {_summary(ids_np)}: {err}"
            ) from err

    def logits(self, images: torch.Tensor, epoch: int | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, num_classes] float32 log-probabilities rebuilt from the store, on the images' device."""
        records = self.read(epoch, ids)
        if isinstance(images, torch.Tensor) and images.ndim and images.shape[0] != len(records):
            raise TeacherError(f"teacher {self.spec}: {images.shape[0]} images but {len(records)} ids (epoch {epoch})")
        device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        values = torch.from_numpy(np.ascontiguousarray(records.values)).to(device)
        indices = torch.from_numpy(records.indices.astype(np.int64)).to(device)
        tail_lse = torch.from_numpy(np.ascontiguousarray(records.tail_lse)).to(device)
        return rebuild_log_probs(values, indices, tail_lse, self.num_classes, temperature=1.0)

    def __repr__(self) -> str:
        return f"StoreTeacher({self.location}, num_classes={self.num_classes})"


def _summary(ids: np.ndarray) -> str:
    if ids.size <= 8:
        return str(ids.tolist())
    return f"[{ids.min()}..{ids.max()}] ({ids.size} ids)"


@register_teacher("store")
def create_store_teacher(
    spec: str,
    body: str,
    num_classes: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> StoreTeacher | EmbeddingStoreTeacher:
    """ "store:PATH" (a local path or an fsspec URL): a logits store gives a StoreTeacher, an embeddings store
    an EmbeddingStoreTeacher. device is unused: results follow the images' device."""
    if checkpoint is not None:
        raise TeacherError(f"teacher {spec}: a logit store takes no checkpoint ({checkpoint})")
    try:
        store = open_store(body)
    except Exception as err:
        raise TeacherError(f"teacher {spec}: cannot open the logit store {body}: {err}") from err
    if store.manifest.kind == "embeddings":
        return EmbeddingStoreTeacher(store)  # CLIP embeddings have no classes to check
    teacher = StoreTeacher(store)
    if num_classes is not None and num_classes != teacher.num_classes:
        raise TeacherError(
            f"teacher {spec}: the store holds {teacher.num_classes} classes, but num_classes={num_classes} was asked for"
        )
    return teacher
