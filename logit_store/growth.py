"""A store's manifest, updated in place: growing its epochs, recording who wrote which planes, refreshing its
statistics; and its coverage per plane (`StoreUpdates`, mixed into `LogitStore`; this module imports no store).

Invariants: manifest.json is only ever rewritten whole (write-and-rename locally), under the store's manifest
lock (`locks.manifest_lock`), from the manifest as it is on the store at that moment, so no update loses
another's. A store only gains planes: the back-end makes room first, the manifest says so last, so a grow
killed between the two leaves a store that opens with its old epochs (the extra room unused) and grows again.
Planes never move, so a reader holding the old manifest keeps reading its planes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import operator
import os
import signal
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .backends.base import Backend
from .commits import list_markers
from .errors import StoreError, StoreInputError
from .location import StoreLocation, redact_text
from .locks import manifest_lock
from .manifest import MANIFEST_KEY, Manifest, read_manifest
from .statistics import aggregate_statistics
from .writer import read_only_error

__all__ = ["FAULT_GROW", "StoreUpdates"]

# A deterministic fault for the kill-during-grow test: "resized" kills the process (SIGKILL) once the back-end
# has room for the new planes, before the manifest says so.
FAULT_GROW = "DISTILL_FAULT_GROW"


class StoreUpdates:
    """grow, add_provenance, refresh_statistics, write_statistics and coverage over a store. The host class
    (`LogitStore`) provides `location`, `manifest`, `backend`, `read_only`, `commits()` and `_check_writable()`."""

    location: StoreLocation
    manifest: Manifest
    backend: Backend
    read_only: bool

    if TYPE_CHECKING:  # the host's (LogitStore's) methods these call

        def commits(self, epoch: int | None = None) -> dict[tuple[int, int], dict[str, Any]]: ...
        def _check_writable(self) -> None: ...

    def coverage(self) -> dict[int, int]:
        """Committed records per plane (every plane of the manifest, 0 where none), from the commit markers."""
        m = self.manifest
        counts = dict.fromkeys(range(m.planes), 0)
        for (plane, shard), marker in self.commits().items():
            if marker and plane in counts:
                start, stop = m.shard_range(shard)
                counts[plane] += stop - start
        return counts

    def grow(self, epochs: int) -> None:
        """Raise the manifest's `epochs` to `epochs`, the new planes empty (uncommitted); nothing when the store
        has that many already. Refused (StoreError) for a store opened read-only, a version-1/2 logits store and
        an embeddings store (its text plane, plane `epochs`, would have to move)."""
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise StoreInputError(f"{self.location}: cannot grow to {epochs!r} epochs: expected a positive integer")
        if epochs <= self.manifest.epochs:
            return
        self._check_writable()

        def grown(fresh: Manifest) -> Manifest:
            if fresh.kind == "embeddings":
                raise StoreError(
                    f"{self.location} is an embeddings store: growing it is not supported (its text plane is "
                    f"plane {fresh.epochs}, where a new epoch would go); save its {epochs} epochs into a new store"
                )
            if fresh.epochs >= epochs:
                return fresh
            manifest = dataclasses.replace(fresh, epochs=epochs)
            self.backend.manifest = manifest
            self.backend.grow()  # room first, the manifest last
            if os.environ.get(FAULT_GROW) == "resized":
                os.kill(os.getpid(), signal.SIGKILL)
            return manifest

        self._update_manifest(grown, "grow it")

    def add_provenance(self, planes: Iterable[int], source: dict[str, Any]) -> None:
        """Record in the manifest that `planes` were written by `source` (its "by", "run", "teacher", ...; "at"
        defaults to now, UTC): one entry per source, an entry of the same source taking in the new planes (planes
        it holds already change nothing, its time included). Strings are stored with any credentials in URLs
        removed. Not part of the store's identity."""
        try:
            planes = sorted({operator.index(p) for p in planes})  # numpy's integers too, never a float
            entry = json.loads(redact_text(json.dumps(source, sort_keys=True)))
        except (TypeError, ValueError) as err:
            raise StoreInputError(
                f"{self.location}: provenance needs plane indices and a source of plain JSON data: {err}"
            ) from None
        if not isinstance(entry, dict) or "planes" in entry:
            raise StoreInputError(f"{self.location}: provenance source must be an object without 'planes'")
        entry.setdefault("at", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))

        def recorded(fresh: Manifest) -> Manifest:
            outside = [p for p in planes if not 0 <= p < fresh.planes]
            if outside:
                raise StoreInputError(f"{self.location}: planes {outside} are outside the store's [0, {fresh.planes})")
            entries, merged, same = [], set(planes), {k: v for k, v in entry.items() if k != "at"}
            if any(_source(old) == same and merged <= set(old["planes"]) for old in fresh.provenance):
                return fresh  # said already (a finished save run again): the manifest stays byte for byte
            for old in fresh.provenance:
                if _source(old) == same:
                    merged |= set(old["planes"])
                else:
                    entries.append(old)
            entries.append({**entry, "planes": sorted(merged)})
            return dataclasses.replace(fresh, provenance=entries)

        self._update_manifest(recorded, "record provenance")

    def refresh_statistics(self) -> dict[str, Any]:
        """Fold the statistics of every commit (of every plane the store has now) into the manifest file."""

        def refreshed(fresh: Manifest) -> Manifest:
            markers = list_markers(self.location, fresh).values()
            return dataclasses.replace(fresh, statistics=aggregate_statistics(markers))

        self._update_manifest(refreshed, f"write {MANIFEST_KEY}")
        return self.manifest.statistics

    def write_statistics(self, markers: Any) -> dict[str, Any]:
        """Fold the statistics of these commit markers (this store's own) into the manifest file."""
        statistics = aggregate_statistics(markers)
        self._update_manifest(lambda fresh: dataclasses.replace(fresh, statistics=statistics), f"write {MANIFEST_KEY}")
        return self.manifest.statistics

    def _update_manifest(self, change: Callable[[Manifest], Manifest], what: str) -> None:
        """Under the manifest lock: read the manifest, `change` it, write it whole unless unchanged (`change`
        returned it), and take it as this store's manifest."""
        if self.read_only:
            raise read_only_error(self.location, what)
        with manifest_lock(self.location):
            fresh = read_manifest(self.location)
            manifest = change(fresh)
            if manifest is not fresh:
                self.location.write_bytes(manifest.to_json().encode(), MANIFEST_KEY)
        if manifest.planes != self.backend.manifest.planes:  # grown by another process: the back-end's room too
            self.backend.manifest = manifest
            self.backend.grow()
        self.manifest = self.backend.manifest = manifest


def _source(entry: dict[str, Any]) -> dict[str, Any]:
    """A provenance entry's source: what names the writer, without its planes and time."""
    return {k: v for k, v in entry.items() if k not in ("at", "planes")}
