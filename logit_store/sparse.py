"""Sparsify teacher logits to top-k and rebuild full distributions (the store's torch adapter)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .codec import MAX_CODE, NO_TAIL, STEP, TAIL_CLAMP
from .errors import StoreInputError
from .records import KL_TEMPERATURES, Records, index_dtype

__all__ = ["NO_TAIL", "SparseLogits", "rebuild_log_probs", "rebuild_probs", "sparsify"]


@dataclass
class SparseLogits:
    """Top-k of a batch of logits, as the store keeps them, on the device they were computed on.

    values   [n, k] float32  the top-k logits minus the top one, rounded to the store's codes
                             (multiples of 2^-11, >= -32; values[:, 0] == 0), sorted descending
    indices  [n, k] int64    their class indices
    tail_lse [n]    float32  log-sum-exp of the other logits minus the top one, rounded to the
                             store's tail code (a multiple of 2^-11 in [-16, 16]; NO_TAIL when k = C)
    kl       [n, 3] float32  KL(full || rebuilt from the above) at T = 1, 2, 4 (KL_TEMPERATURES)
    """

    values: torch.Tensor
    indices: torch.Tensor
    tail_lse: torch.Tensor
    kl: torch.Tensor

    def to_records(
        self, num_classes: int, seeds: np.ndarray, partner: np.ndarray | None = None, lam: np.ndarray | None = None
    ) -> Records:
        return Records(
            values=self.values.cpu().numpy(),
            indices=self.indices.cpu().numpy().astype(index_dtype(num_classes)),
            tail_lse=self.tail_lse.cpu().numpy(),
            seed=seeds,
            partner=partner,
            lam=lam,
        )


@torch.no_grad()
def sparsify(logits: torch.Tensor, k: int) -> SparseLogits:
    """Keep the k largest logits; summarise the rest by their log-sum-exp; measure the loss.

    The kept logits are quantised here exactly as a version-3 store codes them
    (`logit_store.codec`), so the KL reported is that of what the store gives back.
    """
    if logits.ndim != 2:
        raise StoreInputError(f"logits must be [batch, classes], got shape {tuple(logits.shape)}")
    n, num_classes = logits.shape
    if not 1 <= k <= num_classes:
        raise StoreInputError(f"k={k} must be in [1, {num_classes}] (the number of classes)")
    full = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64
    if not torch.isfinite(full).all():
        row = int((~torch.isfinite(full)).any(dim=1).nonzero()[0])
        raise StoreInputError(f"logits hold NaN or inf (batch row {row})")
    top_values, indices = full.topk(k, dim=1, sorted=True)
    top = top_values[:, :1]
    # In float64 like the writer's encoder, so both derive the same codes from these values.
    below = (top.double() - top_values.double()) / STEP
    values = (below.round_().clamp_(max=MAX_CODE) * -STEP).float()
    if k < num_classes:
        tail = full.scatter(1, indices, float("-inf")).logsumexp(dim=1).double() - top[:, 0].double()
        tail_lse = ((tail / STEP).round_().clamp_(-TAIL_CLAMP, TAIL_CLAMP) * STEP).to(full.dtype)
    else:
        tail_lse = full.new_full((n,), NO_TAIL)
    kl = torch.stack([_kl(full, values, indices, tail_lse, t) for t in KL_TEMPERATURES], dim=1)
    return SparseLogits(values, indices, tail_lse.float(), kl.float())


def _kl(full: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor, t: float) -> torch.Tensor:
    """KL(softmax(full / t) || rebuild at t), per row."""
    log_p = (full / t).log_softmax(dim=1)
    rebuilt = rebuild_log_probs(values, indices, tail, full.shape[1], t)
    return (log_p.exp() * (log_p - rebuilt)).sum(dim=1).clamp_min(0)


def rebuild_log_probs(
    values: torch.Tensor, indices: torch.Tensor, tail_lse: torch.Tensor, num_classes: int, temperature: float = 1.0
) -> torch.Tensor:
    """Full log-distribution [n, num_classes] at temperature T from a sparse record.

    values and tail_lse are logits up to a shift per row (any store version's, or
    `sparsify`'s). The left-out classes share one logit, log((sum of their exp) / (C - k)),
    so their mass is spread evenly. At T = 1 the kept probabilities are those of the stored
    logits and the rest get (1 - kept mass) / (C - k) each: TinyViT's rebuild. At T != 1
    the tail is approximate (its classes really differ); the store's statistics give the
    KL this costs at T = 2 and 4.
    """
    k = values.shape[1]
    values = values.float()
    if k == num_classes:
        full = values.new_empty(values.shape[0], num_classes)
    else:
        shared = tail_lse.float() - math.log(num_classes - k)
        full = shared[:, None].expand(-1, num_classes).clone()
    full.scatter_(1, indices.long(), values)
    return (full / temperature).log_softmax(dim=1)


def rebuild_probs(
    values: torch.Tensor, indices: torch.Tensor, tail_lse: torch.Tensor, num_classes: int, temperature: float = 1.0
) -> torch.Tensor:
    return rebuild_log_probs(values, indices, tail_lse, num_classes, temperature).exp()
