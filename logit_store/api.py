"""Opening, creating and converting stores: the functions that make a `LogitStore` (zarr's `zarr.api`).

Replacing a store made with another manifest (what a failed save leaves) is said once on this module's
logger (`logging.getLogger("logit_store.api")`, WARNING); the command-line tools print it to stderr.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from typing import Any

from . import codec
from .backends import create_backend
from .errors import StoreDamagedError, StoreError, StoreLockedError, disk_full_named
from .location import StoreLocation
from .locks import RangeLock
from .manifest import FORMAT_VERSION, MANIFEST_KEY, Manifest, old_version_message, read_manifest
from .records import CODED_VERSION
from .statistics import aggregate_statistics
from .store import LogitStore
from .writer import ShardWriter, read_only_error

__all__ = ["convert_store", "create_store", "open_store"]

log = logging.getLogger(__name__)
BUILD_LOCK = "create"  # under a build's .locks/: held by its creator while it builds


def open_store(
    url: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    cache_bytes: int | None = None,
    cache_dir: str | None = None,
    cache_epochs: int = 2,
    read_only: bool = False,
) -> LogitStore:
    """Open an existing store; with `read_only`, every write to it is refused (StoreError). Use it in a `with`
    block to close its handles on leaving. cache_bytes bounds the decoded rows a reader keeps in its own
    memory (default: LOGIT_STORE_CACHE_BYTES, else 256 MiB); larger planes are shared by the
    node's readers through files under cache_dir (default: LOGIT_STORE_CACHE_DIR, else a
    per-user directory under the system temporary directory)."""
    location = StoreLocation(url, storage_options)
    return LogitStore(location, read_manifest(location), cache_epochs, cache_bytes, cache_dir, read_only=read_only)


def create_store(
    url: str | os.PathLike[str], manifest: Manifest, storage_options: dict[str, Any] | None = None
) -> LogitStore:
    """Create a store, or reopen an existing one whose manifest matches (to resume).

    A different manifest is an error naming the fields, unless the store holds no committed
    record and no writer (what a failed save leaves): it is then replaced, saying so on this module's logger.
    A logits store that differs in `epochs` only is the same store: asked for more, it grows to them
    (`LogitStore.grow`); asked for fewer, it is reopened with all it has (the caller writes the epochs it wants).
    A non-empty directory that is not a store is an error; nothing there is touched. Locally the store is built
    beside its target and moved in with one rename, so concurrent creators agree on one store.
    """
    location = StoreLocation(url, storage_options)
    if location.web:
        raise read_only_error(location, "create or write a store there")
    backend = create_backend(location, manifest)  # the one check of its name, before anything is written
    if location.exists(MANIFEST_KEY):
        return _reopen(location, manifest)
    if location.exists() and location.fs.ls(location.root):
        raise StoreError(f"{location} exists, is not empty and is not a logit store; refusing to write into it")
    if not location.is_local:
        backend.create()
        backend.close()
        location.write_bytes(manifest.to_json().encode(), MANIFEST_KEY)
        return LogitStore(location, manifest)
    return _create_local(location, manifest)


def _create_local(location: StoreLocation, manifest: Manifest) -> LogitStore:
    """Build the store beside its target, in `<root>.tmp-<hex>` under a build lock, and move it in with one
    rename. A build left by a killed creator (its lock free) is removed first; nothing is left on failure."""
    _remove_stale_builds(location.root)
    tmp = StoreLocation(f"{location.root}.tmp-{uuid.uuid4().hex}")
    building: RangeLock | None = None
    try:
        with disk_full_named(tmp.root):
            os.makedirs(tmp.root)
            building = RangeLock(tmp.path(".locks"), BUILD_LOCK, f"store build {tmp.root}")
            backend = create_backend(tmp, manifest)
            backend.create()
            backend.close()
            tmp.write_bytes(manifest.to_json().encode(), MANIFEST_KEY)
            os.makedirs(os.path.dirname(location.root), exist_ok=True)
        try:
            os.rename(tmp.root, location.root)  # atomic; fails if another creator won
        except OSError:
            return _reopen(location, manifest)
    finally:
        shutil.rmtree(tmp.root, ignore_errors=True)
        if building is not None:
            building.release()
    return LogitStore(location, manifest)


def _remove_stale_builds(root: str) -> None:
    """Remove the `<root>.tmp-<hex>` builds whose creator died (their build lock is free). A build
    without its lock file yet (made an instant ago) is left alone."""
    parent, name = os.path.split(root)
    pattern = re.compile(re.escape(name) + r"\.tmp-[0-9a-f]{32}")
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        build = os.path.join(parent, entry)
        if not pattern.fullmatch(entry) or not os.path.exists(os.path.join(build, ".locks", BUILD_LOCK)):
            continue
        try:
            lock = RangeLock(os.path.join(build, ".locks"), BUILD_LOCK, f"store build {build}")
        except (StoreLockedError, OSError):
            continue  # its creator is alive
        shutil.rmtree(build, ignore_errors=True)
        lock.release()


def _reopen(location: StoreLocation, manifest: Manifest) -> LogitStore:
    """The existing store, if its manifest is `manifest`'s. One of another manifest that holds no committed
    record (what a failed save leaves) is replaced, saying so; one with records is refused."""
    existing = read_manifest(location)
    if existing.kind == "logits" and existing.format_version < CODED_VERSION <= manifest.format_version:
        raise StoreError(old_version_message(str(location), existing.format_version))
    fields = existing.differing_fields(manifest)
    if fields and not location.list_files("commits") and not _writers_alive(location):
        log.warning(
            "replacing %s: it holds no committed record and was made with another %s", location, ", ".join(fields)
        )
        location.fs.rm(location.root, recursive=True)
        return create_store(location.url, manifest, location.storage_options)
    store = LogitStore(location, existing)
    if fields == ["epochs"] and existing.kind == "logits":  # one store, grown: it serves fewer epochs and grows
        store.grow(manifest.epochs)
        return store
    existing.check_same(manifest, where=str(location))
    return store


def _writers_alive(location: StoreLocation) -> bool:
    """Whether a process holds a range lock of the store (a save still writing its first shards)."""
    if not location.is_local:
        return False
    for path in location.list_files(".locks"):
        try:
            RangeLock(os.path.dirname(path), os.path.basename(path), path).release()
        except StoreLockedError:
            return True
    return False


def convert_store(
    src: LogitStore,
    dst_url: str | os.PathLike[str],
    backend: str,
    storage_options: dict[str, Any] | None = None,
    upgrade: bool = False,
) -> LogitStore:
    """Copy every committed record and its commit marker into a store of another backend.

    Records are checked against their digests on the way; re-running resumes. With
    `upgrade`, the copy is of the current format version: records of a version-1/2 logits
    store are re-encoded (their float16 precision stays what it was) and their markers get
    fresh digests and kept-mass sums; otherwise the version and every byte are kept.
    """
    fields = {"backend": backend, "statistics": aggregate_statistics([])}  # its own: nothing yet, not the source's
    if upgrade:
        fields |= {"format_version": FORMAT_VERSION, "created_at": "", "toolkit_version": ""}
    manifest = Manifest.from_dict(src.manifest.to_dict() | fields)
    recode = upgrade and src.manifest.kind == "logits" and src.manifest.format_version < CODED_VERSION
    dst = create_store(dst_url, manifest, storage_options)
    copied = {key: marker for key, marker in dst.commits().items() if marker}
    commits = src.commits()
    damaged = sorted(key for key, marker in commits.items() if not marker)
    if damaged:
        raise StoreDamagedError(
            f"{src.location}: damaged commit markers for (epoch, shard) {damaged}; run distill-store verify {src.location}"
        )
    for (epoch, shard), marker in sorted(commits.items()):
        if (epoch, shard) in copied:
            continue
        rows, statistics = src.read_shard(epoch, shard, marker), marker["statistics"]
        if recode:
            rows = codec.encode_rows(src.decode(rows), dst.backend.row_dtype, manifest.num_classes)
            statistics = statistics | {"topk_mass_sum": float(codec.kept_mass(rows, CODED_VERSION).sum())}
        with ShardWriter(dst, epoch, [shard]) as writer:  # rows as stored: any version may be copied
            writer.commit_rows(shard, rows, statistics)
        copied[epoch, shard] = {"statistics": statistics}
        dst.write_statistics(copied.values())  # the destination's own totals at every moment
    dst.refresh_statistics()
    return dst
