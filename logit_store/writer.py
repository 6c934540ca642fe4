"""Writing a store: `ShardWriter` buffers records per shard and commits each whole shard, its rows first and
its commit marker last (`logit_store.commits`), so a range is visible only once all its bytes are down.

The writer needs little of its store (`WritableStore`; `LogitStore` is one): this module imports no store.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from . import codec
from .backends.base import Backend
from .commits import commit_key, new_marker
from .errors import StoreError, StoreInputError, disk_full_named
from .location import StoreLocation
from .locks import RangeLock
from .manifest import Manifest, a_kind, plane_name
from .records import CODED_VERSION, KL_TEMPERATURES, Embeddings, Records, validate_embeddings, validate_records
from .statistics import kl_columns, kl_suffix

__all__ = ["FAULT_COMMIT", "ShardWriter", "WritableStore", "read_only_error"]


class WritableStore(Protocol):
    """What a writer needs of its store."""

    location: StoreLocation
    manifest: Manifest
    backend: Backend
    read_only: bool

    def committed_shards(self, epoch: int) -> set[int]: ...


def read_only_error(location: StoreLocation, what: str) -> StoreError:
    """The refusal of a write (`what`) to a store opened read-only, or at a web location (never written)."""
    if location.web:
        return StoreError(
            f"{location} is an http(s) location, read-only: cannot {what}; write the store to a local folder or an "
            "object store, then serve a copy"
        )
    return StoreError(f"{location} was opened read-only: cannot {what}; open it with read_only=False to write")


class ShardWriter:
    """Buffers records per shard; a shard is written and committed once it is whole.

    Claims (locks) its shards on creation; a shard already committed is refused, so
    nothing committed is ever overwritten. A store opened read-only is refused.

    A whole shard is sealed (no more records) and committed on a background thread
    (compression, checksums and fsync release the GIL), while the caller fills the next:
    at most MAX_SEALED shards wait or run there. `flush()` waits for them and raises what
    failed; leaving the `with` block flushes. Locks and buffers are touched by the
    caller's thread only.
    """

    MAX_SEALED = 2

    def __init__(self, store: WritableStore, epoch: int, shards: list[int]) -> None:
        if store.read_only:
            raise read_only_error(store.location, f"write {plane_name(store.manifest, epoch)}")
        self.store, self.epoch = store, epoch
        self.manifest = m = store.manifest
        self.locks: dict[int, RangeLock | _NoLock] = {}
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

    def _lock(self, shard: int) -> RangeLock | _NoLock:
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
        expected = Embeddings if m.kind == "embeddings" else Records
        if not isinstance(records, expected):
            raise StoreInputError(
                f"{self.store.location} is {a_kind(m.kind)} store: it takes {expected.__name__}, got {type(records).__name__}"
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
            figures["kl"] = kl_columns(kl, len(rows))
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
        start, _ = self.manifest.shard_range(shard)
        with disk_full_named(self.store.location):
            self.store.backend.write_rows(self.epoch, start, rows)
        stats = statistics() if callable(statistics) else statistics
        marker = new_marker(self.manifest, self.epoch, shard, rows, stats)
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
