"""Image (and image-text) datasets with stable sample ids, labels and a fingerprint: the base class
``ImageDataset``, the registry ``DATASETS`` of dataset spec forms and ``create_dataset``.

Each kind of dataset is a module of its own, imported when a spec first asks for it: image files
(folders, ``csv:``, ``pairs:``) in ``distill.data_files``, webdataset tar shards in ``distill.data_tar``,
scikit-learn's digits in ``distill.data_digits``. They import this module; it imports none of them.

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
  ``data_digits.DIGIT_CAPTION_TEMPLATE.format(DIGIT_NAMES[label])``, e.g. "a photo of the number seven"
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from logit_store.registry import Registry, import_path

from .errors import DatasetError
from .files import MiB

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
FINGERPRINT_VERSION = "distill-dataset-v1"
FingerprintMode = Literal["fast", "content"]
# Larger image files or tar members are refused naming them: far above any photo (a 100-megapixel RGB TIFF is
# 300 MB uncompressed), small enough that reading one cannot exhaust memory (an 8 GB sparse member would).
MAX_IMAGE_BYTES = 512 * MiB
NO_LABEL = -1  # the label of every sample of an image-text dataset that has no labels

_SPEC_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


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

    def image_size(self, sample_id: int) -> tuple[int, int]:
        """(width, height) of sample ``sample_id`` from its image header (nothing decoded), as ``load`` gives it."""
        i = self._index(sample_id)
        try:
            with Image.open(io.BytesIO(self._read_bytes(i))) as image:
                return image.size
        except Exception as err:
            raise DatasetError(f"{self._where(i)}: not a readable image ({type(err).__name__}: {err})") from err

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


def stat_key(path: Path) -> str:
    """What identifies the bytes of the file `path` without reading them: its name, size, mtime and inode."""
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


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else $DISTILL_CACHE, else ~/.cache/distill."""
    chosen = cache_dir if cache_dir is not None else os.environ.get("DISTILL_CACHE") or "~/.cache/distill"
    return Path(chosen).expanduser().absolute()


# ---------------------------------------------------------------- specs: the registry and create_dataset

# A builder: (body, spec, split, skip_unreadable, cache_dir) -> ImageDataset, imported on first use.
DATASETS: Registry[Callable[..., ImageDataset]] = Registry("dataset spec prefix", DatasetError)
DATASETS.register("digits", "distill.data_digits:create_digits_dataset")
DATASETS.register("digits-captions", "distill.data_digits:create_digits_captions_dataset")
DATASETS.register("csv", "distill.data_files:create_csv_dataset")
DATASETS.register("pairs", "distill.data_files:create_pairs_dataset")
DATASETS.register("unlabeled", "distill.data_files:create_unlabeled_dataset")
DATASETS.register("wds", "distill.data_tar:create_tar_dataset")
_FOLDER = "distill.data_files:create_folder_dataset"  # the builder of every other spec: a folder PATH
ACCEPTED = f"accepted forms: {', '.join(SPEC_FORMS)}"  # the end of a message about a spec


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
        raise DatasetError(f"dataset spec must be a non-empty string, got {spec!r}; {ACCEPTED}")
    prefix, sep, body = spec.partition(":")
    if spec in DATASETS or (sep and prefix in DATASETS and prefix not in ("digits", "digits-captions")):
        return DATASETS.get(prefix)(body, spec, split, skip_unreadable, cache_dir)
    named = _SPEC_PREFIX.match(spec)
    if named and not os.path.exists(os.path.expanduser(spec)):
        raise DatasetError(f"unknown dataset spec prefix '{named.group(1)}:' in {spec!r}; {ACCEPTED}")
    return import_path(_FOLDER)(spec, spec, split, skip_unreadable, cache_dir)
