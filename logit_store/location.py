"""Where a store lives: a local directory or an fsspec URL, with credentials kept out of sight."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from typing import Any

import fsspec

from .errors import StoreError, disk_full_named

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")


def redact(url: str) -> str:
    """The URL with any user:password@ part and query string removed, for messages and manifests."""
    return _CREDENTIALS.sub(r"\g<scheme>***@", str(url)).split("?", 1)[0]


_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted (`redact`): for any message or file that may quote a location."""
    return _URL.sub(lambda match: redact(match.group(0)), text)


def write_file(path: str, data: bytes) -> None:
    """Write a new file and make it durable (one place, so tests can make the disk full here)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class StoreLocation:
    """A root directory reached through fsspec (local paths use the local filesystem)."""

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        url = os.fspath(url)
        self.url = url
        self.storage_options = storage_options or {}
        self.is_local = "://" not in url or url.startswith("file://")
        if self.is_local:
            self.root = os.path.abspath(url.removeprefix("file://"))
            self.fs = fsspec.filesystem("file")
        else:
            try:
                self.fs, self.root = fsspec.core.url_to_fs(url, **self.storage_options)
            except ImportError as err:  # fsspec names the package its protocol needs: "Install s3fs to access S3"
                raise StoreError(f"{redact(url)}: {err} (pip install it into this environment)") from None
            except ValueError as err:  # an unknown protocol
                raise StoreError(f"{redact(url)}: {err}") from None

    def __str__(self) -> str:
        return redact(self.url)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole file; locally through a rename, so a reader never sees half of it."""
        target = self.path(*parts)
        if not self.is_local:
            self.fs.pipe_file(target, data)
            return
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        try:
            with disk_full_named(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                write_file(tmp, data)
                os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # no temporary file outlives a failed write
            raise
        dir_fd = os.open(os.path.dirname(target), os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def list_files(self, *parts: str) -> list[str]:
        base = self.path(*parts)
        if not self.fs.exists(base):
            return []
        return sorted(self.fs.find(base))

    def bytes_used(self) -> int:
        return int(sum(self.fs.du(self.root, total=False).values()))
