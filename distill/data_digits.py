"""scikit-learn's 8x8 handwritten digits (``digits``), written once as 32x32 PNGs to
``<cache>/digits/{train,val}/<class>/<index>.png`` (a fixed 80/20 split) and read as a class folder; and
``digits-captions``, the same samples each captioned "a photo of the number <name>".
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from logit_store.errors import disk_full

from .data import ImageDataset, cache_root
from .data_files import FolderDataset
from .errors import DatasetError

__all__ = ["DIGIT_CAPTION_TEMPLATE", "DIGIT_NAMES", "digit_caption", "prepare_digits"]

DIGITS_SPLITS = ("train", "val")
DIGITS_SIZE = 32
DIGITS_TRAIN_FRACTION = 0.8
DIGITS_SEED = 0
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_CAPTION_TEMPLATE = "a photo of the number {}"  # str.format with a DIGIT_NAMES entry


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


# ---------------------------------------------------------------- builders of DATASETS (distill.data)


def create_digits_dataset(
    body: str, spec: str, split: str, skip_unreadable: bool, cache_dir: str | None
) -> ImageDataset:
    return _digits_folder(spec, split, skip_unreadable, cache_dir)


def create_digits_captions_dataset(
    body: str, spec: str, split: str, skip_unreadable: bool, cache_dir: str | None
) -> ImageDataset:
    return _digits_folder(spec, split, skip_unreadable, cache_dir, digit_caption_of_class)


def _digits_folder(
    spec: str, split: str, skip_unreadable: bool, cache_dir: str | None, captioned: Callable[[str], str] | None = None
) -> ImageDataset:
    if split not in DIGITS_SPLITS:
        raise DatasetError(f"{spec}: split must be one of {DIGITS_SPLITS}, got {split!r}")
    root = prepare_digits(cache_dir) / split
    return FolderDataset(root, spec=spec, skip_unreadable=skip_unreadable, caption_of_class=captioned)
