"""Webdataset tar shards for the dataset tests: members written in the order given."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """A regular file member `name` holding `payload`."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes | str]]]) -> Path:
    """A tar of samples (key, {extension: payload}), members `key.extension` in order; str payloads UTF-8."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, payload in members.items():
                add_member(tar, f"{key}.{extension}", payload.encode() if isinstance(payload, str) else payload)
    return path
