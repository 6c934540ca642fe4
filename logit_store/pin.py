"""A reader's pin: the store a run started with, checked again at every plane the run loads.

A pin is plain JSON (a training run keeps it in its output dir and compares it when it resumes): the
manifest's identity and, per plane, a digest of the plane's commit markers (`make_pin`). A store can also be
replaced while a run reads it (its folder removed, another teacher's store copied in its place), so a pin
given to a reader (`pin_reads`) is checked as the reader goes on:

- each time a plane is loaded into the reader's cache, the manifest and that plane's commits are read again
  and compared with the pin (`LogitStore.read`; a store grown since, more epochs, is no change:
  `manifest_changes`);
- each shard then decoded into the plane must have the marker that comparison found (`LogitStore.marker`),
  so a store replaced in the middle of a plane is caught at its next shard.

A mismatch is a StoreChangedError naming the store and the plane. Rows decoded before were checked against
the pinned block digests, so whatever the cache (process memory or the node's shared files) serves is the
pinned store's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from .errors import StoreChangedError
from .manifest import plane_name, read_manifest
from .store import LogitStore

__all__ = ["PinnedReads", "commits_digest", "make_pin", "manifest_changes", "pin_reads"]

Markers = dict[tuple[int, int], dict[str, Any]]


def commits_digest(markers: Markers) -> str:
    """sha256 of a plane's block digests in shard order: what a pin keeps of the plane's commits."""
    text = json.dumps([markers[key].get("digests") for key in sorted(markers)])
    return hashlib.sha256(text.encode()).hexdigest()


def make_pin(store: LogitStore, planes: Iterable[int]) -> dict[str, Any]:
    """The pin of `planes` of the store as it is now, as it reads back from a JSON file."""
    pin = {"manifest": store.manifest.identity(), "planes": {str(p): commits_digest(store.commits(p)) for p in planes}}
    return json.loads(json.dumps(pin))


def pin_reads(store: LogitStore, pin: dict[str, Any]) -> None:
    """From now on, `store` reads the planes of `pin` only as they were pinned (see the module docstring)."""
    store.pinned = PinnedReads(pin)


class PinnedReads:
    """A reader's pin and the markers of the planes it has checked. Plain data: it travels with a pickled
    store into DataLoader workers."""

    def __init__(self, pin: dict[str, Any]) -> None:
        self.pin = pin
        self.markers: dict[int, Markers] = {}  # per checked plane: the markers found equal to the pin

    def check_plane(self, store: LogitStore, plane: int) -> None:
        """Read the manifest and the plane's commits again; raise unless they are the pinned ones."""
        pinned = self.pin["planes"].get(str(plane))
        if pinned is None:  # a plane the pin does not cover
            return
        identity = json.loads(json.dumps(read_manifest(store.location).identity()))
        fields = manifest_changes(self.pin["manifest"], identity)
        if fields:
            raise _changed(store, plane, "its manifest differs in " + ", ".join(fields))
        markers = store.commits(plane)
        if commits_digest(markers) != pinned:
            raise _changed(store, plane, "its commits differ from the pinned ones (written again)")
        self.markers[plane] = markers

    def check_marker(self, store: LogitStore, plane: int, shard: int, marker: dict[str, Any]) -> None:
        """Raise unless a shard about to be decoded has the marker its plane was checked with."""
        checked = self.markers.get(plane)
        if checked is not None and checked.get((plane, shard), {}).get("digests") != marker.get("digests"):
            start, stop = store.manifest.shard_range(shard)
            raise _changed(store, plane, f"the commit of records [{start}, {stop}) differs from the pinned one")


def _changed(store: LogitStore, plane: int, what: str) -> StoreChangedError:
    return StoreChangedError(
        f"{store.location} changed under this run at {plane_name(store.manifest, plane)}: {what}; it is not the "
        "store this run pinned at its start (restore that store and resume, or start a new run)"
    )


def manifest_changes(pinned: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """The dotted paths where a manifest identity differs from a pinned one, with both values; a logits store
    grown since (more `epochs`, `LogitStore.grow`) is no change: its planes stay where they were."""
    kind = identity.get("kind", "logits")
    old, new = pinned.get("epochs"), identity.get("epochs")
    if kind == "logits" and isinstance(old, int) and isinstance(new, int) and new > old:
        identity = identity | {"epochs": old}
    return _differing(pinned, identity)


def _differing(old: Any, new: Any, path: str = "") -> list[str]:
    """The dotted paths where two manifest identities differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [f for k in keys for f in _differing(old.get(k), new.get(k), f"{path}{k}.")]
    return [] if old == new else [f"{path.rstrip('.')} (was {old!r}, now {new!r})"]
