"""Checking and mending a store: verify, repair, info (`distill-store verify|repair|info`).

`StoreChecks` is mixed into `LogitStore` (this module imports no store): its methods use the store's
`manifest`, `location`, `backend`, `commits()`, `coverage()`, `read_shard()`, `refresh_statistics()` and
`_check_writable()`. Invariants: `verify` writes nothing; `repair` drops commit markers only (never data),
one repair of a local store at a time, and nothing for damage to a file every range depends on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .backends.base import Backend
from .commits import class_index_error, commit_key, damaged_blocks
from .errors import StoreAccessError, StoreDamagedError, StoreLockedError
from .location import StoreLocation
from .locks import RangeLock
from .manifest import MANIFEST_KEY, Manifest, plane_name
from .statistics import aggregate_statistics

REPAIR_LOCK = "repair"  # under .locks/: held by the one repair of a local store at a time


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


class StoreChecks:
    """verify, repair and info over a store (see the module docstring for what the host class provides)."""

    location: StoreLocation
    manifest: Manifest
    backend: Backend

    if TYPE_CHECKING:  # the host's (LogitStore's) methods these call

        def commits(self, epoch: int | None = None) -> dict[tuple[int, int], dict[str, Any]]: ...
        def coverage(self) -> dict[int, int]: ...
        def read_shard(self, epoch: int, shard: int) -> np.ndarray: ...
        def refresh_statistics(self) -> dict[str, Any]: ...
        def _check_writable(self) -> None: ...

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

    def _named_bytes(self, commits: dict[tuple[int, int], dict[str, Any]]) -> int:
        """Bytes of the files a reader names (manifest, markers, the back-end's files of the committed shards and
        those every range depends on): a store's size where its folders cannot be listed. For a finished store it
        equals what a listing counts (the rest of a local store, its lock files, is empty)."""
        committed = sorted(key for key, marker in commits.items() if marker)
        keys = [(MANIFEST_KEY,), *(commit_key(*key) for key in commits), *self.backend.named_files(committed)]
        return sum(self.location.sizes(keys))

    def info(self) -> dict[str, Any]:
        """Manifest (with its provenance), progress (committed records per epoch: `records_per_epoch`), size,
        statistics and content hashes. An embeddings store adds
        `text_complete` and `text_records`; its text plane's hash is under "text"."""
        m, commits, records = self.manifest, self.commits(), self.coverage()
        complete = [e for e, n in records.items() if n == m.num_samples]
        total = sum(records.values())
        used = self._named_bytes(commits) if self.location.web else self.location.bytes_used()
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
