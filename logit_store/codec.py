"""How a logits record is kept on disk (docs/STORE_FORMAT.md, "Records").

Version 3 keeps each kept logit as a uint16 **code**, round((top logit - logit) / STEP)
clamped to MAX_CODE, and the tail's log-sum-exp relative to the top logit as float32.
Invariants of a version-3 row: codes[0] == 0, codes non-decreasing along k, the tail
finite (NO_TAIL when k = num_classes). A code is off by at most STEP / 2 = 2^-12 nats,
so a kept probability, renormalised with the tail, is off by at most
exp(2 * 2^-12) - 1 < 0.049%.

Versions 1 and 2 kept float16 logits and a float16 tail, as the writer gave them: read
as they were, never written any more (`convert --upgrade` re-encodes them).
"""

from __future__ import annotations

import numpy as np

from .errors import StoreInputError
from .records import CODED_VERSION, Records

STEP = 2.0**-11  # nats per code: a power of two, so decoding is exact in float32
MAX_CODE = 65_535  # the clamp, 32 nats below the top (a probability ratio of 1.3e-14)
NO_TAIL = -65504.0  # tail_lse when k == num_classes (nothing left out): the lowest finite fp16
_DECODE = np.float32(-STEP)
# exp(-code * STEP) for every code: kept probabilities relative to the top one, by lookup.
_RELATIVE_PROB = np.exp(-np.arange(MAX_CODE + 1, dtype=np.float64) * STEP)


def quantize(values: np.ndarray) -> np.ndarray:
    """Codes of float logits sorted descending, per row: round((top - logit) / STEP), clamped,
    as uint16 (round half to even).

    Differences are taken in float32 unless the logits are float64: float32's rounding of a
    difference within the 32-nat range is < 32 * 2^-24 = 2e-6 nats, against the code's half
    step of 2.4e-4; and logits already on the grid (`sparsify`'s, or a store's) are exact.
    """
    work = np.float64 if values.dtype == np.float64 else np.float32
    below = np.subtract(values[:, :1], values, dtype=work)
    below *= 1 / STEP
    np.rint(below, out=below)
    np.minimum(below, MAX_CODE, out=below)
    return below.astype(np.uint16)


def encode_rows(records: Records, dtype: np.dtype, no_tail: bool) -> np.ndarray:
    """Packed version-3 rows from checked records (float logits sorted descending, any shift)."""
    values = np.asarray(records.values)
    rows = np.empty(len(values), dtype=dtype)
    rows["values"] = quantize(values)
    top = values[:, 0].astype(np.float64)
    tail = np.full(len(values), NO_TAIL) if no_tail else np.asarray(records.tail_lse, np.float64) - top
    with np.errstate(over="ignore"):
        rows["tail_lse"] = tail
    if not np.isfinite(rows["tail_lse"]).all():
        row = int(np.flatnonzero(~np.isfinite(rows["tail_lse"]))[0])
        raise StoreInputError(f"field 'tail_lse' minus the top logit is not finite in float32 (row {row})")
    for name in dtype.names:  # indices, seed, partner and lam are stored as given
        if name not in ("values", "tail_lse"):
            rows[name] = getattr(records, name)
    return rows


def decode_rows(rows: np.ndarray, version: int) -> Records:
    """Records from packed rows: version 3 gives float32 logits minus the top one; older
    versions their float16 fields as stored (views, no copy)."""
    if version < CODED_VERSION:
        return Records.from_rows(rows)
    fields = {name: rows[name] for name in rows.dtype.names}
    fields["values"] = fields["values"] * _DECODE  # exact: code * 2^-11 fits float32's mantissa
    return Records(**fields)


def relative_kept_mass(codes: np.ndarray) -> np.ndarray:
    """sum_i exp(logit_i - top logit) over the kept classes, per row, from version-3 codes."""
    return np.take(_RELATIVE_PROB, codes).sum(axis=1)


def kept_mass(rows: np.ndarray, version: int) -> np.ndarray:
    """Probability mass of the kept classes per row (float64), from packed rows of any version."""
    if version >= CODED_VERSION:
        kept, tail = relative_kept_mass(rows["values"]), rows["tail_lse"].astype(np.float64)
    else:
        v = rows["values"].astype(np.float64)
        top = v[:, 0].copy()
        kept, tail = np.exp(v - top[:, None]).sum(axis=1), rows["tail_lse"] - top
    return kept / (kept + np.exp(tail))
