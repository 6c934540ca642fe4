"""Records: the per-(plane, sample) payload of a store, its packed row layout and checks.

Two kinds (docs/STORE_FORMAT.md): sparse top-k logits (`Records`) and L2-normalised
embeddings (`Embeddings`). How a logits record is encoded on disk depends on the
format version (`logit_store.codec`); this module knows the dtypes of each.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import numpy as np

from .errors import StoreInputError

# Field order is part of the format: it fixes the packed row layout and the hashes.
FIELDS = ("values", "indices", "tail_lse", "seed", "partner", "lam")
MIXING_FIELDS = ("partner", "lam")
EMBEDDING_FIELDS = ("embedding", "seed")
NORM_TOLERANCE = 1e-2  # |L2 norm - 1| allowed for a stored embedding, after the fp16 cast
# Version 3 keeps the top-k as uint16 codes of (top logit - logit) and an int16 code of the
# tail (docs/STORE_FORMAT.md); versions 1 and 2 kept float16 logits and a float16 tail.
CODED_VERSION = 3
# Temperatures at which a writer's KL(full || rebuilt) statistics are kept (columns of `kl`).
KL_TEMPERATURES = (1.0, 2.0, 4.0)


def index_dtype(num_classes: int) -> np.dtype:
    """uint16 while every class index fits, else int32."""
    return np.dtype(np.uint16) if num_classes <= 65_536 else np.dtype(np.int32)


def field_dtypes(
    num_classes: int, mixing: bool, kind: str = "logits", version: int = CODED_VERSION
) -> dict[str, np.dtype]:
    """Field -> on-disk dtype, in row order, for a store of this kind and format version."""
    if kind == "embeddings":
        return {"embedding": np.dtype(np.float16), "seed": np.dtype(np.uint32)}
    coded = version >= CODED_VERSION
    dtypes = {
        "values": np.dtype(np.uint16 if coded else np.float16),
        "indices": index_dtype(num_classes),
        "tail_lse": np.dtype(np.int16 if coded else np.float16),
        "seed": np.dtype(np.uint32),
    }
    if mixing:
        dtypes |= {"partner": np.dtype(np.int32), "lam": np.dtype(np.float32)}
    return dtypes


def row_dtype(
    k: int, num_classes: int, mixing: bool, kind: str = "logits", embed_dim: int = 0, version: int = CODED_VERSION
) -> np.dtype:
    """A packed little-endian structured dtype holding one whole record, as stored."""
    shapes = {"values": (k,), "indices": (k,), "embedding": (embed_dim,)}
    dtypes = field_dtypes(num_classes, mixing, kind, version)
    return np.dtype([(name, dt.newbyteorder("<"), shapes.get(name, ())) for name, dt in dtypes.items()])


@dataclass
class Records:
    """A batch of records; arrays share their first dimension.

    values   [n, k] float    teacher logits of the top-k classes, sorted descending
    indices  [n, k] uint16|int32  their class indices
    tail_lse [n]    float    log-sum-exp of the logits not kept
    seed     [n]    uint32   augmentation seed of the view

    Logits matter up to a shift per record (the distribution is their softmax). A writer
    takes any shift; a version-3 store gives back float32 logits minus the top one
    (values[:, 0] == 0), a version-1/2 store its float16 logits as they were written.
    partner  [n]    int32    mixing partner id (mixing stores only)
    lam      [n]    float32  mixing lambda (mixing stores only)
    """

    values: np.ndarray
    indices: np.ndarray
    tail_lse: np.ndarray
    seed: np.ndarray
    partner: np.ndarray | None = None
    lam: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.values)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> Records:
        """View the fields of a structured array of rows (no copy)."""
        return cls(*(rows[name] for name in rows.dtype.names))

    def to_rows(self, dtype: np.dtype) -> np.ndarray:
        rows = np.empty(len(self), dtype=dtype)
        for name in dtype.names:
            rows[name] = getattr(self, name)
        return rows


@dataclass
class Embeddings:
    """A batch of embedding records (embeddings stores); arrays share their first dimension.

    embedding [n, d] float16  the teacher's L2-normalised embedding (image view, or caption on the text plane)
    seed      [n]    uint32   augmentation seed of the view (0 on the text plane)
    """

    embedding: np.ndarray
    seed: np.ndarray

    def __len__(self) -> int:
        return len(self.embedding)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"embedding": self.embedding, "seed": self.seed}

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> Embeddings:
        """View the fields of a structured array of rows (no copy)."""
        return cls(rows["embedding"], rows["seed"])

    def to_rows(self, dtype: np.dtype) -> np.ndarray:
        rows = np.empty(len(self), dtype=dtype)
        rows["embedding"], rows["seed"] = self.embedding, self.seed
        return rows


def record_seeds(global_seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """seed(global seed, epoch, id): a splitmix64 hash, vectorised, as uint32.

    Part of the format (docs/STORE_FORMAT.md): the same triple gives the same seed on
    every machine, so a view can be replayed from (epoch, id) alone.
    """
    ids = np.asarray(ids, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = np.uint64(global_seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        x ^= np.uint64(epoch & 0xFFFFFFFF) * np.uint64(0xC2B2AE3D27D4EB4F)
        x = x + ids * np.uint64(0x165667B19E3779F9)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(32)).astype(np.uint32)


def validate_records(records: Records, *, k: int, num_classes: int, mixing: bool, num_samples: int) -> Records:
    """Check shapes, dtypes and values; return the records with integer fields cast to the
    store's dtypes and the logits (`values`, `tail_lse`) in their own float dtype, ready to encode."""
    n = len(records.values)
    dtypes = field_dtypes(num_classes, mixing) | {"values": None, "tail_lse": None}
    for name in MIXING_FIELDS:
        given = getattr(records, name) is not None
        if given != mixing:
            state = "given" if given else "missing"
            raise StoreInputError(f"field '{name}' is {state}, but the store has mixing={mixing}")
    out = {}
    for name, dtype in dtypes.items():
        shape = (n, k) if name in ("values", "indices") else (n,)
        out[name] = _checked_field(name, getattr(records, name), shape, dtype, num_classes, num_samples)
    if k > 1 and (out["values"][:, 1:] > out["values"][:, :-1]).any():
        raise StoreInputError("field 'values' must be sorted descending along k")
    if k > 1 and _repeats_a_class(out["indices"]):
        raise StoreInputError("field 'indices' repeats a class within a record")
    if mixing and ((out["lam"] < 0) | (out["lam"] > 1)).any():
        raise StoreInputError("field 'lam' must lie in [0, 1]")
    return Records(**out)


