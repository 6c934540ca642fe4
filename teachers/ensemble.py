"""Ensembles (as MEAL V2 distils from): "ensemble:SPEC1@CKPT1,SPEC2@CKPT2*0.3,..." answers the log of the members'
weighted mean softmax; a member's weight follows "*" (default 1), the weights are normalised to sum to 1."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import torch

from .base import Teacher, TeacherError
from .registry import create_teacher

__all__ = ["EnsembleTeacher", "create_ensemble_teacher", "parse_ensemble"]


class EnsembleTeacher(Teacher):
    """Several teachers stored as one: logits = log(sum_i w_i softmax(member_i logits)), sum_i w_i = 1.

    Those are log-probabilities, which are valid logits: their softmax is the weighted mean distribution.
    `spec` lists the members' specs (and weights) without their checkpoint paths: the weights are identified
    by `weights_sha256`, the sha256 over the members' hashes and weights in order, so moving a checkpoint
    file does not change the teacher's identity; `describe()` names every member.
    """

    def __init__(self, members: Sequence[Teacher], weights: Sequence[float] | None = None) -> None:
        members = list(members)
        if not members:
            raise TeacherError("an ensemble needs at least one member")
        weights = list(weights) if weights is not None else [1.0] * len(members)
        if len(weights) != len(members) or min(weights) < 0 or not sum(weights):
            raise TeacherError(f"ensemble weights {weights}: one per member, >= 0, not all 0")
        not_logits = [m.spec for m in members if m.outputs != "logits"]
        if not_logits:
            raise TeacherError(f"ensemble members must give logits; {', '.join(not_logits)} give embeddings")
        counts = {m.spec: m.num_classes for m in members}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{spec}: {n}" for spec, n in counts.items())
            raise TeacherError(f"ensemble members disagree on num_classes ({listed})")
        self.members = members
        self.weights = [w / sum(weights) for w in weights]
        self.num_classes = members[0].num_classes
        equal = len(set(self.weights)) == 1  # the plain mean: the spec as it always was
        self.spec = "ensemble:" + ",".join(
            m.spec if equal else f"{m.spec}*{w:g}" for m, w in zip(members, weights, strict=True)
        )
        digest = hashlib.sha256()
        for member, weight in zip(members, self.weights, strict=True):
            digest.update(f"{member.spec}={member.weights_sha256}*{weight!r}\n".encode())
        self.weights_sha256 = digest.hexdigest()

    def logits(self, images: torch.Tensor, epoch: int | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
        log_probs = torch.stack([m.logits(images, epoch, ids).log_softmax(dim=-1) for m in self.members])
        log_weights = torch.tensor(self.weights, dtype=log_probs.dtype, device=log_probs.device).log()
        return (log_probs + log_weights[:, None, None]).logsumexp(dim=0)

    def describe(self) -> dict[str, Any]:
        members = [m.describe() | {"weight": w} for m, w in zip(self.members, self.weights, strict=True)]
        return super().describe() | {"members": members}


def parse_ensemble(body: str, spec: str = "") -> list[tuple[str, str | None, float]]:
    """[(member spec, checkpoint or None, weight)] from "SPEC1@PATH1*0.7,SPEC2,..."; a path may hold neither
    a comma nor a "*"."""
    spec = spec or f"ensemble:{body}"
    members = []
    for item in body.split(","):
        text, _, weight = item.strip().rpartition("*") if "*" in item else (item.strip(), "", "1")
        member, at, path = text.partition("@")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not member or (at and not path) or value < 0:
            raise TeacherError(f"teacher spec '{spec}': malformed member '{item}', expected SPEC[@CHECKPOINT][*WEIGHT]")
        if member.startswith("ensemble:"):
            raise TeacherError(f"teacher spec '{spec}': ensembles cannot be nested ('{item}')")
        members.append((member, path or None, value))
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
    parsed = parse_ensemble(body, spec)
    members = [create_teacher(member, num_classes, path, device) for member, path, _ in parsed]
    return EnsembleTeacher(members, [weight for _, _, weight in parsed])
