"""The manifest: what a store holds and where it came from (docs/STORE_FORMAT.md)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ManifestMismatchError, StoreInputError
from .records import field_dtypes

FORMAT_VERSION = 1
BACKENDS = ("zarr", "lmdb")
# Fields that describe the run rather than the content: never compared when reopening.
VOLATILE_FIELDS = ("created_at", "toolkit_version", "statistics")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace: the form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(recipe).encode()).hexdigest()


def default_layout(num_samples: int, k: int) -> tuple[int, int]:
    """(shard_records, chunk_records) for a store of this size.

    Inner chunks hold ~320 KB of values (16,384 records at k=10), shards up to 2^18
    records, and small stores still get about 8 shards so several writers can share.
    """
    chunk = _pow2(327_680 / (2 * k))
    chunk = max(64, min(chunk, 65_536, _pow2_ceil(math.ceil(num_samples / 8))))
    chunks_total = math.ceil(num_samples / chunk)
    per_shard = max(1, min(math.ceil(chunks_total / 8), (1 << 18) // chunk))
    return chunk * per_shard, chunk


def _pow2(x: float) -> int:
    return 1 << max(0, round(math.log2(x)))


def _pow2_ceil(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


@dataclass
class Manifest:
    num_samples: int
    num_classes: int
    k: int
    epochs: int
    backend: str = "zarr"
    mixing: bool = False
    global_seed: int = 0
    teacher: dict[str, Any] = field(default_factory=lambda: {"spec": None, "weights_sha256": None})
    dataset: dict[str, Any] = field(default_factory=lambda: {"fingerprint": None})
    augmentation: dict[str, Any] = field(default_factory=lambda: {"recipe": None, "hash": None})
    shard_records: int = 0
    chunk_records: int = 0
    dtypes: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created_at: str = ""
    toolkit_version: str = ""
    statistics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check()
        if not self.shard_records and not self.chunk_records:
            self.shard_records, self.chunk_records = default_layout(self.num_samples, self.k)
        for name in ("shard_records", "chunk_records"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StoreInputError(
                    f"manifest: '{name}' must be a positive integer (set both layout sizes or neither), got {value!r}"
                )
        if self.shard_records % self.chunk_records:
            raise StoreInputError(
                f"manifest: shard_records={self.shard_records} must be a multiple of chunk_records={self.chunk_records}"
            )
        self.dtypes = {name: str(dt) for name, dt in field_dtypes(self.num_classes, self.mixing).items()}
        if self.augmentation.get("recipe") is not None and not self.augmentation.get("hash"):
            self.augmentation["hash"] = recipe_hash(self.augmentation["recipe"])
        if not self.created_at:
            self.created_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        if not self.toolkit_version:
            from . import __version__

            self.toolkit_version = __version__

    def _check(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise StoreInputError(
                f"manifest: format_version {self.format_version} is not supported (this toolkit reads {FORMAT_VERSION})"
            )
        if self.backend not in BACKENDS:
            raise StoreInputError(f"manifest: backend '{self.backend}' is not one of {BACKENDS}")
        for name in ("num_samples", "num_classes", "k", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StoreInputError(f"manifest: '{name}' must be a positive integer, got {value!r}")
        if self.k > self.num_classes:
            raise StoreInputError(f"manifest: k={self.k} is larger than num_classes={self.num_classes}")
        if self.num_classes > 2**31 - 1 or self.num_samples > 2**31 - 1:
            raise StoreInputError("manifest: num_classes and num_samples must fit in int32")

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_records)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_records
        return start, min(start + self.shard_records, self.num_samples)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> Manifest:
        known = set(cls.__dataclass_fields__)
        unknown, missing = sorted(set(data) - known), sorted(known - set(data))
        if unknown or missing:
            raise StoreInputError(f"{source}: unknown field(s) {unknown}, missing field(s) {missing}")
        try:
            return cls(**data)
        except TypeError as err:
            raise StoreInputError(f"{source}: {err}") from None

    def identity(self) -> dict[str, Any]:
        return {key: value for key, value in self.to_dict().items() if key not in VOLATILE_FIELDS}

    def check_same(self, other: Manifest, where: str) -> None:
        """Raise naming every identity field where `other` differs from this manifest."""
        mine, theirs = _flatten(self.identity()), _flatten(other.identity())
        diffs = [
            f"{key}: store has {mine.get(key)!r}, asked for {theirs.get(key)!r}"
            for key in sorted(set(mine) | set(theirs))
            if mine.get(key) != theirs.get(key)
        ]
        if diffs:
            raise ManifestMismatchError(f"{where} exists with a different manifest:\n  " + "\n  ".join(diffs))


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key != "recipe":
            out |= _flatten(value, path + ".")
        else:
            out[path] = value
    return out
