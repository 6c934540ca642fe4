"""Image (and image-text) datasets with stable sample ids, labels and a fingerprint.

Every sample has an integer id in [0, N) and a label, ``NO_LABEL`` (-1) for an unlabelled image:
a teacher needs no labels, so a store can cover images nobody labelled. ``fingerprint()`` is a sha256 over
the count, the class names and, per id, the label, the file (or tar member) size and the
relative path, so a logit store can check that training reads the data it was saved from.
Moving the data elsewhere keeps the fingerprint; renaming, resizing or relabelling a file
changes it.

Image-text datasets (``has_captions``) also hold one caption per sample: ``caption(id)`` is
the text of sample ``id`` and ``captions`` all of them in id order; every caption is part of
the fingerprint. Images still come from ``load(id)``, so replayable augmentation is the same
for both kinds. An image with several captions is several samples (one per caption: one CSV
row or one shard sample each), so each sample is exactly one (image, caption) pair. Without
labels (a ``pairs:`` file with no ``label`` column, shards with ``.txt`` but no ``.cls``)
``classes`` is empty, ``has_labels`` is False and every label is ``NO_LABEL`` (-1).

Specs accepted by ``create_dataset``:

- ``digits``: scikit-learn's 8x8 handwritten digits, written once as 32x32 PNGs to
  ``<cache>/digits/{train,val}/<class>/<index>.png`` (fixed 80/20 split)
- ``PATH``: an image folder, one sub-folder per class, images found recursively (a folder of
  images with no class sub-folders is unlabelled; ``unlabeled:PATH`` ignores class folders);
  ids sorted by (class name, relative path)
- ``csv:PATH``: a CSV/TSV with a ``path`` and an optional ``label`` column (an empty label: an
  unlabelled image); ids = row order
- ``wds:PATTERN``: webdataset tar shards (glob, folder or one ``.tar``), labels from ``.cls``
  members and, when the shards have them, captions from ``.txt`` members (then every sample
  needs a ``.txt``; ``.cls`` becomes optional, but all or none); ids follow shard order then
  member order
- ``pairs:PATH``: a CSV/TSV of image-caption pairs with ``path`` and ``caption`` columns and an
  optional ``label`` column; ids = row order
- ``digits-captions``: ``digits`` (same files, split and ids) with the caption
  ``DIGIT_CAPTION_TEMPLATE.format(DIGIT_NAMES[label])``, e.g. "a photo of the number seven"
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import tarfile
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple

import numpy as np
from PIL import Image

from logit_store.errors import disk_full
from logit_store.registry import Registry

from .errors import DatasetError
from .files import MiB, RefusedFile, read_regular_file, refuse_unless_regular, size_text

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SPEC_FORMS = (
    "digits",
    "PATH (a folder with one sub-folder per class, or of unlabelled images)",
    "unlabeled:PATH",
    "csv:PATH",
    "wds:PATTERN",
    "pairs:PATH",
    "digits-captions",
)
CAPTION_SPEC_FORMS = ("pairs:PATH", "wds:PATTERN (with .txt members)", "digits-captions")
DIGITS_SPLITS = ("train", "val")
DIGITS_SIZE = 32
DIGITS_TRAIN_FRACTION = 0.8
DIGITS_SEED = 0
FINGERPRINT_VERSION = "distill-dataset-v1"
FingerprintMode = Literal["fast", "content"]
MAX_OPEN_SHARDS = 64  # per process; the least recently used shard file is closed past this
# Larger image files or tar members are refused naming them: far above any photo (a 100-megapixel RGB TIFF is
# 300 MB uncompressed), small enough that reading one cannot exhaust memory (an 8 GB sparse member would).
MAX_IMAGE_BYTES = 512 * MiB
MAX_TEXT_MEMBER_BYTES = 1 * MiB  # a tar shard's .cls or .txt member (a label, a caption)
_AN_IMAGE = "an image file"
NO_LABEL = -1  # the label of every sample of an image-text dataset that has no labels
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_CAPTION_TEMPLATE = "a photo of the number {}"  # str.format with a DIGIT_NAMES entry

_SPEC_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_INTEGER = re.compile(r"[+-]?\d+")
# webdataset's rule: the key is the member path up to the first dot of its base name.
_WDS_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


# ---------------------------------------------------------------- base class


class _Strings:
    """Many strings held as one bytes blob plus offsets: compact, and no per-item objects
    whose refcounts would un-share memory in forked DataLoader workers."""

    def __init__(self, items: Iterable[str]) -> None:
        encoded = [item.encode("utf-8") for item in items]
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        self._offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])
        self._blob = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._blob[self._offsets[i] : self._offsets[i + 1]].decode("utf-8")

    def take(self, indices: np.ndarray) -> _Strings:
        return _Strings(self[int(i)] for i in indices)


class ImageDataset(ABC):
    """Samples with dense ids [0, N), labels and a fingerprint.

    Subclasses list their samples (a relative name, a label and a byte size per sample, and
    for an image-text dataset a caption, set up before calling ``__init__``) and say how to
    read one sample's encoded bytes.
    """

    def __init__(
        self,
        spec: str,
        classes: Sequence[str],
        names: Sequence[str],
        labels: Sequence[int],
        sizes: Sequence[int],
        skip_unreadable: bool = False,
        captions: Iterable[str] | None = None,
    ) -> None:
        self.spec = spec
        self.classes: list[str] = list(classes)
        self.skipped: list[str] = []
        self._names = _Strings(names)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int64)
        self._captions = None if captions is None else _Strings(captions)
        if self._captions is not None and len(self._captions) != len(self._names):
            raise ValueError(f"{spec}: {len(self._captions)} captions for {len(self._names)} samples")
        self._fingerprints: dict[str, str] = {}
        if skip_unreadable:
            self._drop_unreadable()
        if len(self) == 0:
            extra = f" ({len(self.skipped)} unreadable file(s) skipped)" if self.skipped else ""
            raise DatasetError(f"{spec}: the dataset holds no images{extra}")
        self.labels.flags.writeable = False  # the cached fingerprint depends on it

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, num_samples={len(self)}, num_classes={self.num_classes})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_labels(self) -> bool:
        """False for an image-text dataset without labels (no classes; every label is NO_LABEL)."""
        return bool(self.classes)

    @property
    def has_captions(self) -> bool:
        """True for an image-text dataset: one caption per sample, ``caption(id)``."""
        return self._captions is not None

    @property
    def captions(self) -> list[str]:
        """Every caption in id order (caption i belongs to sample id i); a new list each call.

        DatasetError if the dataset has no captions (see ``has_captions``).
        """
        captions = self._require_captions()
        return [captions[i] for i in range(len(captions))]

    def caption(self, sample_id: int) -> str:
        """The caption of sample ``sample_id``; DatasetError if the dataset has no captions."""
        captions = self._require_captions()
        return captions[self._index(sample_id)]

    def _require_captions(self) -> _Strings:
        if self._captions is None:
            raise DatasetError(
                f"{self.spec}: the dataset has no captions (image-text specs: {', '.join(CAPTION_SPEC_FORMS)})"
            )
        return self._captions

    def load(self, sample_id: int) -> Image.Image:
        """Sample ``sample_id`` decoded as an RGB image; DatasetError naming the file if it cannot be."""
        i = self._index(sample_id)
        data = self._read_bytes(i)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except Exception as err:
            raise DatasetError(
                f"{self._where(i)}: not a readable image ({type(err).__name__}: {err}); "
                "--skip-unreadable (data.skip_unreadable in a recipe) drops such files"
            ) from err

    def fingerprint(self, mode: FingerprintMode = "fast") -> str:
        """sha256 hex of the dataset (computed once per mode).

        "fast": over count, class names, and per id: label, size and relative path, and the caption of an
        image-text dataset (a dataset without captions hashes as it always has). "content" also hashes every
        sample's bytes, so two equal-size images swapped between classes change it; the bytes' hashes are
        cached under `<cache>/fingerprints/`, keyed by each file's name, size, mtime and inode, so a dataset
        is read once, and again only where a file changed.
        """
        if mode not in self._fingerprints:
            fast = _fingerprint(self.classes, self.labels, self._sizes, self._names, self._captions)
            self._fingerprints[mode] = fast if mode == "fast" else self._content_fingerprint(fast)
        return self._fingerprints[mode]

    def _content_fingerprint(self, fast: str) -> str:
        cache_file = cache_root() / "fingerprints" / f"{hashlib.sha256(self.spec.encode()).hexdigest()[:32]}.json"
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        digest, fresh = hashlib.sha256(f"{fast}\ncontent\n".encode()), {}
        for i in range(len(self)):
            key = self._stat_key(i)
            sample = cache.get(key) or hashlib.sha256(self._read_bytes(i)).hexdigest()
            fresh[key] = sample
            digest.update(sample.encode())
        if fresh != cache:
            with contextlib.suppress(OSError):  # a cache that cannot be written costs time, nothing else
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_suffix(f".tmp-{os.getpid()}")
                tmp.write_text(json.dumps(fresh))
                os.replace(tmp, cache_file)
        return digest.hexdigest()

    def describe(self, fingerprint: FingerprintMode = "fast") -> dict[str, Any]:
        """spec, num_samples, num_classes, classes, fingerprint (and its mode), skipped; and has_captions: True
        for image-text."""
        described = {
            "spec": self.spec,
            "num_samples": len(self),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "fingerprint": self.fingerprint(fingerprint),
            "fingerprint_mode": fingerprint,
            "skipped": list(self.skipped),
        }
        if self.has_captions:
            described["has_captions"] = True
        return described

    @abstractmethod
    def _read_bytes(self, i: int) -> bytes:
        """The encoded image of sample i; DatasetError naming it when it cannot be read."""

    @abstractmethod
    def _stat_key(self, i: int) -> str:
        """What identifies sample i's bytes without reading them: file name, size, mtime and inode."""

    @abstractmethod
    def _where(self, i: int) -> str:
        """Where sample i lives, for messages and ``skipped``."""

    def _take(self, keep: np.ndarray) -> None:  # noqa: B027 - optional hook, default: nothing to subset
        """Keep only these samples in the subclass's own tables (called when unreadable files are dropped)."""

    def _index(self, sample_id: int) -> int:
        if isinstance(sample_id, bool | np.bool_) or not isinstance(sample_id, int | np.integer):
            raise TypeError(f"{self.spec}: a sample id must be an integer, got {sample_id!r}")
        i = int(sample_id)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.spec}: sample id {i} is outside [0, {len(self)})")
        return i

    def _drop_unreadable(self) -> None:
        """Verify every sample once; drop the bad ones before ids are final, so ids stay dense."""
        keep = []
        for i in range(len(self)):
            try:
                ok = _verifies(self._read_bytes(i))
            except DatasetError:
                ok = False
            if ok:
                keep.append(i)
            else:
                self.skipped.append(self._where(i))
        if self.skipped:
            indices = np.asarray(keep, dtype=np.int64)
            self._names = self._names.take(indices)
            self._sizes = self._sizes[indices]
            self.labels = self.labels[indices]
            if self._captions is not None:
                self._captions = self._captions.take(indices)
            self._take(indices)


