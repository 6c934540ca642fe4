"""LogitStore: manifest, commits, writers and readers over any backend.

Records live in planes: one per epoch, plus the text plane (index = epochs) in an
embeddings store (docs/STORE_FORMAT.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from . import codec
from .backends import Backend, create_backend
from .cache import PlaneCache, default_cache_bytes
from .errors import (
    NotCommittedError,
    StoreAccessError,
    StoreDamagedError,
    StoreError,
    StoreInputError,
    StoreLockedError,
    disk_full_named,
)
from .location import StoreLocation
from .locks import RangeLock
from .manifest import FORMAT_VERSION, Manifest
from .records import (
    CODED_VERSION,
    KL_TEMPERATURES,
    Embeddings,
    Records,
    block_digest,
    validate_embeddings,
    validate_records,
)

if TYPE_CHECKING:
    from .pin import PinnedReads

MANIFEST_KEY = "manifest.json"
REPAIR_LOCK = "repair"  # under .locks/: held by the one repair of a local store at a time
_MARKER_NAME = re.compile(r"e(\d{5,})-s(\d{6,})\.json")


def commit_key(epoch: int, shard: int) -> tuple[str, str]:
    return "commits", f"e{epoch:05d}-s{shard:06d}.json"


def plane_name(manifest: Manifest, plane: int) -> str:
    """'epoch E', or 'text plane' for an embeddings store's text plane: how messages name a plane."""
    return "text plane" if manifest.kind == "embeddings" and plane == manifest.epochs else f"epoch {plane}"


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


