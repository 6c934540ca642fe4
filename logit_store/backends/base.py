"""The interface every backend implements: whole shards of packed rows in, rows out."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..location import StoreLocation
from ..manifest import Manifest
from ..records import row_dtype


class Backend(ABC):
    """Holds the records; knows nothing of commits, locks or checks (the store does)."""

    def __init__(self, location: StoreLocation, manifest: Manifest) -> None:
        self.location = location
        self.manifest = manifest
        m = manifest
        self.row_dtype = row_dtype(m.k, m.num_classes, m.mixing, m.kind, m.embed_dim, m.format_version)

    @abstractmethod
    def create(self) -> None:
        """Lay out an empty store under the location (called once, before any write)."""

    @abstractmethod
    def write_rows(self, epoch: int, start: int, rows: np.ndarray) -> None:
        """Write records [start, start + len(rows)) of a plane (an epoch, or the text plane);
        always one whole shard."""

    @abstractmethod
    def read_rows(self, epoch: int, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Records [start, stop) of a plane as packed rows (into `out` when given);
        raises if they cannot be decoded."""

    def named_files(self, shards: list[tuple[int, int]]) -> list[tuple[str, ...]]:
        """The files (each the parts of a path under the store's root) that hold these (plane, shard)s' records,
        and those every range depends on: what a reader fetches by name where nothing can be listed (a web
        location). The default names none."""
        return []

    def grow(self) -> None:  # noqa: B027 (optional hook)
        """Make room for the planes of `self.manifest` (it says more than the store had), reading the
        store's layout as it is now, never as this process cached it; planes already there keep their rows,
        and none is ever removed. Called before the manifest on the store says so, under its manifest lock;
        calling it again is harmless. The default: planes need no room (lmdb: keys are per plane)."""

    def check_shared(self) -> None:  # noqa: B027 (optional hook)
        """Raise StoreDamagedError naming a damaged file that every record range depends on (an array's
        metadata, a data file's header): such damage is not a shard's, so `repair` must not drop commits
        for it. The default: the backend has no such file."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release handles (the default holds none)."""
