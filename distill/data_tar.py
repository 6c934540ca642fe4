"""webdataset tar shards (``wds:PATTERN``), read in place: an image member per sample, with a ``.cls`` label
and/or a ``.txt`` caption under the same key. A member larger than its cap (``MAX_IMAGE_BYTES`` for an image,
``MAX_TEXT_MEMBER_BYTES`` for a label or caption) is refused naming it when the shards are indexed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tarfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from .data import MAX_IMAGE_BYTES, NO_LABEL, ImageDataset, stat_key
from .errors import DatasetError
from .files import MiB, size_text

__all__ = ["TarDataset"]

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_OPEN_SHARDS = 64  # per process; the least recently used shard file is closed past this
MAX_TEXT_MEMBER_BYTES = 1 * MiB  # a tar shard's .cls or .txt member (a label, a caption)
# webdataset's rule: the key is the member path up to the first dot of its base name.
_WDS_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class TarDataset(ImageDataset):
    """webdataset shards read in place: members are indexed once (key -> shard, data offset, size)
    and ``load`` does one seek and read. Shard files are opened lazily, once per process, so the
    dataset is safe to use from forked DataLoader workers (and pickles without open files).

    A sample is an image member plus a ``.cls`` label and/or a ``.txt`` caption (UTF-8, stripped,
    not empty) under the same key. When any sample of the shard set has a ``.txt``, the dataset is
    an image-text dataset and every sample needs one. ``.cls`` labels are on all samples or none
    (none: an unlabelled dataset, no classes, every label ``NO_LABEL``). Captions are read once,
    when the shards are indexed.
    """

    def __init__(self, pattern: str, spec: str | None = None, skip_unreadable: bool = False) -> None:
        self.shards = _find_shards(pattern)
        samples = [(s, sample) for s, shard in enumerate(self.shards) for sample in _index_shard(shard)]
        with_captions = any(sample.caption is not None for _, sample in samples)
        with_labels = any(sample.label is not None for _, sample in samples)
        for s, sample in samples:
            where = f"{self.shards[s]}: sample '{sample.key}' ({sample.member})"
            if with_captions and sample.caption is None:
                raise DatasetError(f"{where} has no .txt caption member (other samples of these shards have one)")
            if sample.label is None and with_labels:
                raise DatasetError(f"{where} has no .cls label member (other samples of these shards have one)")
        names = [f"{self.shards[s].name}/{sample.member}" for s, sample in samples]
        labels = [NO_LABEL if sample.label is None else sample.label for _, sample in samples]
        sizes = [sample.size for _, sample in samples]
        captions = [sample.caption for _, sample in samples] if with_captions else None
        self._shard_of = np.asarray([s for s, _ in samples], dtype=np.int32)
        self._offsets = np.asarray([sample.offset for _, sample in samples], dtype=np.int64)
        self._pid: int | None = None
        self._files: dict[int, BinaryIO] = {}
        self._lock = threading.Lock()
        classes = [str(i) for i in range(max(labels) + 1)] if with_labels else []
        super().__init__(spec or f"wds:{pattern}", classes, names, labels, sizes, skip_unreadable, captions)

    def _where(self, i: int) -> str:
        member = self._names[i].split("/", 1)[1]
        return f"{self.shards[self._shard_of[i]]}:{member}"

    def _stat_key(self, i: int) -> str:
        return f"{stat_key(self.shards[self._shard_of[i]])}@{self._offsets[i]}"

    def _take(self, keep: np.ndarray) -> None:
        self._shard_of = self._shard_of[keep]
        self._offsets = self._offsets[keep]

    def _read_bytes(self, i: int) -> bytes:
        shard, offset, size = int(self._shard_of[i]), int(self._offsets[i]), int(self._sizes[i])
        try:
            with self._process_lock():
                f = self._shard_file(shard)
                f.seek(offset)
                data = f.read(size)
        except OSError as err:
            raise DatasetError(f"{self._where(i)}: cannot read ({err.strerror or err})") from err
        if len(data) != size:
            raise DatasetError(f"{self._where(i)}: the shard is truncated (read {len(data)} of {size} bytes)")
        return data

    def _process_lock(self) -> threading.Lock:
        """This process's lock; on first use in a new process (e.g. a forked worker) handles start afresh."""
        if self._pid != os.getpid():
            self._pid, self._files, self._lock = os.getpid(), {}, threading.Lock()
        return self._lock

    def _shard_file(self, shard: int) -> BinaryIO:
        f = self._files.pop(shard, None)
        if f is None:
            if len(self._files) >= MAX_OPEN_SHARDS:
                self._files.pop(next(iter(self._files))).close()
            f = open(self.shards[shard], "rb")  # noqa: SIM115 - kept open across loads, closed by close()
        self._files[shard] = f  # most recently used last
        return f

    def close(self) -> None:
        """Close the shard files this process opened (a later ``load`` reopens them)."""
        files, self._files = self._files, {}
        for f in files.values():
            f.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # e.g. __init__ failed before the handles existed
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pid=None, _files={}, _lock=None)
        return state