class LogitStore:
    """A store of teacher outputs, one record per (plane, sample id): sparse logits per
    (epoch, id), or embeddings per (epoch, id) plus one text embedding per id.

    Use `create_store` to make or reopen one for writing and `open_store` to read.
    Safe to pickle into DataLoader workers: handles and caches are rebuilt per process.

    A reader keeps at most `cache_epochs` planes decoded, and at most `cache_bytes` of
    decoded rows in its own memory whatever the store's size: a plane larger than
    cache_bytes / cache_epochs is decoded once per node into a file under `cache_dir`
    that every process maps (`logit_store.cache`).
    """

    def __init__(
        self,
        location: StoreLocation,
        manifest: Manifest,
        cache_epochs: int = 2,
        cache_bytes: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        self.location = location
        self.manifest = manifest
        self.backend: Backend = create_backend(location, manifest)
        self.cache_epochs = cache_epochs
        self.cache_bytes = default_cache_bytes() if cache_bytes is None else cache_bytes
        self.cache_dir = cache_dir
        self._cache = PlaneCache(self, cache_epochs, self.cache_bytes, cache_dir)
        self._batch: type[Records] | type[Embeddings] = Embeddings if manifest.kind == "embeddings" else Records
        self.pinned: PinnedReads | None = None  # a run's pin: every plane and shard loaded is checked (`pin.py`)

    def __repr__(self) -> str:
        m = self.manifest
        if m.kind == "embeddings":
            return f"LogitStore({self.location}, backend={m.backend}, N={m.num_samples}, embeddings D={m.embed_dim}, epochs={m.epochs})"
        return f"LogitStore({self.location}, backend={m.backend}, N={m.num_samples}, C={m.num_classes}, k={m.k}, epochs={m.epochs})"

    @property
    def text_plane(self) -> int:
        """The plane of the text embeddings (index = epochs); embeddings stores only."""
        if self.manifest.kind != "embeddings":
            raise StoreInputError(f"{self.location} is {_a(self.manifest.kind)} store: it has no text plane")
        return self.manifest.epochs

    def __getstate__(self) -> dict[str, Any]:
        cache = {"cache_epochs": self.cache_epochs, "cache_bytes": self.cache_bytes, "cache_dir": self.cache_dir}
        return {"url": self.location.url, "options": self.location.storage_options, "pinned": self.pinned} | cache

    def __setstate__(self, state: dict[str, Any]) -> None:
        location = StoreLocation(state["url"], state["options"])
        self.__init__(
            location, _read_manifest(location), state["cache_epochs"], state["cache_bytes"], state["cache_dir"]
        )
        self.pinned = state.get("pinned")

    @property
    def private_cache_bytes(self) -> int:
        """Decoded rows this reader holds in its own memory (<= cache_bytes)."""
        return self._cache.private_bytes

    # ---- commits -------------------------------------------------------------------
    def commits(self, epoch: int | None = None) -> dict[tuple[int, int], dict[str, Any]]:
        """Commit markers (of one plane, or all), keyed by (plane, shard). A marker that does
        not parse or does not fit the layout maps to {} (damaged)."""
        prefix = "" if epoch is None else f"e{epoch:05d}-"
        out = {}
        for path in self.location.list_files("commits"):
            match = _MARKER_NAME.fullmatch(path.rsplit("/", 1)[-1])
            if match is None or not match.group(0).startswith(prefix):
                continue
            key = (int(match.group(1)), int(match.group(2)))
            try:
                with self.location.reaching():
                    raw = self.location.fs.cat_file(path)
                out[key] = self._checked_marker(json.loads(raw), *key)
            except StoreAccessError:  # an object store out of reach: no marker is damaged for that (nor dropped)
                raise
            except (ValueError, OSError):
                out[key] = {}
        return out

    def _checked_marker(self, marker: Any, epoch: int, shard: int) -> dict[str, Any]:
        m = self.manifest
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

    def committed_shards(self, epoch: int) -> set[int]:
        return {s for (_, s), marker in self.commits(epoch).items() if marker}

    def pending_shards(self, epoch: int) -> list[int]:
        done = self.committed_shards(epoch)
        return [s for s in range(self.manifest.num_shards) if s not in done]

    # ---- writing -------------------------------------------------------------------
    def writer(self, epoch: int, shards: list[int] | None = None) -> ShardWriter:
        """A writer for the uncommitted shards among `shards` (default: all) of one plane
        (an epoch, or `text_plane`)."""
        self._check_epoch(epoch)
        self._check_writable()
        return ShardWriter(self, epoch, self.pending_shards(epoch) if shards is None else shards)

    def refresh_statistics(self) -> dict[str, Any]:
        """Fold the statistics of every commit into the manifest file."""
        return self.write_statistics(self.commits().values())

    def write_statistics(self, markers: Any) -> dict[str, Any]:
        """Fold the statistics of these commit markers (this store's own) into the manifest file."""
        self.manifest.statistics = aggregate_statistics(markers)
        self.location.write_bytes(self.manifest.to_json().encode(), MANIFEST_KEY)
        return self.manifest.statistics

    # ---- reading -------------------------------------------------------------------
    def read(self, epoch: int, ids: np.ndarray | list[int]) -> Records | Embeddings:
        """Records (logits store) or Embeddings (embeddings store) of `ids` (any order) in a
        plane. Decoded shards are cached per process, so a random batch costs one numpy gather."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.view(np.uint64) >= self.manifest.num_samples).any():  # negatives wrap to huge
            raise StoreInputError(
                f"ids out of range: [{ids.min()}, {ids.max()}], store {self.location} has {self.manifest.num_samples} samples"
            )
        plane = self._cache.get(epoch)
        if plane is None or not plane.complete:  # the hot path of a training epoch skips all this
            self._check_epoch(epoch)
            if plane is None and self.pinned is not None:  # a plane loaded (again): still the pinned one?
                self.pinned.check_plane(self, epoch)
            plane = self._cache.plane(epoch)
            plane.ensure(np.unique(ids // self.manifest.shard_records).tolist())
        return self.decode(plane.gather(ids))

    def decode(self, rows: np.ndarray) -> Records | Embeddings:
        """Records (or Embeddings) from packed rows as stored (`logit_store.codec`)."""
        if self.manifest.kind == "embeddings":
            return Embeddings.from_rows(rows)
        m = self.manifest
        return codec.decode_rows(rows, m.format_version, no_tail=m.k == m.num_classes)

    def read_text(self, ids: np.ndarray | list[int]) -> Embeddings:
        """Text embeddings of `ids` (any order): a read of the text plane."""
        return cast(Embeddings, self.read(self.text_plane, ids))

    def read_shard(
        self,
        epoch: int,
        shard: int,
        marker: dict[str, Any] | None = None,
        out: np.ndarray | None = None,
        piece: int | None = None,
    ) -> np.ndarray:
        """Packed rows of one committed shard, checked against the commit's block digests.

        Decoded in pieces of `piece` records (a multiple of chunk_records; default the whole
        shard) straight into `out`, so the backend's temporaries stay within one piece.
        """
        m = self.manifest
        marker = marker if marker is not None else self._marker(epoch, shard)
        start, stop = m.shard_range(shard)
        out = np.empty(stop - start, dtype=self.backend.row_dtype) if out is None else out
        piece = piece or stop - start
        where, verify = (
            f"{self.location}: {plane_name(m, epoch)} records",
            f"; run distill-store verify {self.location}",
        )
        for a in range(0, stop - start, piece):
            b = min(a + piece, stop - start)
            try:
                self.backend.read_rows(epoch, start + a, start + b, out[a:b])
            except StoreAccessError:  # the location's fault, named already: not damage
                raise
            except Exception as err:  # damaged bytes fail in the codec or the backend: name the range
                raise StoreDamagedError(f"{where} [{start + a}, {start + b}) cannot be decoded: {err}{verify}") from err
            first = a // m.chunk_records
            digests = marker["digests"][first : first + -(-(b - a) // m.chunk_records)]
            bad = damaged_blocks(out[a:b], digests, m.chunk_records)
            if bad:
                a, b = start + a + bad[0][0], start + a + bad[0][1]
                raise StoreDamagedError(f"{where} [{a}, {b}) fail their checksum{verify}")
            # Intact rows may still not fit an edited manifest: an index past num_classes fails later, unnamed.
            wrong = class_index_error(out[a:b], start + a, m.num_classes, f"{self.location}/{MANIFEST_KEY}")
            if wrong is not None:
                raise StoreDamagedError(f"{where} [{start + a}, {start + b}) do not fit the manifest: {wrong}{verify}")
        return out

    def _marker(self, epoch: int, shard: int) -> dict[str, Any]:
        start, stop = self.manifest.shard_range(shard)
        where = f"{self.location}: {plane_name(self.manifest, epoch)} records [{start}, {stop})"
        missing = NotCommittedError(f"{where} are not committed")
        try:  # (apart from the parse: StoreAccessError is a ValueError too, and must say so)
            raw = self.location.read_bytes(*commit_key(epoch, shard))
        except FileNotFoundError:
            raise missing from None
        try:
            marker = json.loads(raw)
        except ValueError:
            raise missing from None
        if not self._checked_marker(marker, epoch, shard):
            raise StoreDamagedError(f"{where} have a damaged commit marker; run distill-store verify {self.location}")
        if self.pinned is not None:  # every shard a reader decodes: the commit its plane was checked with
            self.pinned.check_marker(self, epoch, shard, marker)
        return marker

    def _check_writable(self) -> None:
        m = self.manifest
        if m.kind == "logits" and m.format_version < CODED_VERSION:
            raise StoreError(old_version_message(str(self.location), m.format_version))

    def _check_epoch(self, epoch: int) -> None:
        m = self.manifest
        if not 0 <= epoch < m.planes:
            text = f", epoch {m.epochs} being the text plane" if m.kind == "embeddings" else ""
            raise StoreInputError(
                f"epoch {epoch} is outside the store's epochs [0, {m.planes}){text} ({self.location})"
            )

    # ---- integrity -----------------------------------------------------------------
    def verify(self) -> list[Problem]:
        """Every missing or damaged record range of the planned planes (empty when intact). Damage to a file
        every range depends on (`shared_damage`) is one problem of kind "shared" naming it, instead of every
        committed range. Writes nothing."""
        m, commits, problems = self.manifest, self.commits(), []
        shared = self.shared_damage()
        if shared is not None:
            problems.append(Problem(-1, 0, m.num_samples, "shared", str(shared)))
        for epoch in range(m.planes):
            for shard in range(m.num_shards):
                marker = commits.get((epoch, shard))
                if marker is None:
                    start, stop = m.shard_range(shard)
                    problems.append(Problem(epoch, start, stop, "missing", "not committed", self._is_text(epoch)))
                elif shared is None or not marker:  # (an unreadable marker is its own problem, whatever the data)
                    problems += self._check_shard(epoch, shard, marker)
        return problems

    def shared_damage(self) -> StoreDamagedError | None:
        """Damage to a file that every record range depends on (a zarr array's `zarr.json`; lmdb's data.mdb:
        missing, its header invalid, shorter than its header says), or None. It is no shard's damage: dropping
        commit markers cannot mend it, and restoring the one file recovers every commit."""
        try:
            self.backend.check_shared()
        except StoreDamagedError as err:
            return err
        return None

    def _refuse_shared_damage(self) -> None:
        shared = self.shared_damage()
        if shared is not None:
            raise StoreDamagedError(
                f"{shared}: every record range depends on this file, so distill-store repair cannot mend it (it drops "
                f"no commit); restore the file from a copy, or delete {self.location} and save again (or convert a good copy)"
            )

    def damaged_commits(self) -> list[Problem]:
        """The damaged ranges of every committed shard whose marker parses (what `verify` reports
        as damaged, less unreadable markers: those shards count as uncommitted and are rewritten).
        Damage to a file every range depends on is raised (StoreDamagedError naming it): no rewrite mends it."""
        self._refuse_shared_damage()
        return [
            p
            for (e, s), marker in sorted(self.commits().items())
            if marker
            for p in self._check_shard(e, s, marker)
            if p.kind == "damaged"
        ]

    def repair(self) -> list[tuple[int, int]]:
        """Drop the commit marker of every damaged shard (data and every other marker stay), so that a
        re-run save rewrites exactly those shards, and fold the remaining commits' statistics into the
        manifest. Returns the (plane, shard) keys dropped, in order. Refused, dropping nothing, for damage
        to a file every range depends on, and while another process repairs the store (StoreLockedError)."""
        self._check_writable()
        with self._repairing():
            self._refuse_shared_damage()
            shard_records = self.manifest.shard_records
            dropped = sorted({(p.epoch, p.start // shard_records) for p in self.verify() if p.kind == "damaged"})
            for key in dropped:
                self.location.fs.rm(self.location.path(*commit_key(*key)))
            self.refresh_statistics()
        return dropped

    @contextlib.contextmanager
    def _repairing(self) -> Iterator[None]:
        """One repair at a time (locally: a flock on `.locks/repair`): two would drop the same markers, the
        second failing on files the first removed. Object stores have no locks."""
        if not self.location.is_local:
            yield
            return
        directory = self.location.path(".locks")
        try:
            lock = RangeLock(directory, REPAIR_LOCK, str(self.location))
        except StoreLockedError:
            raise StoreLockedError(
                f"{self.location} is being repaired by another process (lock {os.path.join(directory, REPAIR_LOCK)}); "
                "let it finish, then verify again"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _is_text(self, plane: int) -> bool:
        return plane_name(self.manifest, plane) == "text plane"

    def _check_shard(self, epoch: int, shard: int, marker: dict[str, Any]) -> list[Problem]:
        """The damaged ranges of one shard with a marker ({} = unreadable marker): [] when intact."""
        m, text = self.manifest, self._is_text(epoch)
        start, stop = m.shard_range(shard)
        if not marker:
            return [Problem(epoch, start, stop, "damaged", "commit marker unreadable", text)]
        try:
            rows = self.backend.read_rows(epoch, start, stop)
        except StoreAccessError:  # not damage: `repair` would drop an intact shard
            raise
        except Exception as err:  # any decode failure of damaged bytes is reported, not raised
            return [Problem(epoch, start, stop, "damaged", f"cannot decode: {err}", text)]
        bad = damaged_blocks(rows, marker["digests"], m.chunk_records)
        if bad:
            return [Problem(epoch, start + a, start + b, "damaged", "checksum mismatch", text) for a, b in bad]
        wrong = class_index_error(rows, start, m.num_classes, f"{self.location}/{MANIFEST_KEY}")
        if wrong is None:
            return []
        return [Problem(epoch, start, stop, "invalid", f"{wrong}; the records match their commit", text)]

    def epoch_hash(self, epoch: int) -> str:
        """sha256 of a plane's decoded records in id order: equal across backends and layouts."""
        digest = hashlib.sha256()
        for shard in range(self.manifest.num_shards):
            digest.update(self.read_shard(epoch, shard).tobytes())
        return digest.hexdigest()

    def info(self) -> dict[str, Any]:
        """Manifest, progress, size, statistics and content hashes. An embeddings store adds
        `text_complete` and `text_records`; its text plane's hash is under "text"."""
        m, commits = self.manifest, self.commits()
        records = {e: 0 for e in range(m.planes)}
        for (epoch, shard), marker in commits.items():
            if marker:
                start, stop = m.shard_range(shard)
                records[epoch] += stop - start
        complete = [e for e, n in records.items() if n == m.num_samples]
        total = sum(records.values())
        used = self.location.bytes_used()
        info = {
            "location": str(self.location),
            "manifest": m.to_dict(),
            "completed_epochs": [e for e in complete if e < m.epochs],
            "records": total,
            "records_per_epoch": {e: n for e, n in records.items() if e < m.epochs},
            "bytes_on_disk": used,
            "bytes_per_record": used / total if total else None,
            "statistics": aggregate_statistics(commits.values()),
            "content_hashes": {"text" if e == m.epochs else str(e): self.epoch_hash(e) for e in complete},
        }
        if m.kind == "embeddings":
            info |= {"text_complete": m.epochs in complete, "text_records": records[m.epochs]}
        return info

    def close(self) -> None:
        self._cache.clear()
        self.backend.close()


@dataclass(frozen=True)
class Problem:
    epoch: int  # the plane; with text=True, the text plane of an embeddings store
    start: int
    stop: int
    # "missing"; "damaged" (a shard's bytes: `repair` uncommits it); "invalid" (intact by its digests but
    # not fitting the manifest, e.g. a class index >= num_classes); "shared" (a file every range depends on,
    # named in `detail`; epoch -1: no one plane)
    kind: str
    detail: str
    text: bool = False

    def __str__(self) -> str:
        if self.kind == "shared":
            return f"every record range: damaged ({self.detail})"
        where = "text plane" if self.text else f"epoch {self.epoch}"
        return f"{where} records [{self.start}, {self.stop}): {self.kind} ({self.detail})"


class ShardWriter:
    """Buffers records per shard; a shard is written and committed once it is whole.

    Claims (locks) its shards on creation; a shard already committed is refused, so
    nothing committed is ever overwritten.

    A whole shard is sealed (no more records) and committed on a background thread
    (compression, checksums and fsync release the GIL), while the caller fills the next:
    at most MAX_SEALED shards wait or run there. `flush()` waits for them and raises what
    failed; leaving the `with` block flushes. Locks and buffers are touched by the
    caller's thread only.
    """

    MAX_SEALED = 2

    def __init__(self, store: LogitStore, epoch: int, shards: list[int]) -> None:
        self.store, self.epoch = store, epoch
        self.manifest = m = store.manifest
        self.locks: dict[int, RangeLock] = {}
        self.buffers: dict[int, _ShardBuffer] = {}
        self._sealed: dict[int, Future[None]] = {}  # shard -> its commit on the worker
        self._worker: ThreadPoolExecutor | None = None
        try:
            for shard in sorted(set(shards)):
                if not 0 <= shard < m.num_shards:
                    raise StoreInputError(f"shard {shard} is outside [0, {m.num_shards})")
                self.locks[shard] = self._lock(shard)
            done = store.committed_shards(epoch) & set(self.locks)  # checked under the locks
            if done:
                where = plane_name(m, epoch)
                raise StoreError(f"{store.location}: {where} shards {sorted(done)} are already committed")
        except BaseException:
            self.release()
            raise

    def _lock(self, shard: int) -> RangeLock:
        start, stop = self.manifest.shard_range(shard)
        what = f"{self.store.location}: {plane_name(self.manifest, self.epoch)} records [{start}, {stop})"
        if not self.store.location.is_local:
            return _NoLock()
        return RangeLock(self.store.location.path(".locks"), f"e{self.epoch:05d}-s{shard:06d}.lock", what)

    def write(
        self,
        ids: np.ndarray | list[int],
        records: Records | Embeddings,
        labels: np.ndarray | None = None,
        kl: np.ndarray | None = None,
    ) -> list[int]:
        """Add records (Records or Embeddings, as the store's kind) for `ids`; returns the
        shards this call completed (sealed: committed on the background thread, certainly
        by the time `flush()` returns).

        labels (optional, -1 for unknown) and kl only feed the statistics of a logits store:
        kl is KL(full || rebuilt) per record, [n] at T = 1 or [n, 3] at T = 1, 2, 4
        (`KL_TEMPERATURES`, as `sparsify` gives it).
        """
        m = self.manifest
        expected = self.store._batch
        if not isinstance(records, expected):
            raise StoreInputError(
                f"{self.store.location} is {_a(m.kind)} store: it takes {expected.__name__}, got {type(records).__name__}"
            )
        self._reap(block=False)
        ids = self._checked_ids(ids, len(records))
        rows = self._encode(records)
        figures = self._figures(rows, labels, kl)
        shard_of = ids // m.shard_records
        if len(ids) and shard_of.min() != shard_of.max():
            # Spread over shards: sort once by id (one gather of opaque rows), then cut slices.
            order = np.argsort(ids, kind="stable")
            ids, shard_of = ids[order], shard_of[order]
            rows = rows.view(np.dtype((np.void, rows.itemsize)))[order].view(rows.dtype)
            figures = {name: value[order] for name, value in figures.items()}
        completed = []
        for shard, part in self._by_shard(shard_of):
            buf = self.buffers.get(shard) or self.buffers.setdefault(
                shard, _ShardBuffer(m, shard, self.store.backend.row_dtype)
            )
            buf.add(ids[part], rows[part], {name: value[part] for name, value in figures.items()})
            if buf.full:
                self._seal(shard, self.buffers.pop(shard))
                completed.append(shard)
        return completed

    def _seal(self, shard: int, buf: _ShardBuffer) -> None:
        """Hand a whole shard to the worker, once fewer than MAX_SEALED wait there (0: commit
        it now, on this thread)."""
        if self.MAX_SEALED == 0:
            self.commit_rows(shard, buf.rows, buf.statistics())
            return
        while len(self._sealed) >= self.MAX_SEALED:
            self._reap(block=True)
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=self.MAX_SEALED, thread_name_prefix="logit-store-commit")
        self._sealed[shard] = self._worker.submit(self._write_and_mark, shard, buf.rows, buf.statistics)

    def _reap(self, block: bool) -> None:
        """Release the locks of finished commits (the oldest one waited for, if `block`);
        a commit that failed raises here, its range left uncommitted and locked until release."""
        for shard, future in list(self._sealed.items()):
            if not (future.done() or block):
                continue
            del self._sealed[shard]
            future.result()  # raises the commit's error
            self.locks.pop(shard).release()
            block = False

    def flush(self) -> None:
        """Wait until every sealed shard is committed; raise the first failure."""
        while self._sealed:
            self._reap(block=True)

    def _checked_ids(self, ids: np.ndarray | list[int], count: int) -> np.ndarray:
        m = self.manifest
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise StoreInputError(f"ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= m.num_samples):
            raise StoreInputError(f"ids out of range: [{ids.min()}, {ids.max()}], expected [0, {m.num_samples})")
        if (np.diff(np.sort(ids)) == 0).any():
            raise StoreInputError("ids hold duplicates")
        if count != len(ids):
            raise StoreInputError(f"{len(ids)} ids but {count} records")
        return ids

    def _figures(self, rows: np.ndarray, labels: np.ndarray | None, kl: np.ndarray | None) -> dict[str, np.ndarray]:
        """Per-record inputs of a logits shard's statistics, checked once per batch."""
        if self.manifest.kind != "logits":
            return {}
        figures = {}
        if labels is not None:
            if np.shape(labels) != (len(rows),):
                raise StoreInputError(f"'labels' has shape {np.shape(labels)}, expected {(len(rows),)}")
            figures["labels"] = np.asarray(labels)
        if kl is not None:
            figures["kl"] = _kl_columns(kl, len(rows))
        return figures

    def _by_shard(self, shard_of: np.ndarray) -> list[tuple[int, slice]]:
        """(shard, slice of the batch) for each shard of a batch sorted by shard (or all in one)."""
        if not len(shard_of):
            return []
        shards, starts = np.unique(shard_of, return_index=True)
        bounds = [*starts.tolist(), len(shard_of)]
        parts = [(int(s), slice(bounds[i], bounds[i + 1])) for i, s in enumerate(shards)]
        unclaimed = sorted({s for s, _ in parts} - (set(self.locks) - set(self._sealed)))
        if unclaimed:
            raise StoreInputError(
                f"{plane_name(self.manifest, self.epoch)} shards {unclaimed} are not claimed by this writer (committed already, or another writer's)"
            )
        return parts

    def _encode(self, records: Records | Embeddings) -> np.ndarray:
        """Checked records as packed rows of the store's format."""
        m, dtype = self.manifest, self.store.backend.row_dtype
        if isinstance(records, Embeddings):
            return validate_embeddings(records, embed_dim=m.embed_dim).to_rows(dtype)
        checked = validate_records(
            records, k=m.k, num_classes=m.num_classes, mixing=m.mixing, num_samples=m.num_samples
        )
        return codec.encode_rows(checked, dtype, m.num_classes)

    def commit_rows(self, shard: int, rows: np.ndarray, statistics: dict[str, Any]) -> None:
        """Write one whole claimed shard of packed rows and commit it, now."""
        start, stop = self.manifest.shard_range(shard)
        if shard not in self.locks or shard in self._sealed or len(rows) != stop - start:
            raise StoreInputError(f"shard {shard} is not claimed by this writer, or {len(rows)} != {stop - start} rows")
        self._write_and_mark(shard, rows, statistics)
        self.locks.pop(shard).release()

    def _write_and_mark(self, shard: int, rows: np.ndarray, statistics: dict[str, Any] | Callable[[], dict]) -> None:
        """The commit's I/O, on any thread: data, then its marker. `statistics` may be a
        callable, so that their sums are computed here too."""
        m = self.manifest
        start, stop = m.shard_range(shard)
        with disk_full_named(self.store.location):
            self.store.backend.write_rows(self.epoch, start, rows)
        marker = {
            "epoch": self.epoch,
            "shard": shard,
            "start": start,
            "stop": stop,
            "digests": [block_digest(rows[i : i + m.chunk_records]) for i in range(0, len(rows), m.chunk_records)],
            "statistics": statistics() if callable(statistics) else statistics,
        }
        # The marker is written last: a range is visible only once all its bytes are down.
        with _MARKERS:  # one at a time, so that a fault hook stops the writer at an exact count of commits
            _fault_point("before")
            self.store.location.write_bytes(json.dumps(marker, sort_keys=True).encode(), *commit_key(self.epoch, shard))
            _fault_point("after")

    @property
    def incomplete(self) -> dict[int, int]:
        """Shards with some records buffered: shard -> records still missing."""
        return {s: int((~b.filled).sum()) for s, b in self.buffers.items()}

    def release(self) -> None:
        """Let go of every claim, once the sealed shards are down (their errors are flush's to
        report): a lock must outlive the writes of its range."""
        for future in self._sealed.values():
            future.exception()  # waits
        self._sealed.clear()
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None
        for lock in self.locks.values():
            lock.release()
        self.locks.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            self.flush()
        finally:
            incomplete = self.incomplete
            self.release()
        if exc_type is None and incomplete:
            raise StoreError(
                f"{plane_name(self.manifest, self.epoch)}: shards {incomplete} (shard: records missing) were not complete; nothing of them was committed"
            )


# A deterministic fault for the kill-and-resume tests: "before:N" kills the process after the rows of its N-th
# commit are written but before their marker; "after:N" right after the N-th marker (counted per process).
FAULT_COMMIT = "DISTILL_FAULT_COMMIT"
_commits = {"before": 0, "after": 0}
_MARKERS = threading.Lock()


def _fault_point(when: str) -> None:
    _commits[when] += 1
    if os.environ.get(FAULT_COMMIT) == f"{when}:{_commits[when]}":
        os.kill(os.getpid(), signal.SIGKILL)


class _NoLock:
    """Object stores have no locks: there, each writer must be given its own shards."""

    def release(self) -> None:
        pass


class _ShardBuffer:
    """One shard's rows, plus the per-record figures that feed its statistics: label and KL
    at each of KL_TEMPERATURES (NaN where the writer gave none)."""

    def __init__(self, manifest: Manifest, shard: int, dtype: np.dtype) -> None:
        self.start, stop = manifest.shard_range(shard)
        n = stop - self.start
        self.rows = np.zeros(n, dtype=dtype)
        # Rows are copied as opaque bytes: numpy moves fixed-size blobs far faster than fields.
        self._opaque = self.rows.view(np.dtype((np.void, dtype.itemsize)))
        self.filled = np.zeros(n, dtype=bool)
        self.logits = "values" in dtype.names
        self.figures = {
            "labels": np.full(n, -1, dtype=np.int64),
            "kl": np.full((n, len(KL_TEMPERATURES)), np.nan, dtype=np.float64),
        }

    @property
    def full(self) -> bool:
        return bool(self.filled.all())

    def add(self, ids: np.ndarray, rows: np.ndarray, figures: dict[str, np.ndarray]) -> None:
        offsets = ids - self.start
        if self.filled[offsets].any():
            dup = int(ids[self.filled[offsets]][0])
            raise StoreInputError(f"id {dup} was already written in this epoch; records are never overwritten")
        self._opaque[offsets] = rows.view(self._opaque.dtype)
        self.filled[offsets] = True
        for name, value in figures.items():
            self.figures[name][offsets] = value

    def statistics(self) -> dict[str, Any]:
        """Sums in id order, so a resumed save commits the same bytes as an uninterrupted one.
        Embeddings have no top-k: their statistics are the record count only. Run by the
        commit (on the worker), once the shard is whole."""
        if not self.logits:
            return {"records": len(self.rows)}
        labels, known = self.figures["labels"], self.figures["labels"] >= 0
        mass = np.empty(len(self.rows))
        for a in range(0, len(self.rows), _MASS_PIECE):  # bounded temporaries: [piece, k] float64
            mass[a : a + _MASS_PIECE] = codec.kept_mass(self.rows[a : a + _MASS_PIECE], CODED_VERSION)
        stats = {
            "records": len(self.rows),
            "topk_mass_sum": float(mass.sum()),
            "labeled": int(known.sum()),
            "top1_agree": int((self.rows["indices"][:, 0][known] == labels[known]).sum()),
        }
        for column, temperature in enumerate(KL_TEMPERATURES):
            kl = self.figures["kl"][:, column]
            has = ~np.isnan(kl)
            suffix = kl_suffix(temperature)
            stats |= {f"kl_sum{suffix}": float(kl[has].sum()), f"kl_records{suffix}": int(has.sum())}
        return stats


_MASS_PIECE = 8192


def kl_suffix(temperature: float) -> str:
    """'' at T = 1 (the key of versions 1-2), '_t2', '_t4' at the others."""
    return "" if temperature == 1 else f"_t{temperature:g}"


def _kl_columns(kl: np.ndarray | None, n: int) -> np.ndarray | None:
    """kl as [n, len(KL_TEMPERATURES)] float64, NaN where unknown; accepts [n] (T = 1 only)."""
    if kl is None:
        return None
    kl = np.asarray(kl, dtype=np.float64)
    if kl.shape == (n,):
        return np.column_stack([kl, np.full((n, len(KL_TEMPERATURES) - 1), np.nan)])
    if kl.shape != (n, len(KL_TEMPERATURES)):
        raise StoreInputError(f"'kl' has shape {kl.shape}, expected ({n},) or ({n}, {len(KL_TEMPERATURES)})")
    return kl


def topk_mass(values: np.ndarray, tail_lse: np.ndarray) -> np.ndarray:
    """Probability mass of the kept classes, exact from float logits (any shift) and the tail log-sum-exp."""
    v = values.astype(np.float64)
    top = np.max(v, axis=1, keepdims=True)
    kept = np.exp(v - top).sum(axis=1)
    tail = np.exp(tail_lse.astype(np.float64) - top[:, 0])
    return kept / (kept + tail)


def aggregate_statistics(markers: Any) -> dict[str, Any]:
    """Totals of the commit markers' statistics; a mean is None where no marker has its sums
    (the top-k means of an embeddings store)."""
    total: dict[str, float] = {"records": 0}
    for marker in markers:
        for key, value in (marker or {}).get("statistics", {}).items():
            total[key] = total.get(key, 0) + value

    def mean(key: str, count: str) -> float | None:
        return total[key] / total[count] if key in total and total.get(count) else None

    kl = {
        f"mean_kl_full_to_rebuilt{kl_suffix(t)}": mean(f"kl_sum{kl_suffix(t)}", f"kl_records{kl_suffix(t)}")
        for t in KL_TEMPERATURES
    }
    return {
        "records": total["records"],
        "mean_topk_mass": mean("topk_mass_sum", "records"),
        **kl,
        "teacher_top1_agreement": mean("top1_agree", "labeled"),
    }


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


# ---- opening and creating ------------------------------------------------------------------


def _read_manifest(location: StoreLocation) -> Manifest:
    try:
        raw = location.read_bytes(MANIFEST_KEY)
    except FileNotFoundError:
        raise StoreError(f"{location} is not a logit store: it has no {MANIFEST_KEY}") from None
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise StoreError(f"{location}/{MANIFEST_KEY} is not valid JSON: {err}") from None
    return Manifest.from_dict(data, source=f"{location}/{MANIFEST_KEY}")


def open_store(
    url: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    cache_bytes: int | None = None,
    cache_dir: str | None = None,
    cache_epochs: int = 2,
) -> LogitStore:
    """Open an existing store. cache_bytes bounds the decoded rows a reader keeps in its own
    memory (default: LOGIT_STORE_CACHE_BYTES, else 256 MiB); larger planes are shared by the
    node's readers through files under cache_dir (default: LOGIT_STORE_CACHE_DIR, else a
    per-user directory under the system temporary directory)."""
    location = StoreLocation(url, storage_options)
    return LogitStore(location, _read_manifest(location), cache_epochs, cache_bytes, cache_dir)


def old_version_message(where: str, version: int) -> str:
    return (
        f"{where} is a format-version-{version} logits store: this toolkit reads it as it is but writes "
        f"version {FORMAT_VERSION} only; to add to it, convert it first: "
        f"distill-store convert {where} NEW_STORE --upgrade"
    )


def create_store(
    url: str | os.PathLike[str], manifest: Manifest, storage_options: dict[str, Any] | None = None
) -> LogitStore:
    """Create a store, or reopen an existing one whose manifest matches (to resume).

    A different manifest is an error naming the fields, unless the store holds no committed
    record and no writer (what a failed save leaves): it is then replaced, saying so on stderr.
    A non-empty directory that is not a store is an error; nothing there is touched. Locally the store is built beside its target and moved
    in with one rename, so concurrent creators agree on one store.
    """
    location = StoreLocation(url, storage_options)
    if location.exists(MANIFEST_KEY):
        return _reopen(location, manifest)
    if location.exists() and location.fs.ls(location.root):
        raise StoreError(f"{location} exists, is not empty and is not a logit store; refusing to write into it")
    if not location.is_local:
        backend = create_backend(location, manifest)
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


BUILD_LOCK = "create"


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
    existing = _read_manifest(location)
    if existing.kind == "logits" and existing.format_version < CODED_VERSION <= manifest.format_version:
        raise StoreError(old_version_message(str(location), existing.format_version))
    fields = existing.differing_fields(manifest)
    if fields and not location.list_files("commits") and not _writers_alive(location):
        print(f"replacing {location}: it holds no committed record and was made with another "
              f"{', '.join(fields)}", file=sys.stderr)  # fmt: skip
        location.fs.rm(location.root, recursive=True)
        return create_store(location.url, manifest, location.storage_options)
    existing.check_same(manifest, where=str(location))
    return LogitStore(location, existing)


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