def _verifies(data: bytes) -> bool:
    """True if ``data`` decodes as ``load`` decodes it. ``verify()`` checks structure (PNG chunk CRCs) but
    decodes no pixels, so a truncated JPEG passes it; decoding them all fails on it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:  # verify() leaves the image unusable: open it again
            image.convert("RGB")  # what load() does
    except Exception:
        return False
    return True


def _stat_key(path: Path) -> str:
    try:
        info = os.stat(path)
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the file ({err.strerror or err})") from err
    return f"{path}|{info.st_size}|{info.st_mtime_ns}|{info.st_ino}"


def _fingerprint(
    classes: list[str], labels: np.ndarray, sizes: np.ndarray, names: _Strings, captions: _Strings | None = None
) -> str:
    """Without captions exactly the original (v1) hash; with them a "captions" header line and each
    sample's caption (JSON-quoted) appended to its line."""
    header = f"{FINGERPRINT_VERSION}\n{len(labels)}\n{json.dumps(classes)}\n"
    if captions is not None:
        header += "captions\n"
    digest = hashlib.sha256(header.encode())
    lines: list[str] = []
    for i, (label, size) in enumerate(zip(labels.tolist(), sizes.tolist(), strict=True)):
        caption = "" if captions is None else f"\t{json.dumps(captions[i])}"
        lines.append(f"{i}\t{label}\t{size}\t{json.dumps(names[i])}{caption}\n")
        if len(lines) == 65_536:
            digest.update("".join(lines).encode())
            lines.clear()
    digest.update("".join(lines).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- files: folders and CSV


class _FileDataset(ImageDataset):
    """Samples that are files: name i is a path relative to ``root`` (or absolute, from a CSV)."""

    def __init__(
        self, spec: str, root: Path, classes, names, labels, sizes, skip_unreadable: bool, captions=None
    ) -> None:
        self.root = root
        super().__init__(spec, classes, names, labels, sizes, skip_unreadable, captions)

    def _path(self, i: int) -> Path:
        return self.root / self._names[i]

    def _where(self, i: int) -> str:
        return str(self._path(i))

    def _stat_key(self, i: int) -> str:
        return _stat_key(self._path(i))

    def _read_bytes(self, i: int) -> bytes:
        path = self._path(i)
        try:  # a regular file of bounded size only: a FIFO would hang the reader, /dev/zero exhaust memory
            return read_regular_file(path, MAX_IMAGE_BYTES, _AN_IMAGE)
        except RefusedFile as err:
            raise DatasetError(f"{path}: {err}") from None
        except OSError as err:
            raise DatasetError(f"{path}: cannot read the file ({err.strerror or err})") from err


class FolderDataset(_FileDataset):
    """``root/<class>/**/<image>``: classes = sorted sub-folder names; ids sorted by (class, relative path).
    A folder of images with no class sub-folders, or any folder with ``labeled=False`` (spec
    ``unlabeled:PATH``), is unlabelled: every image under it, ids sorted by relative path.

    Hidden entries (names starting with '.') are ignored, as are files without an image extension.
    A class folder may be a link, but not to the dataset folder or an ancestor, nor into another class
    folder (refused naming it); links below class folders are not followed. An image that is not a
    regular file (a FIFO, a link to a device) or is larger than MAX_IMAGE_BYTES is refused naming it.
    With ``caption_of_class`` (class folder name -> text) it is an image-text dataset whose every
    sample is captioned from its class (used by ``digits-captions``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        spec: str | None = None,
        skip_unreadable: bool = False,
        caption_of_class: Callable[[str], str] | None = None,
        labeled: bool = True,
    ) -> None:
        root = Path(root).expanduser().absolute()
        classes = _class_folders(root) if labeled else []
        if not classes:  # unlabelled: every image under root, by relative path
            files = _images_in(root)
            if not files:
                raise DatasetError(f"{root}: holds no images (looked for {' '.join(IMAGE_EXTENSIONS)} in it)")
            sizes = [_file_size(root / f) for f in files]
            super().__init__(spec or str(root), root, [], files, [NO_LABEL] * len(files), sizes, skip_unreadable)
            return
        names: list[str] = []
        labels: list[int] = []
        sizes: list[int] = []
        for label, name in enumerate(classes):
            files = _images_in(root / name)
            if not files:
                raise DatasetError(
                    f"{root / name}: class folder '{name}' holds no images "
                    f"(looked for {' '.join(IMAGE_EXTENSIONS)} in it and its sub-folders)"
                )
            for relative in files:
                names.append(f"{name}/{relative}")
                labels.append(label)
                sizes.append(_file_size(root / name / relative))
        captions = None
        if caption_of_class is not None:
            texts = [caption_of_class(name) for name in classes]
            captions = [texts[label] for label in labels]
        super().__init__(spec or str(root), root, classes, names, labels, sizes, skip_unreadable, captions)


def _class_folders(root: Path) -> list[str]:
    if not root.exists():
        raise DatasetError(f"dataset folder '{root}' does not exist")
    if not root.is_dir():
        raise DatasetError(f"'{root}' is a file, not a folder (for a CSV use csv:{root}, for tar shards wds:{root})")
    try:
        classes = sorted(e.name for e in os.scandir(root) if not e.name.startswith(".") and e.is_dir())
    except OSError as err:
        raise DatasetError(f"{root}: cannot list the folder ({err.strerror or err})") from err
    if not classes and not any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(root)):
        raise DatasetError(
            f"{root}: no class sub-folders and no images (expected {root}/<class>/<image>, or images for "
            "an unlabelled dataset)"
        )
    _refuse_overlapping_classes(root, classes)
    return classes


def _refuse_overlapping_classes(root: Path, classes: list[str]) -> None:
    """Class folders may be links (a dataset is often assembled from them), but none may lead back to the
    dataset folder or an ancestor, nor into another class folder: its images would be listed again, under a
    second class, with no word. Only class folders are followed; ``_images_in`` follows no link below them."""
    real_root = Path(os.path.realpath(root)).parts
    reals = sorted((Path(os.path.realpath(root / name)).parts, name) for name in classes)
    for real, name in reals:
        if real_root[: len(real)] == real:
            raise DatasetError(
                f"{root / name}: class folder '{name}' links to {Path(*real)}, which holds the dataset folder "
                f"itself: its images would be listed again under '{name}' (remove the link or point it elsewhere)"
            )
    # Sorted by path parts, a folder is followed by its descendants: if any two overlap, two neighbours do.
    for (outer, outer_name), (inner, inner_name) in itertools.pairwise(reals):
        if inner[: len(outer)] == outer:
            how = "the same folder as" if inner == outer else "inside"
            raise DatasetError(
                f"{root / inner_name}: class folder '{inner_name}' ({Path(*inner)}) is {how} class folder "
                f"'{outer_name}' ({Path(*outer)}) once links are followed: its images would be listed under both"
            )


def _images_in(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), as sorted POSIX paths relative to it."""

    def fail(err: OSError) -> None:
        raise DatasetError(f"{err.filename}: cannot list the folder ({err.strerror or err})") from err

    found = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=fail):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        relative = Path(dirpath).relative_to(folder)
        found += [
            (relative / f).as_posix()
            for f in filenames
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return sorted(found)


def _file_size(path: Path) -> int:
    """The size of the image file ``path``; DatasetError unless it is a regular file of at most MAX_IMAGE_BYTES
    (refused when listed, not when first read, so a bad file stops a run before it starts)."""
    try:
        info = os.stat(path)
        refuse_unless_regular(info.st_mode, info.st_size, MAX_IMAGE_BYTES, _AN_IMAGE)
    except RefusedFile as err:
        raise DatasetError(f"{path}: {err}") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the file ({err.strerror or err})") from err
    return info.st_size


class _Row(NamedTuple):
    number: int  # 1-based data row (header excluded, blank lines not counted): sample id + 1
    line: int  # line in the file
    path: str
    label: str


class CsvDataset(_FileDataset):
    """A CSV (or TSV) with a ``path`` column and an optional ``label`` column; ids = row order.

    Relative paths are relative to the CSV's folder. Labels are class names (classes = sorted
    unique names) or, when every label is an integer, indices (classes = "0" .. str(max)). A row
    with an empty label, or every row without a label column, is an unlabelled image (``NO_LABEL``):
    a teacher can still teach it.
    """

    def __init__(self, csv_path: str | os.PathLike, spec: str | None = None, skip_unreadable: bool = False) -> None:
        csv_path = Path(csv_path).expanduser().absolute()
        rows = _read_rows(csv_path)
        classes, labels = _csv_labels(csv_path, rows)
        root = csv_path.parent
        sizes = _row_sizes(csv_path, root, rows)
        names = [row.path for row in rows]
        super().__init__(spec or f"csv:{csv_path}", root, classes, names, labels, sizes, skip_unreadable)


class PairsDataset(_FileDataset):
    """Image-caption pairs from a CSV (or TSV) with ``path`` and ``caption`` columns; ids = row order.

    One row is one sample: an image with several captions takes several rows (several ids).
    Relative paths are relative to the file's folder; captions are stripped of surrounding
    whitespace and may not be empty (quote a caption holding the delimiter, as CSV does). An
    optional ``label`` column is read as ``CsvDataset`` reads it; without it the dataset has no
    classes and every label is ``NO_LABEL``.
    """

    def __init__(self, csv_path: str | os.PathLike, spec: str | None = None, skip_unreadable: bool = False) -> None:
        csv_path = Path(csv_path).expanduser().absolute()
        table = _read_table(csv_path, ("path", "caption"), optional=("label",))
        at = table.columns
        rows: list[_Row] = []
        captions: list[str] = []
        for number, line, cells in table.rows:
            values = {name: cells[k].strip() for name, k in at.items()}
            for name in at:
                if not values[name]:
                    what = "caption" if name == "caption" else f"'{name}'"
                    raise DatasetError(f"{_row_at(csv_path, number, line, (at[name], name))}: empty {what}")
            rows.append(_Row(number, line, values["path"], values.get("label", "")))
            captions.append(values["caption"])
        if "label" in at:
            classes, labels = _csv_labels(csv_path, rows)
        else:
            classes, labels = [], [NO_LABEL] * len(rows)
        root = csv_path.parent
        sizes = _row_sizes(csv_path, root, rows, path_column=at["path"])
        names = [row.path for row in rows]
        super().__init__(spec or f"pairs:{csv_path}", root, classes, names, labels, sizes, skip_unreadable, captions)


def _row_at(path: Path, number: int, line: int, column: tuple[int, str] | None = None) -> str:
    """'PATH: row N (line L)', or with a column (index, name): 'PATH: row N (line L, column C 'NAME')', C from 1."""
    where = f"line {line}" if column is None else f"line {line}, column {column[0] + 1} '{column[1]}'"
    return f"{path}: row {number} ({where})"


def _row_sizes(csv_path: Path, root: Path, rows: list[_Row], path_column: int | None = None) -> list[int]:
    """The byte size of each row's file; DatasetError naming the row (and the path column, if given)."""
    column = None if path_column is None else (path_column, "path")
    sizes = []
    for row in rows:
        where = _row_at(csv_path, row.number, row.line, column)
        full = root / row.path
        try:
            info = os.stat(full)
        except OSError:
            raise DatasetError(f"{where}: file '{row.path}' does not exist (looked for {full})") from None
        try:
            refuse_unless_regular(info.st_mode, info.st_size, MAX_IMAGE_BYTES, _AN_IMAGE)
        except RefusedFile as err:
            raise DatasetError(f"{where}: '{row.path}': {err}") from None
        sizes.append(info.st_size)
    return sizes


class _Table(NamedTuple):
    columns: dict[str, int]  # lower-cased column name -> index: the required ones and the optional ones present
    rows: list[tuple[int, int, list[str]]]  # (data row number, line, cells) per non-blank row


def _read_table(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> _Table:
    """The rows of a CSV/TSV with a header naming (case-insensitively) every ``required`` column.

    Every row has a cell for each column found; blank rows are skipped; cells are not stripped.
    """
    expected = " and ".join(f"'{c}'" for c in required)
    if optional:
        expected += ", optionally " + " and ".join(f"'{c}'" for c in optional)
    if not path.exists():
        raise DatasetError(f"CSV file '{path}' does not exist")
    if not path.is_file():
        raise DatasetError(f"CSV path '{path}' is not a file")
    rows: list[tuple[int, int, list[str]]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            delimiter = _delimiter(path, f.readline())
            f.seek(0)
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{path}: the file is empty (expected a header row with {expected} columns)")
            names = [c.strip().lower() for c in header]
            for column in required:
                if column not in names:
                    raise DatasetError(
                        f"{path}: no '{column}' column in the header {header} (expected columns {expected})"
                    )
            columns = {c: names.index(c) for c in (*required, *optional) if c in names}
            need = max(columns.values()) + 1
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                number = len(rows) + 1
                if len(row) < need:
                    raise DatasetError(
                        f"{path}: row {number} (line {reader.line_num}) has {len(row)} field(s), "
                        f"expected at least {need}"
                    )
                rows.append((number, reader.line_num, row))
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err})") from err
    except csv.Error as err:
        raise DatasetError(f"{path}: malformed CSV ({err})") from err
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the file ({err.strerror or err})") from err
    if not rows:
        raise DatasetError(f"{path}: no data rows after the header")
    return _Table(columns, rows)


def _read_rows(path: Path) -> list[_Row]:
    """Rows with a path and a label ("" where the label column is missing or empty: an unlabelled image)."""
    table = _read_table(path, ("path",), optional=("label",))
    at_path, at_label = table.columns["path"], table.columns.get("label")
    rows: list[_Row] = []
    for number, line, cells in table.rows:
        file, label = cells[at_path].strip(), "" if at_label is None else cells[at_label].strip()
        if not file:
            raise DatasetError(f"{path}: row {number} (line {line}): empty 'path'")
        rows.append(_Row(number, line, file, label))
    return rows


def _delimiter(path: Path, header_line: str) -> str:
    """Tab for .tsv; otherwise the most frequent of , tab ; | in the header line (comma if none)."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    counts = {d: header_line.count(d) for d in (",", "\t", ";", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _csv_labels(path: Path, rows: list[_Row]) -> tuple[list[str], list[int]]:
    """(classes, labels) of the labelled rows, NO_LABEL for the others (empty label: an unlabelled image)."""
    texts = [row.label for row in rows if row.label]
    if not texts:
        return [], [NO_LABEL] * len(rows)
    if all(_INTEGER.fullmatch(text) for text in texts):
        for row in rows:
            if row.label and int(row.label) < 0:
                raise DatasetError(f"{path}: row {row.number} (line {row.line}): label {row.label} is negative")
        classes = [str(i) for i in range(max(int(t) for t in texts) + 1)]
        return classes, [int(row.label) if row.label else NO_LABEL for row in rows]
    classes = sorted(set(texts))
    index = {name: i for i, name in enumerate(classes)}
    return classes, [index[row.label] if row.label else NO_LABEL for row in rows]


# ---------------------------------------------------------------- webdataset tar shards


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
        return f"{_stat_key(self.shards[self._shard_of[i]])}@{self._offsets[i]}"

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


# ---------------------------------------------------------------- digits and create_dataset


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else $DISTILL_CACHE, else ~/.cache/distill."""
    chosen = cache_dir if cache_dir is not None else os.environ.get("DISTILL_CACHE") or "~/.cache/distill"
    return Path(chosen).expanduser().absolute()


def prepare_digits(cache_dir: str | os.PathLike | None = None) -> Path:
    """Write scikit-learn's digits once as ``<cache>/digits/{train,val}/<class>/<index>.png``; return that folder.

    The folder is built in a temporary folder beside it and renamed into place, so readers
    never see half of it; when another process wins the race its copy is used.
    """
    root = cache_root(cache_dir)
    target = root / "digits"
    if not target.exists():
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=root))
        except OSError as err:
            raise DatasetError(f"{root}: cannot write the digits cache ({err.strerror or err})") from err
        try:
            _write_digits(tmp)
            try:
                os.rename(tmp, target)
            except OSError as err:
                if not target.is_dir():  # a real failure, not another process finishing first
                    raise DatasetError(f"{target}: cannot write the digits cache ({err.strerror or err})") from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for split in DIGITS_SPLITS:
        if not (target / split).is_dir():
            raise DatasetError(f"{target}: incomplete digits cache (no '{split}' folder); delete it to rebuild")
    return target


