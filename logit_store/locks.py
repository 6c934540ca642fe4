"""Advisory locks on (epoch, shard) write ranges, so two writers never share a range, and the lock of a
store's manifest updates (`manifest_lock`).

flock locks belong to the open file and vanish when the process dies (even by
SIGKILL), so an interrupted save never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import StoreLockedError, disk_full_named
from .location import StoreLocation


class RangeLock:
    """An exclusive, non-blocking lock on one file under the store's `.locks/` directory."""

    def __init__(self, directory: str, name: str, what: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, name)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise StoreLockedError(f"{what} is being written by another process (lock {self.path})") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None


MANIFEST_LOCK = "manifest"  # under .locks/: held by whoever rewrites manifest.json (grow, provenance, statistics)
# How long an update of an object store's manifest waits for another's lock object to go (seconds).
REMOTE_LOCK_WAIT = 30.0


@contextmanager
def manifest_lock(location: StoreLocation) -> Iterator[None]:
    """Held while the manifest is read, changed and rewritten, so no update loses another's. Locally a
    blocking flock on `.locks/manifest` (gone with its process, even killed); on an object store the object
    `.locks/manifest`, created only where none is (a conditional write) and removed after; one that stays
    REMOTE_LOCK_WAIT seconds (its process killed) is a StoreLockedError naming it."""
    path = location.path(".locks", MANIFEST_LOCK)
    if location.is_local:
        with disk_full_named(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock
        return
    deadline = time.monotonic() + REMOTE_LOCK_WAIT
    while not _create(location, path):
        if time.monotonic() >= deadline:
            raise StoreLockedError(
                f"{location}: its manifest is being updated by another process (lock object "
                f"{location}/.locks/{MANIFEST_LOCK}); if none is (one was killed), delete that object"
            )
        time.sleep(0.2)
    try:
        yield
    finally:
        with location.reaching():
            location.fs.rm(path)


def _create(location: StoreLocation, path: str) -> bool:
    """Create the object `path` unless it exists (a conditional write); whether it was created."""
    with location.reaching():
        try:
            location.fs.pipe_file(path, b"", mode="create")
        except FileExistsError:
            return False
    return True
