"""Commit markers: one small JSON file per committed (plane, shard), written after its rows (docs/STORE_FORMAT.md).

Invariants: a range is committed iff its marker parses and fits the layout (`checked_marker`); its rows are
intact iff every block of chunk_records rows has the digest its marker holds (`damaged_blocks`) and every class
index fits the manifest (`class_index_error`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .errors import NotCommittedError, StoreDamagedError
from .location import StoreLocation
from .manifest import Manifest, plane_name
from .records import block_digest

Marker = dict[str, Any]


def commit_key(epoch: int, shard: int) -> tuple[str, str]:
    """The marker's path under the store's root."""
    return "commits", f"e{epoch:05d}-s{shard:06d}.json"


def new_marker(manifest: Manifest, epoch: int, shard: int, rows: np.ndarray, statistics: dict[str, Any]) -> Marker:
    """The marker committing `rows`, one whole shard: its range and the digest of each block."""
    start, stop = manifest.shard_range(shard)
    block = manifest.chunk_records
    digests = [block_digest(rows[i : i + block]) for i in range(0, len(rows), block)]
    return {"epoch": epoch, "shard": shard, "start": start, "stop": stop, "digests": digests, "statistics": statistics}


def checked_marker(manifest: Manifest, marker: Any, epoch: int, shard: int) -> Marker:
    """`marker` if it is the marker of (epoch, shard) in this layout, else {} (damaged)."""
    m = manifest
    if not (0 <= epoch < m.planes and 0 <= shard < m.num_shards and isinstance(marker, dict)):
        return {}
    start, stop = m.shard_range(shard)
    digests = marker.get("digests")
    fits = (marker.get("epoch"), marker.get("shard"), marker.get("start"), marker.get("stop")) == (
        epoch,
        shard,
        start,
        stop,
    )
    if not fits or not isinstance(digests, list) or len(digests) != -(-(stop - start) // m.chunk_records):
        return {}
    return marker


def list_markers(
    location: StoreLocation, manifest: Manifest, epoch: int | None = None
) -> dict[tuple[int, int], Marker]:
    """Commit markers (of one plane, or all), keyed by (plane, shard). Every marker the layout can hold (planes x
    shards, from the manifest) is asked for by name, all together, and no folder is listed: a location that
    cannot be listed (a web server) reads as any other. An absent marker is left out (not committed); one that
    does not parse or does not fit the layout maps to {} (damaged); an object store out of reach raises
    StoreAccessError (no marker is damaged, nor dropped, for that)."""
    planes = range(manifest.planes) if epoch is None else [epoch] if 0 <= epoch < manifest.planes else []
    keys = [(plane, shard) for plane in planes for shard in range(manifest.num_shards)]
    out = {}
    for key, raw in zip(keys, location.read_files([commit_key(*key) for key in keys]), strict=True):
        if raw is None:
            continue
        try:
            out[key] = checked_marker(manifest, json.loads(raw), *key) if isinstance(raw, bytes) else {}
        except ValueError:
            out[key] = {}
    return out


def read_marker(location: StoreLocation, manifest: Manifest, epoch: int, shard: int) -> Marker:
    """The marker of one shard: NotCommittedError if it has none, StoreDamagedError if it does not fit."""
    start, stop = manifest.shard_range(shard)
    where = f"{location}: {plane_name(manifest, epoch)} records [{start}, {stop})"
    missing = NotCommittedError(f"{where} are not committed")
    try:  # (apart from the parse: StoreAccessError is a ValueError too, and must say so)
        raw = location.read_bytes(*commit_key(epoch, shard))
    except FileNotFoundError:
        raise missing from None
    try:
        marker = json.loads(raw)
    except ValueError:
        raise missing from None
    if not checked_marker(manifest, marker, epoch, shard):
        raise StoreDamagedError(f"{where} have a damaged commit marker; run distill-store verify {location}")
    return marker


def class_index_error(rows: np.ndarray, first_id: int, num_classes: int, manifest: str) -> str | None:
    """What is wrong when packed logits rows hold a class index outside [0, num_classes), or None (also for
    rows without indices: embeddings). Writers refuse such indices, so in rows that pass their digests it is
    the manifest's num_classes that does not fit (edited)."""
    if "indices" not in (rows.dtype.names or ()) or not len(rows):
        return None
    indices = rows["indices"]
    if indices.max() < num_classes and indices.min() >= 0:  # the common case: one pass each, no temporaries
        return None
    outside = (indices < 0) | (indices >= num_classes)
    row = int(np.flatnonzero(outside.any(axis=1))[0])
    index = int(indices[row][outside[row]][0])
    return f"record {first_id + row} holds class index {index}, but {manifest} says num_classes = {num_classes}"


def damaged_blocks(rows: np.ndarray, digests: list[str], block: int) -> list[tuple[int, int]]:
    """(start, stop) offsets of every block whose digest differs from the commit's."""
    bad = []
    for i, expected in enumerate(digests):
        part = rows[i * block : (i + 1) * block]
        if block_digest(part) != expected:
            bad.append((i * block, i * block + len(part)))
    if len(digests) * block < len(rows):
        bad.append((len(digests) * block, len(rows)))
    return bad
