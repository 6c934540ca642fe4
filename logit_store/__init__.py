"""The logit store: sparse teacher outputs (or embeddings) per (epoch, sample), durable and checked.

Format: docs/STORE_FORMAT.md. numpy, zarr and lmdb only; the torch helpers for
sparsifying and rebuilding live in `logit_store.sparse`.
"""

__version__ = "0.1.0"

from .errors import (
    DiskFullError,
    DistillError,
    ManifestMismatchError,
    NotCommittedError,
    StoreAccessError,
    StoreChangedError,
    StoreDamagedError,
    StoreError,
    StoreInputError,
    StoreLockedError,
)
from .manifest import FORMAT_VERSION, KINDS, Manifest, recipe_hash
from .records import Embeddings, Records, record_seeds
from .store import LogitStore, Problem, ShardWriter, convert_store, create_store, open_store

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "DiskFullError",
    "DistillError",
    "Embeddings",
    "LogitStore",
    "Manifest",
    "ManifestMismatchError",
    "NotCommittedError",
    "Problem",
    "Records",
    "ShardWriter",
    "StoreAccessError",
    "StoreChangedError",
    "StoreDamagedError",
    "StoreError",
    "StoreInputError",
    "StoreLockedError",
    "convert_store",
    "create_store",
    "open_store",
    "recipe_hash",
    "record_seeds",
]
