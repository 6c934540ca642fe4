"""Storage backends behind one interface; `create_backend(name, ...)` picks one."""

from __future__ import annotations

from ..location import StoreLocation
from ..manifest import Manifest
from .base import Backend
from .lmdb_backend import LmdbBackend
from .zarr_backend import ZarrBackend

BACKENDS: dict[str, type[Backend]] = {"zarr": ZarrBackend, "lmdb": LmdbBackend}


def create_backend(location: StoreLocation, manifest: Manifest) -> Backend:
    return BACKENDS[manifest.backend](location, manifest)


__all__ = ["BACKENDS", "Backend", "LmdbBackend", "ZarrBackend", "create_backend"]
