"""Ensembles: "ensemble:SPEC1@CKPT1,SPEC2@CKPT2,..." answers log(mean of the members' softmax)."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from .base import Teacher, TeacherError
from .registry import create_teacher

__all__ = ["EnsembleTeacher", "create_ensemble_teacher", "parse_ensemble"]


class EnsembleTeacher(Teacher):
    """Several teachers stored as one: logits = log(mean_i softmax(member_i logits)).

    Those are log-probabilities, which are valid logits: their softmax is the mean distribution.
    `spec` lists the members' specs without their checkpoint paths (the weights are identified
    by `weights_sha256`, the sha256 over the members' hashes in order), so moving a checkpoint
    file does not change the teacher's identity.
    """

    def __init__(self, members: Sequence[Teacher]) -> None:
        members = list(members)
        if not members:
            raise TeacherError("an ensemble needs at least one member")
        not_logits = [m.spec for m in members if m.outputs != "logits"]
        if not_logits:
            raise TeacherError(f"ensemble members must give logits; {', '.join(not_logits)} give embeddings")
        counts = {m.spec: m.num_classes for m in members}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{spec}: {n}" for spec, n in counts.items())
            raise TeacherError(f"ensemble members disagree on num_classes ({listed})")
        self.members = members
        self.num_classes = members[0].num_classes
        self.spec = "ensemble:" + ",".join(m.spec for m in members)
        digest = hashlib.sha256()
        for member in members:
            digest.update(f"{member.spec}={member.weights_sha256}\n".encode())
        self.weights_sha256 = digest.hexdigest()

    def logits(self, images: torch.Tensor, epoch: int | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
        log_probs = torch.stack([m.logits(images, epoch, ids).log_softmax(dim=-1) for m in self.members])
        return log_probs.logsumexp(dim=0) - math.log(len(self.members))

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"members": [m.describe() for m in self.members]}


def parse_ensemble(body: str, spec: str = "") -> list[tuple[str, str | None]]:
    """[(member spec, checkpoint or None)] from "SPEC1@PATH1,SPEC2,..."; a path may not hold a comma."""
    spec = spec or f"ensemble:{body}"
    members = []
    for item in body.split(","):
        member, at, path = item.strip().partition("@")
        if not member or (at and not path):
            raise TeacherError(f"teacher spec '{spec}': malformed member '{item}', expected SPEC or SPEC@CHECKPOINT")
        if member.startswith("ensemble:"):
            raise TeacherError(f"teacher spec '{spec}': ensembles cannot be nested ('{item}')")
        members.append((member, path or None))
    return members


def create_ensemble_teacher(
    spec: str,
    body: str,
    num_classes: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> EnsembleTeacher:
    """Build each member with `create_teacher`; members carry their own checkpoints as SPEC@PATH."""
    if checkpoint is not None:
        raise TeacherError(
            f"teacher {spec}: an ensemble takes no checkpoint ({checkpoint}); give each member its own as SPEC@PATH"
        )
    members = [create_teacher(member, num_classes, path, device) for member, path in parse_ensemble(body, spec)]
    return EnsembleTeacher(members)