def _find_shards(pattern: str) -> list[Path]:
    """Shards for a glob pattern, a folder (its *.tar) or one tar path, sorted by path."""
    expanded = os.path.expanduser(pattern)
    if not expanded:
        raise DatasetError("wds: needs a shard path or glob pattern, e.g. wds:data/shard-*.tar")
    if re.search(r"[*?[]", expanded):
        paths = sorted(p for p in glob.glob(expanded) if os.path.isfile(p))
        if not paths:
            raise DatasetError(f"no tar shards match '{pattern}'")
    elif os.path.isdir(expanded):  # regular files only: tarfile would wait forever on a FIFO named x.tar
        paths = sorted(p for p in glob.glob(os.path.join(glob.escape(expanded), "*.tar")) if os.path.isfile(p))
        if not paths:
            raise DatasetError(f"folder '{pattern}' holds no .tar shards")
    elif os.path.isfile(expanded):
        paths = [expanded]
    elif os.path.exists(expanded):
        raise DatasetError(f"tar shard '{pattern}' is not a regular file")
    else:
        raise DatasetError(f"tar shard '{pattern}' does not exist")
    return [Path(p).absolute() for p in paths]


class _ShardSample(NamedTuple):
    key: str
    member: str  # the image member's name
    offset: int  # of the image's data in the shard
    size: int
    label: int | None  # from the .cls member, if any
    caption: str | None  # from the .txt member, if any


def _index_shard(shard: Path) -> list[_ShardSample]:
    """One entry per sample key, in first-appearance order; its .cls and .txt parsed when present."""
    images: dict[str, tarfile.TarInfo] = {}
    texts: dict[str, dict[str, tuple[tarfile.TarInfo, bytes]]] = {"cls": {}, "txt": {}}
    keys: dict[str, None] = {}  # ordered set of keys that have an image, a label or a caption
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                match = _WDS_MEMBER.match(member.name) if member.isfile() else None
                if match is None:
                    continue
                key, extension = match.group(1), match.group(2).lower()
                if extension in WDS_IMAGE_EXTENSIONS and key not in images:
                    _refuse_large_member(shard, member, MAX_IMAGE_BYTES, "an image member")
                    images[key] = member
                elif extension in texts:
                    _refuse_large_member(shard, member, MAX_TEXT_MEMBER_BYTES, f"a .{extension} member")
                    handle = tar.extractfile(member)
                    texts[extension][key] = (member, handle.read() if handle else b"")
                else:
                    continue
                keys.setdefault(key)
    except (tarfile.TarError, OSError) as err:
        raise DatasetError(f"{shard}: not a readable uncompressed tar shard ({err})") from err
    samples = []
    for key in keys:
        if key not in images:
            found = " and ".join(f".{ext}" for ext in texts if key in texts[ext])
            raise DatasetError(
                f"{shard}: sample '{key}' has a {found} but no image member ({'/'.join(WDS_IMAGE_EXTENSIONS)})"
            )
        label = caption = None
        if key in texts["cls"]:
            member, text = texts["cls"][key]
            value = text.decode("utf-8", "replace").strip()
            if not value.isdecimal():  # isdigit would pass '²', which int() rejects
                raise DatasetError(f"{shard}:{member.name}: label {value!r} is not a non-negative integer")
            label = int(value)
        if key in texts["txt"]:
            member, text = texts["txt"][key]
            try:
                caption = text.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise DatasetError(f"{shard}:{member.name}: the caption is not UTF-8 text ({err})") from err
            if not caption:
                raise DatasetError(f"{shard}:{member.name}: empty caption")
        image = images[key]
        samples.append(_ShardSample(key, image.name, image.offset_data, image.size, label, caption))
    return samples


def _refuse_large_member(shard: Path, member: tarfile.TarInfo, limit: int, what: str) -> None:
    """A member's header may claim any size (a sparse 8 GB member costs no disk): refuse it before it is read."""
    if member.size > limit:
        raise DatasetError(
            f"{shard}:{member.name}: {size_text(member.size)}, more than the {size_text(limit)} allowed for {what}"
        )


def create_tar_dataset(body: str, spec: str, split: str, skip_unreadable: bool, cache_dir: str | None) -> ImageDataset:
    """The builder of ``wds:PATTERN`` in ``distill.data.DATASETS``."""
    return TarDataset(body, spec=spec, skip_unreadable=skip_unreadable)
