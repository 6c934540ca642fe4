"""LogitStore: manifest, commits, writers and readers over any backend.

Records live in planes: one per epoch, plus the text plane (index = epochs) in an
embeddings store (docs/STORE_FORMAT.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from .backends import Backend, create_backend
from .errors import NotCommittedError, StoreError, StoreInputError
from .location import StoreLocation
from .locks import RangeLock
from .manifest import Manifest
from .records import Embeddings, Records, block_digest, validate_embeddings, validate_records

MANIFEST_KEY = "manifest.json"
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
    """

    def __init__(self, location: StoreLocation, manifest: Manifest, cache_epochs: int = 2) -> None:
        self.location = location
        self.manifest = manifest
        self.backend: Backend = create_backend(location, manifest)
        self.cache_epochs = cache_epochs
        self._cache: OrderedDict[int, _EpochCache] = OrderedDict()
        self._batch: type[Records] | type[Embeddings] = Embeddings if manifest.kind == "embeddings" else Records

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
        return {"url": self.location.url, "options": self.location.storage_options, "cache_epochs": self.cache_epochs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        location = StoreLocation(state["url"], state["options"])
        self.__init__(location, _read_manifest(location), state["cache_epochs"])

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
                out[key] = self._checked_marker(json.loads(self.location.fs.cat_file(path)), *key)
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
        return ShardWriter(self, epoch, self.pending_shards(epoch) if shards is None else shards)

    def refresh_statistics(self) -> dict[str, Any]:
        """Fold the statistics of every commit into the manifest file."""
        self.manifest.statistics = aggregate_statistics(self.commits().values())
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
        cache = self._cache.get(epoch)
        if cache is None or not cache.complete:  # the hot path of a training epoch skips all this
            self._check_epoch(epoch)
            cache = self._epoch_cache(epoch)
            for shard in np.unique(ids // self.manifest.shard_records):
                cache.ensure(int(shard))
        return self._batch.from_rows(cache.gather(ids))

    def read_text(self, ids: np.ndarray | list[int]) -> Embeddings:
        """Text embeddings of `ids` (any order): a read of the text plane."""
        return cast(Embeddings, self.read(self.text_plane, ids))

    def read_shard(
        self, epoch: int, shard: int, marker: dict[str, Any] | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Decoded rows of one committed shard, checked against the commit's block digests."""
        marker = marker if marker is not None else self._marker(epoch, shard)
        start, stop = self.manifest.shard_range(shard)
        rows = self.backend.read_rows(epoch, start, stop, out)
        bad = damaged_blocks(rows, marker["digests"], self.manifest.chunk_records)
        if bad:
            a, b = bad[0]
            where = plane_name(self.manifest, epoch)
            raise StoreError(f"{self.location}: {where} records [{start + a}, {start + b}) fail their checksum")
        return rows

    def _marker(self, epoch: int, shard: int) -> dict[str, Any]:
        start, stop = self.manifest.shard_range(shard)
        where = f"{self.location}: {plane_name(self.manifest, epoch)} records [{start}, {stop})"
        missing = NotCommittedError(f"{where} are not committed")
        try:
            marker = json.loads(self.location.read_bytes(*commit_key(epoch, shard)))
        except (FileNotFoundError, ValueError):
            raise missing from None
        if not self._checked_marker(marker, epoch, shard):
            raise StoreError(f"{where} have a damaged commit marker")
        return marker

    def _epoch_cache(self, epoch: int) -> _EpochCache:
        if epoch in self._cache:
            self._cache.move_to_end(epoch)
        else:
            self._cache[epoch] = _EpochCache(self, epoch)
            while len(self._cache) > self.cache_epochs:
                self._cache.popitem(last=False)
        return self._cache[epoch]

    def _check_epoch(self, epoch: int) -> None:
        m = self.manifest
        if not 0 <= epoch < m.planes:
            text = f", epoch {m.epochs} being the text plane" if m.kind == "embeddings" else ""
            raise StoreInputError(
                f"epoch {epoch} is outside the store's epochs [0, {m.planes}){text} ({self.location})"
            )

    # ---- integrity -----------------------------------------------------------------
    def verify(self) -> list[Problem]:
        """Every missing or damaged record range of the planned planes (empty when intact)."""
        m, commits, problems = self.manifest, self.commits(), []
        for epoch in range(m.planes):
            text = plane_name(m, epoch) == "text plane"
            for shard in range(m.num_shards):
                start, stop = m.shard_range(shard)
                marker = commits.get((epoch, shard))
                if marker is None:
                    problems.append(Problem(epoch, start, stop, "missing", "not committed", text))
                    continue
                if not marker:
                    problems.append(Problem(epoch, start, stop, "damaged", "commit marker unreadable", text))
                    continue
                try:
                    rows = self.backend.read_rows(epoch, start, stop)
                except Exception as err:  # any decode failure of damaged bytes is reported, not raised
                    problems.append(Problem(epoch, start, stop, "damaged", f"cannot decode: {err}", text))
                    continue
                for a, b in damaged_blocks(rows, marker["digests"], m.chunk_records):
                    problems.append(Problem(epoch, start + a, start + b, "damaged", "checksum mismatch", text))
        return problems

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
    kind: str  # "missing" or "damaged"
    detail: str
    text: bool = False

    def __str__(self) -> str:
        where = "text plane" if self.text else f"epoch {self.epoch}"
        return f"{where} records [{self.start}, {self.stop}): {self.kind} ({self.detail})"


class _EpochCache:
    """All rows of one plane, filled shard by shard as reads need them."""

    def __init__(self, store: LogitStore, epoch: int) -> None:
        self.store, self.epoch = store, epoch
        self.rows = np.zeros(store.manifest.num_samples, dtype=store.backend.row_dtype)
        self.loaded = np.zeros(store.manifest.num_shards, dtype=bool)
        self.complete = False
        # numpy gathers opaque fixed-size rows ~15x faster than rows with fields.
        self._opaque = self.rows.view(np.dtype((np.void, self.rows.dtype.itemsize)))

    def gather(self, ids: np.ndarray) -> np.ndarray:
        return self._opaque[ids].view(self.rows.dtype)

    def ensure(self, shard: int) -> None:
        if self.loaded[shard]:
            return
        start, stop = self.store.manifest.shard_range(shard)
        self.store.read_shard(self.epoch, shard, out=self.rows[start:stop])
        self.loaded[shard] = True
        self.complete = bool(self.loaded.all())


class ShardWriter:
    """Buffers records per shard; a shard is written and committed once it is whole.

    Claims (locks) its shards on creation; a shard already committed is refused, so
    nothing committed is ever overwritten.
    """

    def __init__(self, store: LogitStore, epoch: int, shards: list[int]) -> None:
        self.store, self.epoch = store, epoch
        self.manifest = m = store.manifest
        self.locks: dict[int, RangeLock] = {}
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
        self.buffers: dict[int, _ShardBuffer] = {}

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
        shards this call completed and committed.

        labels (optional, -1 for unknown) and kl (KL(full || rebuilt) per record) only feed
        the statistics of a logits store.
        """
        m = self.manifest
        expected = self.store._batch
        if not isinstance(records, expected):
            raise StoreInputError(
                f"{self.store.location} is {_a(m.kind)} store: it takes {expected.__name__}, got {type(records).__name__}"
            )
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise StoreInputError(f"ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= m.num_samples):
            raise StoreInputError(f"ids out of range: [{ids.min()}, {ids.max()}], expected [0, {m.num_samples})")
        if len(np.unique(ids)) != len(ids):
            raise StoreInputError("ids hold duplicates")
        if len(records) != len(ids):
            raise StoreInputError(f"{len(ids)} ids but {len(records)} records")
        if isinstance(records, Embeddings):
            checked: Records | Embeddings = validate_embeddings(records, embed_dim=m.embed_dim)
        else:
            checked = validate_records(
                records, k=m.k, num_classes=m.num_classes, mixing=m.mixing, num_samples=m.num_samples
            )
        rows = checked.to_rows(self.store.backend.row_dtype)
        extras = {"labels": labels, "kl": kl}
        for name, arr in extras.items():
            if arr is not None and np.shape(arr) != ids.shape:
                raise StoreInputError(f"'{name}' has shape {np.shape(arr)}, expected {ids.shape}")
        shard_of = ids // m.shard_records
        unclaimed = sorted(set(np.unique(shard_of).tolist()) - set(self.locks))
        if unclaimed:
            raise StoreInputError(
                f"{plane_name(m, self.epoch)} shards {unclaimed} are not claimed by this writer (committed already, or another writer's)"
            )
        completed = []
        for shard in np.unique(shard_of).tolist():
            sel = shard_of == shard
            buf = self.buffers.get(shard) or self.buffers.setdefault(
                shard, _ShardBuffer(m, shard, self.store.backend.row_dtype)
            )
            buf.add(ids[sel], rows[sel], *(None if a is None else np.asarray(a)[sel] for a in extras.values()))
            if buf.full:
                self.commit_rows(shard, buf.rows, self.buffers.pop(shard).stats)
                completed.append(shard)
        return completed

    def commit_rows(self, shard: int, rows: np.ndarray, statistics: dict[str, Any]) -> None:
        """Write one whole claimed shard of packed rows and commit it."""
        m = self.manifest
        start, stop = m.shard_range(shard)
        if shard not in self.locks or len(rows) != stop - start:
            raise StoreInputError(f"shard {shard} is not claimed by this writer, or {len(rows)} != {stop - start} rows")
        self.store.backend.write_rows(self.epoch, start, rows)
        _fault_point("before")
        marker = {
            "epoch": self.epoch,
            "shard": shard,
            "start": start,
            "stop": stop,
            "digests": [block_digest(rows[i : i + m.chunk_records]) for i in range(0, len(rows), m.chunk_records)],
            "statistics": statistics,
        }
        # The marker is written last: a range is visible only once all its bytes are down.
        self.store.location.write_bytes(json.dumps(marker, sort_keys=True).encode(), *commit_key(self.epoch, shard))
        self.locks.pop(shard).release()
        _fault_point("after")

    @property
    def incomplete(self) -> dict[int, int]:
        """Shards with some records buffered: shard -> records still missing."""
        return {s: int((~b.filled).sum()) for s, b in self.buffers.items()}

    def release(self) -> None:
        for lock in self.locks.values():
            lock.release()
        self.locks.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
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


def _fault_point(when: str) -> None:
    _commits[when] += 1
    if os.environ.get(FAULT_COMMIT) == f"{when}:{_commits[when]}":
        os.kill(os.getpid(), signal.SIGKILL)


class _NoLock:
    """Object stores have no locks: there, each writer must be given its own shards."""

    def release(self) -> None:
        pass


class _ShardBuffer:
    """One shard's rows, plus the per-record labels and KL that feed its statistics."""

    def __init__(self, manifest: Manifest, shard: int, dtype: np.dtype) -> None:
        self.start, stop = manifest.shard_range(shard)
        self.rows = np.zeros(stop - self.start, dtype=dtype)
        self.filled = np.zeros(stop - self.start, dtype=bool)
        self.labels = np.full(stop - self.start, -1, dtype=np.int64)
        self.kl = np.full(stop - self.start, np.nan, dtype=np.float64)

    @property
    def full(self) -> bool:
        return bool(self.filled.all())

    def add(self, ids: np.ndarray, rows: np.ndarray, labels: np.ndarray | None, kl: np.ndarray | None) -> None:
        offsets = ids - self.start
        if self.filled[offsets].any():
            dup = int(ids[self.filled[offsets]][0])
            raise StoreInputError(f"id {dup} was already written in this epoch; records are never overwritten")
        self.rows[offsets] = rows
        self.filled[offsets] = True
        if labels is not None:
            self.labels[offsets] = labels
        if kl is not None:
            self.kl[offsets] = kl

    @property
    def stats(self) -> dict[str, Any]:
        """Sums in id order, so a resumed save commits the same bytes as an uninterrupted one.
        Embeddings have no top-k: their statistics are the record count only."""
        if "values" not in self.rows.dtype.names:
            return {"records": len(self.rows)}
        known, has_kl = self.labels >= 0, ~np.isnan(self.kl)
        return {
            "records": len(self.rows),
            "topk_mass_sum": float(topk_mass(self.rows["values"], self.rows["tail_lse"]).sum()),
            "kl_sum": float(self.kl[has_kl].sum()),
            "kl_records": int(has_kl.sum()),
            "labeled": int(known.sum()),
            "top1_agree": int((self.rows["indices"][:, 0][known] == self.labels[known]).sum()),
        }


def topk_mass(values: np.ndarray, tail_lse: np.ndarray) -> np.ndarray:
    """Probability mass of the kept classes, exact from the logits and the tail log-sum-exp."""
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

    return {
        "records": total["records"],
        "mean_topk_mass": mean("topk_mass_sum", "records"),
        "mean_kl_full_to_rebuilt": mean("kl_sum", "kl_records"),
        "teacher_top1_agreement": mean("top1_agree", "labeled"),
    }


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


def open_store(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> LogitStore:
    """Open an existing store."""
    location = StoreLocation(url, storage_options)
    return LogitStore(location, _read_manifest(location))


def create_store(
    url: str | os.PathLike[str], manifest: Manifest, storage_options: dict[str, Any] | None = None
) -> LogitStore:
    """Create a store, or reopen an existing one whose manifest matches (to resume).

    A different manifest, or a non-empty directory that is not a store, is an error;
    nothing there is touched. Locally the store is built beside its target and moved
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
    tmp = StoreLocation(f"{location.root}.tmp-{uuid.uuid4().hex}")
    try:
        os.makedirs(tmp.root)
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
    return LogitStore(location, manifest)


def _reopen(location: StoreLocation, manifest: Manifest) -> LogitStore:
    existing = _read_manifest(location)
    existing.check_same(manifest, where=str(location))
    return LogitStore(location, existing)


def convert_store(
    src: LogitStore, dst_url: str | os.PathLike[str], backend: str, storage_options: dict[str, Any] | None = None
) -> LogitStore:
    """Copy every committed record and its commit marker into a store of another backend.

    Records are checked against their digests on the way; re-running resumes.
    """
    manifest = Manifest.from_dict(src.manifest.to_dict() | {"backend": backend})
    dst = create_store(dst_url, manifest, storage_options)
    done = {key for key, marker in dst.commits().items() if marker}
    commits = src.commits()
    damaged = sorted(key for key, marker in commits.items() if not marker)
    if damaged:
        raise StoreError(
            f"{src.location}: damaged commit markers for (epoch, shard) {damaged}; run distill-store verify"
        )
    for (epoch, shard), marker in sorted(commits.items()):
        if (epoch, shard) in done:
            continue
        rows = src.read_shard(epoch, shard, marker)
        with dst.writer(epoch, [shard]) as writer:
            writer.commit_rows(shard, rows, marker["statistics"])
    dst.refresh_statistics()
    return dst
