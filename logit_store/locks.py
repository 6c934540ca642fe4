"""Advisory locks on (epoch, shard) write ranges, so two writers never share a range.

flock locks belong to the open file and vanish when the process dies (even by
SIGKILL), so an interrupted save never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os

from .errors import StoreLockedError


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
