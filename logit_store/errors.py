"""The toolkit's one error root, and the errors of the logit store.

`DistillError` is the root of every error that is the input's fault: a recipe, a dataset,
a teacher spec, a checkpoint file or a store that cannot be used. Every package derives its
errors from it, and the command-line tools catch exactly it: an input error is one line and
exit code 2, anything else (a bug) is a traceback. It lives here because the store is the
package every other one imports and that imports none of them.

An error that is also an operating-system failure (a full disk, an object store out of reach) derives from
OSError too, as Python's own `io.UnsupportedOperation` does: a caller's `except OSError` sees it. Code that
translates raw OSErrors into errors of this toolkit must therefore let a `DistillError` pass first (it is
named already).
"""

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager


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


class StoreChangedError(StoreError):
    """A store that is no longer the one a reader pinned (`logit_store.pin`): replaced or written again under a
    running training. Names the store and the plane."""


class StoreAccessError(StoreError, OSError):
    """An object store that cannot be reached, refuses the credentials or lacks the bucket: the location's
    fault, not the bytes'. Names the location (credentials redacted)."""


class DiskFullError(DistillError, OSError):
    """A write failed because the file system is full (ENOSPC) or over quota; names the path."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full(err: BaseException, path: object) -> DiskFullError | None:
    """The DiskFullError for `err`, raised while writing `path`, or None if `err` is another failure.
    An OSError says so by its errno; lmdb's errors only by their message (they carry no errno)."""
    chain: list[BaseException] = []  # torch's writer, failing to finish its file, hides the OSError in __context__
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    full = [
        e
        for e in chain
        if (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS) or os.strerror(errno.ENOSPC) in str(e)
    ]
    if not full:
        return None
    where = getattr(full[0], "filename", None) or path
    return DiskFullError(
        f"disk full: cannot write {where} (no space left on its file system); free space, then run again"
    )


@contextmanager
def disk_full_named(path: object) -> Iterator[None]:
    """Let a disk-full failure of the writes inside surface as one DiskFullError naming the file (or `path`)."""
    try:
        yield
    except DiskFullError:
        raise  # named already, by the innermost write
    except Exception as err:
        full = disk_full(err, path)
        if full is None:
            raise
        raise full from err