def _write_digits(folder: Path) -> None:
    """1,797 images: values 0..16 scaled to 0..255, upscaled bilinearly to 32x32, stored as
    uncompressed grayscale PNG (so file sizes, hence the fingerprint, do not depend on zlib)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    count = len(digits.images)
    order = np.random.default_rng(DIGITS_SEED).permutation(count)
    n_train = int(count * DIGITS_TRAIN_FRACTION)
    for split, indices in zip(DIGITS_SPLITS, (order[:n_train], order[n_train:]), strict=True):
        for index in sorted(indices.tolist()):
            label = int(digits.target[index])
            pixels = np.round(digits.images[index] * (255 / 16)).astype(np.uint8)
            image = Image.fromarray(pixels).resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BILINEAR)
            out = folder / split / str(label)
            path = out / f"{index:04d}.png"
            try:
                out.mkdir(parents=True, exist_ok=True)
                image.save(path, compress_level=0)
            except OSError as err:  # the caller removes the half-built folder
                full = disk_full(err, path)  # named by `path`: PIL's failed write names no file
                raise full or DatasetError(f"{path}: cannot write the digits cache ({err.strerror or err})") from err


def digit_caption(digit: int) -> str:
    """The caption of a digit image: ``DIGIT_CAPTION_TEMPLATE.format(DIGIT_NAMES[digit])``."""
    return DIGIT_CAPTION_TEMPLATE.format(DIGIT_NAMES[digit])


def digit_caption_of_class(name: str) -> str:
    """The caption of the digits class folder ``name`` ("0" .. "9")."""
    return digit_caption(int(name))


DATASETS: Registry[Callable[..., ImageDataset]] = Registry("dataset spec prefix", DatasetError)


@DATASETS.register("digits")
def _digits(body: str, spec: str, split: str, skip_unreadable: bool, cache_dir: str | None) -> ImageDataset:
    return _digits_folder(spec, split, skip_unreadable, cache_dir)


@DATASETS.register("digits-captions")
def _digits_captions(body: str, spec: str, split: str, skip_unreadable: bool, cache_dir: str | None) -> ImageDataset:
    return _digits_folder(spec, split, skip_unreadable, cache_dir, digit_caption_of_class)


def _digits_folder(
    spec: str, split: str, skip_unreadable: bool, cache_dir: str | None, captioned: Callable[[str], str] | None = None
) -> ImageDataset:
    if split not in DIGITS_SPLITS:
        raise DatasetError(f"{spec}: split must be one of {DIGITS_SPLITS}, got {split!r}")
    root = prepare_digits(cache_dir) / split
    return FolderDataset(root, spec=spec, skip_unreadable=skip_unreadable, caption_of_class=captioned)


@DATASETS.register("csv")
def _csv(body: str, spec: str, split: str, skip_unreadable: bool, cache_dir: str | None) -> ImageDataset:
    return CsvDataset(_needs_path(body, "csv", "data/train.csv"), spec=spec, skip_unreadable=skip_unreadable)


@DATASETS.register("pairs")
def _pairs(body: str, spec: str, split: str, skip_unreadable: bool, cache_dir: str | None) -> ImageDataset:
    return PairsDataset(_needs_path(body, "pairs", "data/captions.tsv"), spec=spec, skip_unreadable=skip_unreadable)


@DATASETS.register("unlabeled")
def _unlabeled(body: str, spec: str, split: str, skip_unreadable: bool, cache_dir: str | None) -> ImageDataset:
    return FolderDataset(_needs_path(body, "unlabeled", "data/images"), spec, skip_unreadable, labeled=False)


@DATASETS.register("wds")
def _wds(body: str, spec: str, split: str, skip_unreadable: bool, cache_dir: str | None) -> ImageDataset:
    return TarDataset(body, spec=spec, skip_unreadable=skip_unreadable)


def _needs_path(body: str, prefix: str, example: str) -> str:
    if not body:
        raise DatasetError(f"{prefix}: needs a file path, e.g. {prefix}:{example}; {_ACCEPTED}")
    return body


_ACCEPTED = f"accepted forms: {', '.join(SPEC_FORMS)}"


def create_dataset(
    spec: str, split: str = "train", skip_unreadable: bool = False, cache_dir: str | None = None
) -> ImageDataset:
    """The dataset a spec names: ``digits``, a folder ``PATH``, ``csv:PATH``, ``wds:PATTERN``,
    ``pairs:PATH`` or ``digits-captions`` (``has_captions`` tells the image-text ones); the forms
    are the entries of ``DATASETS`` ("PREFIX:BODY" or the bare name), any other spec is a folder.

    ``split`` ("train" or "val") only matters for ``digits`` and ``digits-captions``; ``cache_dir``
    is where digits are written (default $DISTILL_CACHE, else ~/.cache/distill). With
    ``skip_unreadable`` every image is verified once and the unreadable ones are dropped (listed
    in ``skipped``) before ids are assigned.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"dataset spec must be a non-empty string, got {spec!r}; {_ACCEPTED}")
    prefix, sep, body = spec.partition(":")
    if spec in DATASETS or (sep and prefix in DATASETS and prefix not in ("digits", "digits-captions")):
        return DATASETS.get(prefix)(body, spec, split, skip_unreadable, cache_dir)
    named = _SPEC_PREFIX.match(spec)
    if named and not os.path.exists(os.path.expanduser(spec)):
        raise DatasetError(f"unknown dataset spec prefix '{named.group(1)}:' in {spec!r}; {_ACCEPTED}")
    return FolderDataset(spec, spec=spec, skip_unreadable=skip_unreadable)
