"""The logit store: sparse teacher outputs (or embeddings) per (epoch, sample), durable and checked.

Format: docs/STORE_FORMAT.md. numpy, zarr and lmdb only; the torch helpers for
sparsifying and rebuilding live in `logit_store.sparse`.

Modules, each importing only those below it: `errors`; `registry`, `location`, `locks`, `records`, `codec`;
`manifest`; `backends` (by entry point); `commits`, `statistics`; `cache`, `writer`, `integrity`, `growth`; `store`
(LogitStore); `api` (open, create, convert); `pin`; `cli`. `logit_store.testing` is the back-end contract
suite (it needs pytest; nothing else imports it).
"""

from ._version import __version__ as __version__
from .api import convert_store, create_store, open_store
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
from .integrity import Problem
from .manifest import FORMAT_VERSION, KINDS, Manifest, recipe_hash
from .records import Embeddings, Records, record_seeds
from .store import LogitStore
from .writer import ShardWriter

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
