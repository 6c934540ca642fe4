"""Reading a file a user named: only a regular file, and only up to a size cap.

``open()`` on a FIFO blocks until a writer comes, and reading ``/dev/zero`` (or a link to it) or a sparse
file of many gigabytes ends in a MemoryError. So a path is opened non-blocking, checked by ``fstat`` on the
open descriptor (what is checked is what is read, even if the path is swapped meanwhile) and read to at most
the cap plus one byte. A refusal is a ``RefusedFile``, an ``OSError`` whose text is the reason, so the
callers' ``except OSError`` handlers name the file as they do for any other read error.
"""

from __future__ import annotations

import os
import stat

MiB = 1 << 20

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class RefusedFile(OSError):
    """A path that is not a regular file, or a file larger than its cap; ``str()`` is the reason."""


def size_text(size: int) -> str:
    """``size`` bytes for a message: '8 GiB', '300 bytes', '1048581 bytes (1.0 MiB)' (exact when not whole, so a
    size just over a limit never reads as equal to it)."""
    if size < 1024:
        return f"{size} bytes"
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{size} bytes ({value:.1f} {unit})"
    raise AssertionError(size)  # unreachable: size >= 1024 matches KiB


def refuse_unless_regular(mode: int, size: int, limit: int, what: str = "a file") -> None:
    """RefusedFile unless ``mode`` is a regular file's and ``size`` is at most ``limit`` bytes (``what``: the
    kind of file, for the message)."""
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise RefusedFile(f"{kind}, not a regular file")
    if size > limit:
        raise RefusedFile(f"{size_text(size)}, more than the {size_text(limit)} allowed for {what}")


def read_regular_file(path: str | os.PathLike, limit: int, what: str = "a file") -> bytes:
    """The bytes of the regular file ``path``; RefusedFile for anything else or more than ``limit`` bytes,
    another OSError when it cannot be opened or read."""
    # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer; no effect on regular files.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:  # owns fd from here on
        info = os.fstat(fd)
        refuse_unless_regular(info.st_mode, info.st_size, limit, what)
        data = f.read(limit + 1)  # bounded even if the file grew since fstat
    if len(data) > limit:
        raise RefusedFile(f"grew past the {size_text(limit)} allowed for {what} while it was read")
    return data
