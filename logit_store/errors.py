"""The toolkit's one error root, and the errors of the logit store.

`DistillError` is the root of every error that is the input's fault: a recipe, a dataset,
a teacher spec, a checkpoint file or a store that cannot be used. Every package derives its
errors from it, and the command-line tools catch exactly it: an input error is one line and
exit code 2, anything else (a bug) is a traceback. It lives here because the store is the
package every other one imports and that imports none of them.
"""

import errno


class DistillError(ValueError):
    """Input that cannot be used; the message names the file, key, field or range at fault."""


class StoreError(DistillError):
    """Base class of every logit-store error."""


class StoreInputError(StoreError):
    """Records or arguments that do not fit the store (shape, dtype, range, NaN)."""


class ManifestMismatchError(StoreError):
    """An existing store was opened with a manifest that differs from the one asked for."""


class StoreLockedError(StoreError):
    """Another process is writing the same (epoch, record range)."""


class NotCommittedError(StoreError, KeyError):
    """A read asked for records whose range has not been committed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class StoreDamagedError(StoreError):
    """Store bytes that cannot be what was committed: a file shorter than its own header says,
    a shard that fails its checksum or cannot be decoded. The message names file or range."""


class DiskFullError(DistillError):
    """A write failed because the file system is full (ENOSPC) or over quota; names the path."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full(err: BaseException, path: object) -> DiskFullError | None:
    """The DiskFullError to raise for `err` while writing `path`, or None if `err` is another failure."""
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return DiskFullError(f"disk full: no space left to write {path} ({err.strerror})")
    return None