def _repeats_a_class(indices: np.ndarray) -> bool:
    ordered = np.sort(indices, axis=1)
    return bool((ordered[:, 1:] == ordered[:, :-1]).any())


def validate_embeddings(emb: Embeddings, *, embed_dim: int) -> Embeddings:
    """Check shapes, dtypes, finiteness and unit L2 norm; return the arrays cast to the store's dtypes."""
    arr = np.asarray(emb.embedding)
    n = len(arr) if arr.ndim else 0
    dtypes = field_dtypes(0, False, "embeddings")
    embedding = _checked_field("embedding", arr, (n, embed_dim), dtypes["embedding"])
    seed = _checked_field("seed", emb.seed, (n,), dtypes["seed"])
    norms = np.linalg.norm(embedding.astype(np.float32), axis=1)
    bad = np.flatnonzero(np.abs(norms - 1) > NORM_TOLERANCE)
    if bad.size:
        row = int(bad[0])
        raise StoreInputError(
            f"field 'embedding' row {row} has L2 norm {norms[row]:.4g}, expected 1 within {NORM_TOLERANCE}: "
            "embeddings must be L2-normalised"
        )
    return Embeddings(embedding, seed)


def _checked_field(
    name: str,
    arr: np.ndarray,
    shape: tuple[int, ...],
    dtype: np.dtype | None,
    num_classes: int = 0,
    num_samples: int = 0,
) -> np.ndarray:
    """One field checked for shape, dtype kind, finiteness or range, and cast to `dtype`
    (None: any float dtype, kept as it is)."""
    arr = np.asarray(arr)
    if arr.shape != shape:
        raise StoreInputError(f"field '{name}' has shape {arr.shape}, expected {shape}")
    want_float = dtype is None or dtype.kind == "f"
    if (arr.dtype.kind == "f") != want_float or arr.dtype.kind not in "fiu":
        kind = "a floating" if want_float else "an integer"
        raise StoreInputError(f"field '{name}' has dtype {arr.dtype}, expected {kind} dtype ({dtype or 'float'})")
    if not want_float:
        return _checked_int_cast(name, arr, dtype, num_classes, num_samples)
    with np.errstate(over="ignore"):  # overflow becomes inf, reported just below
        cast = arr if dtype is None else arr.astype(dtype)
    if not np.isfinite(cast).all():
        bad = int(np.flatnonzero(~np.isfinite(cast).reshape(shape[0], -1).all(axis=1))[0])
        cast_note = "" if dtype is None else f" after casting to {dtype}"
        raise StoreInputError(f"field '{name}' holds NaN or inf (row {bad}){cast_note}")
    return cast


def _checked_int_cast(name: str, arr: np.ndarray, dtype: np.dtype, num_classes: int, num_samples: int) -> np.ndarray:
    limits = {"indices": num_classes, "partner": num_samples}
    if name in limits and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= limits[name]:
            raise StoreInputError(f"field '{name}' has values in [{lo}, {hi}], expected [0, {limits[name]})")
    if name == "seed" and arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF):
        raise StoreInputError("field 'seed' must fit in uint32")
    return arr.astype(dtype, copy=False)


def block_digest(rows: np.ndarray) -> str:
    """Checksum of a block of decoded records (packed little-endian rows)."""
    return hashlib.blake2b(np.ascontiguousarray(rows).view(np.uint8), digest_size=16).hexdigest()  # no copy
