"""Datasets of image files: a class folder (or a folder of unlabelled images), ``csv:`` and ``pairs:`` tables.

A sample is a file; its name is its path relative to the dataset's root (the folder, or the table's folder),
its size the file's. An image that is not a regular file or is larger than ``MAX_IMAGE_BYTES`` is refused
naming it, when listed and again when read. The spec forms are ``distill.data.SPEC_FORMS``.
"""

from __future__ import annotations

import csv
import itertools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .data import ACCEPTED, MAX_IMAGE_BYTES, NO_LABEL, ImageDataset, stat_key
from .errors import DatasetError
from .files import RefusedFile, read_regular_file, refuse_unless_regular

__all__ = ["IMAGE_EXTENSIONS", "CsvDataset", "FolderDataset", "PairsDataset"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_AN_IMAGE = "an image file"
_INTEGER = re.compile(r"[+-]?\d+")


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
        return stat_key(self._path(i))

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


# ---------------------------------------------------------------- builders of DATASETS (distill.data)


def create_folder_dataset(
    body: str, spec: str, split: str, skip_unreadable: bool, cache_dir: str | None
) -> ImageDataset:
    return FolderDataset(spec, spec=spec, skip_unreadable=skip_unreadable)


def create_csv_dataset(body: str, spec: str, split: str, skip_unreadable: bool, cache_dir: str | None) -> ImageDataset:
    return CsvDataset(_needs_path(body, "csv", "data/train.csv"), spec=spec, skip_unreadable=skip_unreadable)


def create_pairs_dataset(
    body: str, spec: str, split: str, skip_unreadable: bool, cache_dir: str | None
) -> ImageDataset:
    return PairsDataset(_needs_path(body, "pairs", "data/captions.tsv"), spec=spec, skip_unreadable=skip_unreadable)


def create_unlabeled_dataset(
    body: str, spec: str, split: str, skip_unreadable: bool, cache_dir: str | None
) -> ImageDataset:
    return FolderDataset(_needs_path(body, "unlabeled", "data/images"), spec, skip_unreadable, labeled=False)


def _needs_path(body: str, prefix: str, example: str) -> str:
    if not body:
        raise DatasetError(f"{prefix}: needs a file path, e.g. {prefix}:{example}; {ACCEPTED}")
    return body
