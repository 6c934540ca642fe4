"""Sparsify teacher logits to top-k and rebuild full distributions (the store's torch adapter)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import StoreInputError
from .records import Records, index_dtype

# tail_lse when k == num_classes (nothing left out): the lowest finite fp16.
NO_TAIL = -65504.0


@dataclass
class SparseLogits:
    """Top-k of a batch of logits, on the device they were computed on."""

    values: torch.Tensor  # [n, k] float16, sorted descending
    indices: torch.Tensor  # [n, k] int64
    tail_lse: torch.Tensor  # [n] float16
    kl: torch.Tensor  # [n] float32, KL(full || rebuilt at T=1) from the stored fp16 values

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
    """Keep the k largest logits; summarise the rest by their log-sum-exp."""
    if logits.ndim != 2:
        raise StoreInputError(f"logits must be [batch, classes], got shape {tuple(logits.shape)}")
    n, num_classes = logits.shape
    if not 1 <= k <= num_classes:
        raise StoreInputError(f"k={k} must be in [1, {num_classes}] (the number of classes)")
    full = logits.float()
    if not torch.isfinite(full).all():
        row = int((~torch.isfinite(full)).any(dim=1).nonzero()[0])
        raise StoreInputError(f"logits hold NaN or inf (batch row {row})")
    if full.abs().max() > 65504:
        raise StoreInputError("logits exceed the float16 range (|logit| > 65504)")
    values, indices = full.topk(k, dim=1, sorted=True)
    if k < num_classes:
        rest = full.scatter(1, indices, float("-inf"))
        tail_lse = rest.logsumexp(dim=1)
    else:
        tail_lse = full.new_full((n,), NO_TAIL)
    values16, tail16 = values.half(), tail_lse.half()
    rebuilt = rebuild_log_probs(values16, indices, tail16, num_classes)
    log_p = full.log_softmax(dim=1)
    kl = (log_p.exp() * (log_p - rebuilt)).sum(dim=1).clamp_min(0)
    return SparseLogits(values16, indices, tail16, kl)


def rebuild_log_probs(
    values: torch.Tensor, indices: torch.Tensor, tail_lse: torch.Tensor, num_classes: int, temperature: float = 1.0
) -> torch.Tensor:
    """Full log-distribution [n, num_classes] at temperature T from a sparse record.

    The left-out classes share one logit, log((sum of their exp) / (C - k)), so their
    mass is spread evenly. At T = 1 the kept probabilities are exact and the rest get
    (1 - kept mass) / (C - k) each: TinyViT's rebuild.
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
