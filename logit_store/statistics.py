"""A store's statistics: per-commit sums in each marker, folded into the manifest's totals and means
(docs/STORE_FORMAT.md, "Statistics")."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import StoreInputError
from .records import KL_TEMPERATURES


def kl_suffix(temperature: float) -> str:
    """'' at T = 1 (the key of versions 1-2), '_t2', '_t4' at the others."""
    return "" if temperature == 1 else f"_t{temperature:g}"


def kl_columns(kl: np.ndarray | None, n: int) -> np.ndarray | None:
    """kl as [n, len(KL_TEMPERATURES)] float64, NaN where unknown; accepts [n] (T = 1 only)."""
    if kl is None:
        return None
    kl = np.asarray(kl, dtype=np.float64)
    if kl.shape == (n,):
        return np.column_stack([kl, np.full((n, len(KL_TEMPERATURES) - 1), np.nan)])
    if kl.shape != (n, len(KL_TEMPERATURES)):
        raise StoreInputError(f"'kl' has shape {kl.shape}, expected ({n},) or ({n}, {len(KL_TEMPERATURES)})")
    return kl


def topk_mass(values: np.ndarray, tail_lse: np.ndarray) -> np.ndarray:
    """Probability mass of the kept classes, exact from float logits (any shift) and the tail log-sum-exp."""
    v = values.astype(np.float64)
    top = np.max(v, axis=1, keepdims=True)
    kept = np.exp(v - top).sum(axis=1)
    tail = np.exp(tail_lse.astype(np.float64) - top[:, 0])
    return kept / (kept + tail)


def aggregate_statistics(markers: Any) -> dict[str, Any]:
    """Totals of the commit markers' statistics; a mean is None where no marker has its sums
    (the top-k means of an embeddings store)."""
    total: dict[str, float] = {"records": 0}
    for marker in markers:
        for key, value in (marker or {}).get("statistics", {}).items():
            total[key] = total.get(key, 0) + value

    def mean(key: str, count: str) -> float | None:
        return total[key] / total[count] if key in total and total.get(count) else None

    kl = {
        f"mean_kl_full_to_rebuilt{kl_suffix(t)}": mean(f"kl_sum{kl_suffix(t)}", f"kl_records{kl_suffix(t)}")
        for t in KL_TEMPERATURES
    }
    return {
        "records": total["records"],
        "mean_topk_mass": mean("topk_mass_sum", "records"),
        **kl,
        "teacher_top1_agreement": mean("top1_agree", "labeled"),
    }
