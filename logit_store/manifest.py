"""The manifest: what a store holds and where it came from (docs/STORE_FORMAT.md).

A manifest checks its own fields; the back-end's name it leaves to `logit_store.backends.create_backend`,
the one check of that name (it lists the installed back-ends, entry points included).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ._version import __version__
from .errors import ManifestMismatchError, StoreError, StoreInputError
from .location import StoreLocation
from .records import CODED_VERSION, field_dtypes

MANIFEST_KEY = "manifest.json"
FORMAT_VERSION = 3
# A version-1 manifest is a logits manifest without `kind` and `embed_dim`; versions 1-2
# keep float16 logits, version 3 coded ones (records.field_dtypes).
READABLE_VERSIONS = (1, 2, 3)
KINDS = ("logits", "embeddings")
# Fields that describe the run rather than the content: never compared when reopening.
VOLATILE_FIELDS = ("created_at", "toolkit_version", "statistics", "provenance")
# Fields a manifest may lack (older manifests do): read as their default, and written only when not empty, so a
# store that never used them keeps the exact keys older readers accept.
OPTIONAL_FIELDS = ("provenance",)


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace: the form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(recipe).encode()).hexdigest()


# Bytes of the widest field (2 bytes per value) an inner chunk aims at. Version-3 logits
# chunks are twice as large: at k = 100 that writes ~13% faster (zarr's cost is per chunk)
# for the same size on disk (docs/BENCHMARKS.md).
CHUNK_BYTES, CODED_CHUNK_BYTES = 327_680, 655_360


def default_layout(num_samples: int, width: int, chunk_bytes: int = CHUNK_BYTES) -> tuple[int, int]:
    """(shard_records, chunk_records) for a store of this size; width = k, or embed_dim.

    Inner chunks hold ~chunk_bytes of 2-byte values (640 KB: 4,096 records at k=100 for
    version-3 logits; 320 KB otherwise), shards up to 2^18 records, and small stores still
    get about 8 shards so several writers can share.
    """
    chunk = _pow2(chunk_bytes / (2 * width))
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
    kind: str = "logits"
    embed_dim: int = 0
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
    # Who wrote which planes: [{"planes": [int, ...], "by": str, "at": ISO 8601 UTC, ...}] (docs/STORE_FORMAT.md)
    provenance: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._check()
        if not self.shard_records and not self.chunk_records:
            width = self.embed_dim if self.kind == "embeddings" else self.k
            coded = self.kind == "logits" and self.format_version >= CODED_VERSION
            chunk_bytes = CODED_CHUNK_BYTES if coded else CHUNK_BYTES
            self.shard_records, self.chunk_records = default_layout(self.num_samples, width, chunk_bytes)
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
        dtypes = field_dtypes(self.num_classes, self.mixing, self.kind, self.format_version)
        self.dtypes = {name: str(dt) for name, dt in dtypes.items()}
        if self.augmentation.get("recipe") is not None and not self.augmentation.get("hash"):
            self.augmentation["hash"] = recipe_hash(self.augmentation["recipe"])
        if not self.created_at:
            self.created_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        if not self.toolkit_version:
            self.toolkit_version = __version__

    def _check(self) -> None:
        if self.format_version not in READABLE_VERSIONS:
            raise StoreInputError(
                f"manifest: format_version {self.format_version} is not supported (this toolkit reads {READABLE_VERSIONS})"
            )
        if not isinstance(self.backend, str) or not self.backend:  # its name is `create_backend`'s to check
            raise StoreInputError(f"manifest: 'backend' must be a back-end's name, got {self.backend!r}")
        if self.kind not in KINDS:
            raise StoreInputError(f"manifest: kind '{self.kind}' is not one of {KINDS}")
        if self.kind != "logits" and self.format_version < 2:
            raise StoreInputError(f"manifest: kind '{self.kind}' needs format_version 2, got {self.format_version}")
        logits = self.kind == "logits"
        for name in ("num_samples", "num_classes", "k", "epochs") if logits else ("num_samples", "epochs", "embed_dim"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                where = " for an embeddings store" if name == "embed_dim" else ""
                raise StoreInputError(f"manifest: '{name}' must be a positive integer{where}, got {value!r}")
        if not logits:
            self._check_embeddings()
        elif self.embed_dim != 0:
            raise StoreInputError(f"manifest: 'embed_dim' must be 0 for a logits store, got {self.embed_dim!r}")
        if self.k > self.num_classes:
            raise StoreInputError(f"manifest: k={self.k} is larger than num_classes={self.num_classes}")
        if self.num_classes > 2**31 - 1 or self.num_samples > 2**31 - 1:
            raise StoreInputError("manifest: num_classes and num_samples must fit in int32")
        self._check_provenance()

    def _check_provenance(self) -> None:
        """A list of objects, each naming its planes (a list of plane indices) and what wrote them."""
        entries = self.provenance
        if not isinstance(entries, list):
            raise StoreInputError(f"manifest: 'provenance' must be a list, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            planes = entry.get("planes") if isinstance(entry, dict) else None
            if not (isinstance(planes, list) and all(_is_int(p) and 0 <= p < self.planes for p in planes)):
                raise StoreInputError(
                    f"manifest: provenance[{i}] must be an object whose 'planes' lists plane indices in [0, "
                    f"{self.planes}), got {entry!r}"
                )

    def _check_embeddings(self) -> None:
        why = {"k": "it has no top-k", "num_classes": "it has no classes"}
        for name, reason in why.items():
            value = getattr(self, name)
            if not _is_int(value) or value != 0:
                raise StoreInputError(f"manifest: '{name}' must be 0 for an embeddings store ({reason}), got {value!r}")
        if self.mixing is not False:
            raise StoreInputError(
                f"manifest: 'mixing' must be False for an embeddings store (a mixed image has no caption of its own), "
                f"got {self.mixing!r}"
            )

    @property
    def planes(self) -> int:
        """Planes of records: one per epoch, plus the text plane (index `epochs`) in an embeddings store."""
        return self.epochs + (self.kind == "embeddings")

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_records)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_records
        return start, min(start + self.shard_records, self.num_samples)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        data = self.to_dict()
        if self.format_version == 1:  # a v1 store keeps a manifest that v1 readers accept
            del data["kind"], data["embed_dim"]
        for name in OPTIONAL_FIELDS:
            if not data[name]:
                del data[name]
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> Manifest:
        if data.get("format_version") == 1:  # v1 predates embeddings stores: it is a logits manifest
            data = {"kind": "logits", "embed_dim": 0} | data
        known = set(cls.__dataclass_fields__)
        unknown, missing = sorted(set(data) - known), sorted(known - set(data) - set(OPTIONAL_FIELDS))
        if unknown or missing:
            raise StoreInputError(f"{source}: unknown field(s) {unknown}, missing field(s) {missing}")
        try:
            return cls(**data)
        except TypeError as err:
            raise StoreInputError(f"{source}: {err}") from None

    def identity(self) -> dict[str, Any]:
        return {key: value for key, value in self.to_dict().items() if key not in VOLATILE_FIELDS}

    def _comparable(self) -> dict[str, Any]:
        """The identity with the version of the same layout: a version-1 manifest is the
        version-2 logits manifest it equals, and embeddings are laid out alike in 2 and 3."""
        identity = self.identity()
        if identity["format_version"] == 1:
            identity["format_version"] = 2
        if self.kind == "embeddings" and identity["format_version"] == 2:
            identity["format_version"] = 3
        return identity

    def differing_fields(self, other: Manifest) -> list[str]:
        """The identity fields (dotted paths) where `other` differs from this manifest, sorted."""
        mine, theirs = _flatten(self._comparable()), _flatten(other._comparable())
        return [key for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]

    def check_same(self, other: Manifest, where: str) -> None:
        """Raise naming every identity field where `other` differs from this manifest."""
        mine, theirs = _flatten(self._comparable()), _flatten(other._comparable())
        diffs = [
            f"{key}: store has {mine.get(key)!r}, asked for {theirs.get(key)!r}" for key in self.differing_fields(other)
        ]
        if diffs:
            raise ManifestMismatchError(f"{where} exists with a different manifest: " + "; ".join(diffs))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key != "recipe":
            out |= _flatten(value, path + ".")
        else:
            out[path] = value
    return out


def read_manifest(location: StoreLocation) -> Manifest:
    """The manifest of the store at `location`; StoreError naming the file if there is none or it is not one."""
    try:
        raw = location.read_bytes(MANIFEST_KEY)
    except FileNotFoundError:
        if location.is_local and not os.path.exists(location.root):  # a typo, most often: say so
            raise StoreError(f"{location} does not exist (no store there)") from None
        raise StoreError(f"{location} is not a logit store: it has no {MANIFEST_KEY}") from None
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise StoreError(f"{location}/{MANIFEST_KEY} is not valid JSON: {err}") from None
    return Manifest.from_dict(data, source=f"{location}/{MANIFEST_KEY}")


def a_kind(kind: str) -> str:
    """'a logits', 'an embeddings': how messages name a store's kind."""
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def plane_name(manifest: Manifest, plane: int) -> str:
    """'epoch E', or 'text plane' for an embeddings store's text plane: how messages name a plane."""
    return "text plane" if manifest.kind == "embeddings" and plane == manifest.epochs else f"epoch {plane}"


def old_version_message(where: str, version: int) -> str:
    """Why a version-1/2 logits store is not written, and the command that converts it."""
    return (
        f"{where} is a format-version-{version} logits store: this toolkit reads it as it is but writes "
        f"version {FORMAT_VERSION} only; to add to it, convert it first: "
        f"distill-store convert {where} NEW_STORE --upgrade"
    )
