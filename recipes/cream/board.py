"""Cream's prioritized paths: the board of best paths, the meta-matching network and its bilevel update.

Each training step samples a student path from the supernet. The board keeps the best ``size``
paths seen so far; a meta-matching network scores how well each board path suits the student,
the best-scoring one becomes its teacher, and ``m = sigmoid(-score)`` mixes the losses::

    loss = (m * KD(student, teacher) + (2 - m) * CE(student, labels)) / 2

Every few hundred steps ``meta_update`` trains the meta network through a one-step unrolled
(bilevel) update: a virtual SGD step of the student on that loss, then the held-out CE at the
virtual weights is backpropagated to the meta network.

Admission follows the reference's rule: a path enters a full board when its held-out score beats the
worst entry's by more than ``margin`` (5 points in the reference), or beats it at all with fewer FLOPs.
Held-out scores and the outputs the board keeps are measured in eval mode (BN running statistics), so
held-out images never move the supernet's statistics.

Three bugs of the reference implementation are avoided on purpose:

- a board entry holds the candidate path's *own* outputs, not its teacher's (``update_board``
  evaluates the candidate itself; ``PrioritizedBoard.update`` takes ``outputs`` from the caller);
- the teacher and ``m`` come from the *best* matching score, not the last entry's (``select_teacher``);
- admission ranks by a *held-out* score, never training-batch accuracy (``heldout_score`` is the
  only score ``PrioritizedBoard.update`` accepts, and it is keyword-only so calls say what they pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from distill.losses import soft_target_cross_entropy

__all__ = [
    "BoardEntry",
    "MetaMatchingNetwork",
    "MetaUpdateResult",
    "PrioritizedBoard",
    "eval_logits",
    "evaluate_path",
    "kd_weight",
    "meta_update",
    "prioritized_loss",
    "select_teacher",
    "update_board",
]

PathKey = tuple  # a path as a hashable tuple (flat ints, or one tuple per stage)


def _path_key(path: Sequence[Any]) -> PathKey:
    if len(path) and isinstance(path[0], Sequence):
        return tuple(tuple(int(c) for c in stage) for stage in path)
    return tuple(int(c) for c in path)


@dataclass(frozen=True)
class BoardEntry:
    """A path on the board: its held-out score, FLOPs and its own logits on the fixed meta batch."""

    path: PathKey
    heldout_score: float
    flops: int
    outputs: torch.Tensor  # [meta_batch, num_classes], detached

    @property
    def rank_key(self) -> tuple[float, int]:
        """Larger is better: higher held-out score first, then fewer FLOPs."""
        return (self.heldout_score, -self.flops)


class PrioritizedBoard:
    """The best ``size`` paths, ordered best first.

    Ordering: higher ``heldout_score`` is better; on equal scores fewer FLOPs is better (the reference's
    reversed tuple sort keeps the costlier one); entries equal in both keep their arrival order (the
    older ranks higher). A candidate is admitted when the board is not full, or its score exceeds the
    worst entry's by more than ``margin``, or exceeds it at all with fewer FLOPs; it then evicts the
    worst. Candidates over ``flops_limit`` are refused. Offering a path already on the board replaces
    its old entry with the new measurement (the shared weights have moved since).
    """

    def __init__(self, size: int = 10, flops_limit: int | None = None, margin: float = 0.0) -> None:
        if size < 1:
            raise ValueError(f"board size must be at least 1, got {size}")
        if margin < 0:
            raise ValueError(f"admission margin must be >= 0, got {margin}")
        self.size = size
        self.flops_limit = flops_limit
        self.margin = margin  # in score units: 0.05 is the reference's 5 points of top-1
        self._entries: list[BoardEntry] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[BoardEntry]:
        return iter(self._entries)

    def __getitem__(self, index: int) -> BoardEntry:
        return self._entries[index]

    def __contains__(self, path: Sequence[Any]) -> bool:
        key = _path_key(path)
        return any(e.path == key for e in self._entries)

    @property
    def is_full(self) -> bool:
        return len(self._entries) >= self.size

    @property
    def entries(self) -> tuple[BoardEntry, ...]:
        return tuple(self._entries)

    @property
    def worst(self) -> BoardEntry | None:
        return self._entries[-1] if self._entries else None

    def best(self, flops_limit: int | None = None) -> BoardEntry | None:
        """Best entry within ``flops_limit`` (the final architecture pick); None if none fits."""
        return next((e for e in self._entries if flops_limit is None or e.flops <= flops_limit), None)

    def would_admit(self, heldout_score: float, flops: int) -> bool:
        """Whether a new path with this held-out score and FLOPs would get on the board."""
        if self.flops_limit is not None and flops > self.flops_limit:
            return False
        if not self.is_full:
            return True
        worst = self._entries[-1]
        better = heldout_score > worst.heldout_score
        return heldout_score > worst.heldout_score + self.margin or (better and flops < worst.flops)

    def update(self, path: Sequence[Any], *, heldout_score: float, flops: int, outputs: torch.Tensor) -> bool:
        """Offer a candidate; return whether it was admitted.

        ``heldout_score``: its score on held-out data (e.g. top-1 on a held-out batch), never on the
        training batch it was just trained on. ``outputs``: *this path's* logits on the fixed meta batch.
        """
        key = _path_key(path)
        self._entries = [e for e in self._entries if e.path != key]
        if not self.would_admit(heldout_score, flops):
            return False
        entry = BoardEntry(key, float(heldout_score), int(flops), outputs.detach().clone())
        # Stable sort on the negated key: best first, and equal entries keep arrival order.
        self._entries = sorted([*self._entries, entry], key=lambda e: (-e.heldout_score, e.flops))
        del self._entries[self.size :]
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "flops_limit": self.flops_limit,
            "margin": self.margin,
            "entries": [
                {"path": e.path, "heldout_score": e.heldout_score, "flops": e.flops, "outputs": e.outputs}
                for e in self._entries
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size, self.flops_limit, self.margin = int(state["size"]), state["flops_limit"], float(state["margin"])
        self._entries = [
            BoardEntry(_path_key(e["path"]), float(e["heldout_score"]), int(e["flops"]), e["outputs"])
            for e in state["entries"]
        ]


@torch.no_grad()
def eval_logits(model: nn.Module, images: torch.Tensor, path: Sequence[Any]) -> torch.Tensor:
    """``model(images, path)`` in eval mode (BN running statistics, which these images leave unchanged);
    the model's mode is restored."""
    training = model.training
    model.eval()
    try:
        return model(images, path)
    finally:
        model.train(training)


