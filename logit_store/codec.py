"""How a logits record is kept on disk (docs/STORE_FORMAT.md, "Records").

Version 3 keeps each kept logit as a uint16 **code**, round((top logit - logit) / STEP)
clamped to MAX_CODE, and the log-sum-exp of the other logits relative to the top one as
an int16 **tail code**, round((tail_lse - top logit) / STEP) clamped to +-TAIL_CLAMP.
Invariants of a version-3 row: codes[0] == 0, codes non-decreasing along k, tail code
NO_TAIL_CODE exactly when k = num_classes. Every code is off by at most STEP / 2 = 2^-12
nats, so a kept probability, renormalised with the tail, is off by at most
exp(2 * 2^-12) - 1 < 0.049%. (The tail never clamps above: tail_lse <= top + log(C - k);
below, a tail under 16 nats beneath the top is kept at 16 nats, < 1.2e-7 of the top
probability.)

Versions 1 and 2 kept float16 logits and a float16 tail, as the writer gave them: read
as they were, never written any more (`convert --upgrade` re-encodes them).
"""

from __future__ import annotations

import math

import numpy as np

from .errors import StoreInputError
from .records import CODED_VERSION, Records

STEP = 2.0**-11  # nats per code: a power of two, so decoding is exact in float32
MAX_CODE = 65_535  # the clamp, 32 nats below the top (a probability ratio of 1.3e-14)
TAIL_CLAMP = 32_767  # tail codes lie in [-TAIL_CLAMP, TAIL_CLAMP]: +-16 nats
NO_TAIL_CODE = -32_768  # k == num_classes: nothing left out
NO_TAIL = -65504.0  # tail_lse when k == num_classes, decoded: the lowest finite fp16
TAIL_SLACK = 0.25  # nats a writer's tail may exceed log(C - k) above the top (rounded inputs)
_DECODE = np.float32(-STEP)
# exp(-code * STEP) for every code: kept probabilities relative to the top one, by lookup.
_RELATIVE_PROB = np.exp(-np.arange(MAX_CODE + 1, dtype=np.float64) * STEP)
# Decoded tail for every tail code, indexed by the code's bits as uint16 (one gather per batch).
_TAIL = (np.arange(MAX_CODE + 1, dtype=np.uint16).view(np.int16) * np.float32(STEP)).astype(np.float32)
_TAIL[np.uint16(NO_TAIL_CODE & 0xFFFF)] = NO_TAIL


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


def encode_rows(records: Records, dtype: np.dtype, num_classes: int) -> np.ndarray:
    """Packed version-3 rows from checked records (float logits sorted descending, any shift)."""
    values = np.asarray(records.values)
    k = values.shape[1]
    rows = np.empty(len(values), dtype=dtype)
    rows["values"] = quantize(values)
    if k == num_classes:
        rows["tail_lse"] = NO_TAIL_CODE
    else:
        tail = np.asarray(records.tail_lse, np.float64) - values[:, 0]
        # The C - k logits left out are each below the top one: their log-sum-exp is at most
        # log(C - k) above it (with slack for logits rounded to float16).
        bad = np.flatnonzero(~(tail <= math.log(num_classes - k) + TAIL_SLACK))
        if bad.size:
            raise StoreInputError(
                f"field 'tail_lse' minus the top logit is {tail[bad[0]]:.4g} (row {bad[0]}): more than "
                f"log(C - k) = {math.log(num_classes - k):.4g} above the top logit, so a logit left out would be larger"
            )
        rows["tail_lse"] = np.clip(np.rint(tail * (1 / STEP)), -TAIL_CLAMP, TAIL_CLAMP)
    for name in dtype.names:  # indices, seed, partner and lam are stored as given
        if name not in ("values", "tail_lse"):
            rows[name] = getattr(records, name)
    return rows


def decode_rows(rows: np.ndarray, version: int, no_tail: bool = False) -> Records:
    """Records from packed rows: version 3 gives float32 logits minus the top one; older
    versions their float16 fields as stored (views, no copy). `no_tail`: k = num_classes,
    every tail code is NO_TAIL_CODE."""
    if version < CODED_VERSION:
        return Records.from_rows(rows)
    mixing = "lam" in rows.dtype.names
    values = rows["values"].astype(np.float32)
    values *= _DECODE  # exact: a code times 2^-11 fits float32's mantissa
    return Records(
        values,
        rows["indices"],
        decode_tail(rows["tail_lse"]) if no_tail else rows["tail_lse"] * np.float32(STEP),
        rows["seed"],
        rows["partner"] if mixing else None,
        rows["lam"] if mixing else None,
    )


def decode_tail(codes: np.ndarray) -> np.ndarray:
    """tail_lse minus the top logit, float32, from tail codes (NO_TAIL where k = num_classes)."""
    return _TAIL[np.ascontiguousarray(codes).view(np.uint16)]


def relative_kept_mass(codes: np.ndarray) -> np.ndarray:
    """sum_i exp(logit_i - top logit) over the kept classes, per row, from version-3 codes."""
    return np.take(_RELATIVE_PROB, codes).sum(axis=1)


def kept_mass(rows: np.ndarray, version: int) -> np.ndarray:
    """Probability mass of the kept classes per row (float64), from packed rows of any version."""
    if version >= CODED_VERSION:
        kept, tail = relative_kept_mass(rows["values"]), decode_tail(rows["tail_lse"]).astype(np.float64)
    else:
        v = rows["values"].astype(np.float64)
        top = v[:, 0].copy()
        kept, tail = np.exp(v - top[:, None]).sum(axis=1), rows["tail_lse"] - top
    return kept / (kept + np.exp(tail))
