"""Storage back-ends behind one interface (`Backend`), found by name and imported on first use.

Back-ends are the entry points of the group `logit_store.backends` (this package's pyproject.toml names zarr
and lmdb); another installed package adds one the same way, and checks it with `logit_store.testing`.
`create_backend` is the one check of a manifest's back-end name.
"""

from __future__ import annotations

from ..errors import StoreInputError
from ..location import StoreLocation
from ..manifest import Manifest
from ..registry import Registry
from .base import Backend

BACKENDS: Registry[type[Backend]] = Registry(
    "store back-end", StoreInputError, group="logit_store.backends", duplicates="warn"
)


def create_backend(location: StoreLocation, manifest: Manifest) -> Backend:
    """The back-end the manifest names, over `location`; an unknown name is a StoreInputError naming the store
    and listing the installed back-ends and the close names."""
    try:
        backend = BACKENDS.get(manifest.backend)
    except StoreInputError as err:
        raise StoreInputError(f"{location}: manifest: {err}") from None
    return backend(location, manifest)


__all__ = ["BACKENDS", "Backend", "create_backend"]
