"""The engine's input errors, under the toolkit's one root `DistillError` (see `logit_store.errors`).

The command-line tools catch exactly `DistillError`: one line naming the file, key or field at
fault and exit code 2. Any other exception is a bug and keeps its traceback.
"""

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from logit_store.errors import DistillError

__all__ = ["DatasetError", "DistillError", "DivergedError", "PathError", "RecipeError", "paths_named"]


class RecipeError(DistillError):
    """A recipe that cannot run; the message names the file and the key path at fault."""


class DatasetError(DistillError):
    """A dataset spec, file or sample that cannot be used; the message names it."""


class DivergedError(DistillError):
    """A run whose loss or weights became non-finite (nan, inf); names the step. Nothing of it past its last
    finite checkpoint is written."""


class PathError(DistillError):
    """A path the file system refuses for what it is, not for a bug: a name too long, a read-only mount."""


# What the file system says of a path, as the one line of an error ({} is the path).
_PATH_ERRNOS = {
    errno.ENAMETOOLONG: "path {}: a folder or file name in it is longer than the file system allows (often 255 bytes)",
    errno.EROFS: "cannot write {}: its file system is read-only",
    errno.EACCES: "cannot write {}: permission denied",
    errno.EPERM: "cannot write {}: operation not permitted",
    errno.ENOTDIR: "path {}: a part of it is a file, not a folder",
}


@contextmanager
def paths_named(path: object) -> Iterator[None]:
    """Let the OSErrors of `_PATH_ERRNOS` raised inside surface as one PathError naming the path (the OS's, else
    `path`); any other OSError stays what it is."""
    try:
        yield
    except OSError as err:
        if err.errno not in _PATH_ERRNOS:
            raise
        raise PathError(_PATH_ERRNOS[err.errno].format(err.filename or path)) from err