def evaluate_path(
    model: nn.Module, path: Sequence[Any], images: torch.Tensor, labels: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy (0..1) of ``model(images, path)`` in eval mode, and those logits."""
    logits = eval_logits(model, images, path)
    return (logits.argmax(-1) == labels).float().mean().item(), logits


def update_board(
    board: PrioritizedBoard,
    model: nn.Module,
    path: Sequence[Any],
    heldout_batch: tuple[torch.Tensor, torch.Tensor],
    flops: int,
) -> bool:
    """Measure ``path`` on the fixed held-out batch and offer it to ``board``.

    The held-out batch doubles as the meta batch: the entry stores the candidate's own logits on it,
    so the student's logits for ``select_teacher`` must come from the same images.
    """
    images, labels = heldout_batch
    score, logits = evaluate_path(model, path, images, labels)
    return board.update(path, heldout_score=score, flops=flops, outputs=logits)


# ----------------------------------------------------------------------------- meta-matching


class MetaMatchingNetwork(nn.Module):
    """Scores how well a board path suits the student from their outputs on the same batch.

    With ``slice_size`` (the reference's form, SLICE = 4): the differences softmax(student) -
    softmax(board path) of the batch's first ``slice_size`` images, concatenated in order, go
    through ``Linear(num_classes * slice_size, 1)``: each image position has its own weights.
    With ``slice_size=None`` (per sample): ``Linear(num_classes, 1)`` on each image's difference,
    averaged over the whole batch. ``hidden_dim`` puts a ReLU layer of that width first. The last
    layer starts at zero, so at first every entry scores 0: the best-ranked path is picked, m = 0.5.
    """

    def __init__(self, num_classes: int, hidden_dim: int = 0, slice_size: int | None = 4) -> None:
        super().__init__()
        if slice_size is not None and slice_size < 1:
            raise ValueError(f"slice_size must be >= 1 (or None: per sample), got {slice_size}")
        self.slice_size = slice_size
        width = num_classes * (slice_size or 1)
        if hidden_dim:
            self.net = nn.Sequential(nn.Linear(width, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1))
        else:
            self.net = nn.Sequential(nn.Linear(width, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    @property
    def batch_needed(self) -> int | None:
        """Images of the meta batch the score reads (None: all of them)."""
        return self.slice_size

    def forward(self, student_logits: torch.Tensor, path_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.shape != path_logits.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and board logits {tuple(path_logits.shape)} "
                "must come from the same meta batch"
            )
        diff = student_logits.softmax(-1) - path_logits.softmax(-1)
        if self.slice_size is None:
            return self.net(diff).mean()
        if len(diff) < self.slice_size:
            raise ValueError(f"the meta batch has {len(diff)} images; the meta network reads {self.slice_size}")
        return self.net(diff[: self.slice_size].reshape(1, -1)).reshape(())


def select_teacher(
    meta: MetaMatchingNetwork, student_logits: torch.Tensor, board: PrioritizedBoard
) -> tuple[BoardEntry, torch.Tensor]:
    """The board entry with the highest matching score, and that score (differentiable w.r.t. ``meta``).

    ``student_logits`` are the student's logits on the first images of the board's meta batch (as many
    as the entries hold, or the first ``meta.batch_needed``); they are detached because m only weighs the
    losses: the student should not learn to move its own weight. Ties go to the better-ranked entry.
    """
    if not len(board):
        raise ValueError("select_teacher needs a non-empty board")
    student_logits = student_logits.detach()
    n = len(student_logits)
    scores = torch.stack([meta(student_logits, entry.outputs[:n]) for entry in board])
    best = int(scores.argmax())
    return board[best], scores[best]


def kd_weight(score: torch.Tensor) -> torch.Tensor:
    """m = sigmoid(-score) of the chosen teacher, the KD weight of ``prioritized_loss``."""
    return torch.sigmoid(-score)


def prioritized_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    m: torch.Tensor | float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """(m * KD + (2 - m) * CE) / 2, KD being soft-target CE against the teacher's softmax (T = 1) and CE
    the labels' cross-entropy (smoothed by ``label_smoothing``, 0.1 in the reference's search)."""
    kd = soft_target_cross_entropy(student_logits, teacher_logits.detach().softmax(-1))
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return (m * kd + (2 - m) * ce) / 2


# ----------------------------------------------------------------------------- bilevel meta update


@dataclass(frozen=True)
class MetaUpdateResult:
    teacher: BoardEntry
    matching_score: float
    kd_weight: float
    train_loss: float  # prioritized loss at the current weights
    heldout_loss: float  # held-out CE at the virtual weights, before the meta step


def meta_update(
    meta: MetaMatchingNetwork,
    model: nn.Module,
    path: Sequence[Any],
    train_batch: tuple[torch.Tensor, torch.Tensor],
    heldout_batch: tuple[torch.Tensor, torch.Tensor],
    board: PrioritizedBoard,
    meta_images: torch.Tensor,
    lr: float,
    meta_optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor] = prioritized_loss,
) -> MetaUpdateResult:
    """One-step unrolled update of ``meta``; ``model`` (the supernet, called ``model(x, path)``) is left unchanged.

    1. pick the teacher and m for the student ``path`` (its logits in eval mode on ``meta_images``, the first
       images of the board's batch);
    2. w' = w - lr * grad_w loss_fn(student, teacher, labels, m) on ``train_batch``, keeping the graph,
       so w' depends on the meta network through m (plain SGD: no momentum, no weight decay);
    3. held-out CE of ``model(·, path)`` at w' on ``heldout_batch``, backpropagated to the meta
       parameters only, then ``meta_optimizer.step()``.
    """
    images, labels = train_batch
    heldout_images, heldout_labels = heldout_batch
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    # Cloned BN statistics: the virtual forwards must not move the model's running averages.
    buffers = {name: b.clone() for name, b in model.named_buffers()}

    def run(weights: dict[str, torch.Tensor], x: torch.Tensor, p: Sequence[Any]) -> torch.Tensor:
        # Weights missing from `weights` (frozen ones) fall back to the model's own.
        return functional_call(model, {**weights, **buffers}, (x, p))

    teacher, score = select_teacher(meta, eval_logits(model, meta_images, path), board)
    m = kd_weight(score)
    with torch.no_grad():
        teacher_logits = run(params, images, teacher.path)

    train_loss = loss_fn(run(params, images, path), teacher_logits, labels, m)
    names = list(params)
    grads = torch.autograd.grad(train_loss, [params[n] for n in names], create_graph=True, allow_unused=True)
    # Ops off the path get no gradient and keep their weights.
    virtual = {n: params[n] - lr * g for n, g in zip(names, grads, strict=True) if g is not None}
    heldout_loss = F.cross_entropy(run(virtual, heldout_images, path), heldout_labels)

    # torch.autograd.grad rather than backward(): only the meta network may receive gradients.
    meta_params = [p for p in meta.parameters() if p.requires_grad]
    meta_grads = torch.autograd.grad(heldout_loss, meta_params)
    meta_optimizer.zero_grad(set_to_none=True)
    for p, g in zip(meta_params, meta_grads, strict=True):
        p.grad = g
    meta_optimizer.step()
    return MetaUpdateResult(teacher, score.item(), m.item(), train_loss.item(), heldout_loss.item())
