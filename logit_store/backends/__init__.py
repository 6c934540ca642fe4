"""Storage back-ends behind one interface (`Backend`), registered once by name and imported on first use."""

from __future__ import annotations

from ..errors import StoreInputError
from ..location import StoreLocation
from ..manifest import Manifest
from ..registry import Registry
from .base import Backend

BACKENDS: Registry[type[Backend]] = Registry("store back-end", StoreInputError)
BACKENDS.register("zarr", "logit_store.backends.zarr_backend:ZarrBackend")
BACKENDS.register("lmdb", "logit_store.backends.lmdb_backend:LmdbBackend")


def create_backend(location: StoreLocation, manifest: Manifest) -> Backend:
    return BACKENDS.get(manifest.backend)(location, manifest)


__all__ = ["BACKENDS", "Backend", "create_backend"]
