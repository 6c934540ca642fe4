"""LogitStore: a store's manifest, commits, reads and writer over any backend.

Records live in planes: one per epoch, plus the text plane (index = epochs) in an
embeddings store (docs/STORE_FORMAT.md). The parts around it are modules of their own:
`commits` (markers), `writer` (ShardWriter), `integrity` (verify, repair, info, mixed in
here), `growth` (grow, provenance, statistics, coverage: the manifest updated in place, mixed in here),
`cache` (decoded planes) and `api` (open, create, convert).
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import numpy as np

from . import codec
from .backends import Backend, create_backend
from .cache import PlaneCache, default_cache_bytes
from .commits import Marker, class_index_error, damaged_blocks, list_markers, read_marker
from .errors import StoreAccessError, StoreDamagedError, StoreError, StoreInputError
from .growth import StoreUpdates
from .integrity import StoreChecks
from .location import StoreLocation
from .manifest import MANIFEST_KEY, Manifest, a_kind, old_version_message, plane_name, read_manifest
from .records import CODED_VERSION, Embeddings, Records
from .writer import ShardWriter, read_only_error

__all__ = ["LogitStore", "ReadPin"]


class ReadPin(Protocol):
    """What a reader asks of the pin it was given (`logit_store.pin.PinnedReads` is one)."""

    def check_plane(self, store: LogitStore, plane: int) -> None: ...
    def check_marker(self, store: LogitStore, plane: int, shard: int, marker: Marker) -> None: ...


class LogitStore(StoreChecks, StoreUpdates):
    """A store of teacher outputs, one record per (plane, sample id): sparse logits per
    (epoch, id), or embeddings per (epoch, id) plus one text embedding per id.

    Use `create_store` to make or reopen one for writing and `open_store` to read
    (`read_only=True` refuses every write with a StoreError). A context manager: leaving
    the `with` block closes it (its cache and back-end handles, such as lmdb's environment).
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
        read_only: bool = False,
    ) -> None:
        self.location = location
        self.manifest = manifest
        self.read_only = read_only or location.web  # a web location is never written
        self.backend: Backend = create_backend(location, manifest)
        self.cache_epochs = cache_epochs
        self.cache_bytes = default_cache_bytes() if cache_bytes is None else cache_bytes
        self.cache_dir = cache_dir
        self._cache = PlaneCache(self, cache_epochs, self.cache_bytes, cache_dir)
        self.pinned: ReadPin | None = None  # a run's pin: every plane and shard loaded is checked (`pin.py`)

    def __repr__(self) -> str:
        m = self.manifest
        if m.kind == "embeddings":
            return f"LogitStore({self.location}, backend={m.backend}, N={m.num_samples}, embeddings D={m.embed_dim}, epochs={m.epochs})"
        return f"LogitStore({self.location}, backend={m.backend}, N={m.num_samples}, C={m.num_classes}, k={m.k}, epochs={m.epochs})"

    def __enter__(self) -> LogitStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def text_plane(self) -> int:
        """The plane of the text embeddings (index = epochs); embeddings stores only."""
        if self.manifest.kind != "embeddings":
            raise StoreInputError(f"{self.location} is {a_kind(self.manifest.kind)} store: it has no text plane")
        return self.manifest.epochs

    def __getstate__(self) -> dict[str, Any]:
        cache = {"cache_epochs": self.cache_epochs, "cache_bytes": self.cache_bytes, "cache_dir": self.cache_dir}
        where = {"url": self.location.url, "options": self.location.storage_options, "read_only": self.read_only}
        return where | {"pinned": self.pinned} | cache

    def __setstate__(self, state: dict[str, Any]) -> None:
        location = StoreLocation(state["url"], state["options"])
        cache = (state["cache_epochs"], state["cache_bytes"], state["cache_dir"])
        self.__init__(location, read_manifest(location), *cache, read_only=state.get("read_only", False))
        self.pinned = state.get("pinned")

    @property
    def private_cache_bytes(self) -> int:
        """Decoded rows this reader holds in its own memory (<= cache_bytes)."""
        return self._cache.private_bytes

    # ---- commits -------------------------------------------------------------------
    def commits(self, epoch: int | None = None) -> dict[tuple[int, int], Marker]:
        """Commit markers (of one plane, or all), keyed by (plane, shard). A marker that does
        not parse or does not fit the layout maps to {} (damaged)."""
        return list_markers(self.location, self.manifest, epoch)

    def committed_shards(self, epoch: int) -> set[int]:
        return {s for (_, s), marker in self.commits(epoch).items() if marker}

    def pending_shards(self, epoch: int) -> list[int]:
        done = self.committed_shards(epoch)
        return [s for s in range(self.manifest.num_shards) if s not in done]

    def marker(self, epoch: int, shard: int) -> Marker:
        """The commit marker of one shard, checked: NotCommittedError if it has none, StoreDamagedError if it
        does not fit the layout, StoreChangedError if it is not the one the reader's pin checked its plane with."""
        marker = read_marker(self.location, self.manifest, epoch, shard)
        if self.pinned is not None:  # every shard a reader decodes: the commit its plane was checked with
            self.pinned.check_marker(self, epoch, shard, marker)
        return marker

    # ---- writing -------------------------------------------------------------------
    def writer(self, epoch: int, shards: list[int] | None = None) -> ShardWriter:
        """A writer for the uncommitted shards among `shards` (default: all) of one plane
        (an epoch, or `text_plane`)."""
        self._check_epoch(epoch)
        self._check_writable()
        return ShardWriter(self, epoch, self.pending_shards(epoch) if shards is None else shards)

    def _check_writable(self) -> None:
        """Refuse writing a store opened read-only, or of a format version this toolkit only reads."""
        m = self.manifest
        if self.read_only:
            raise read_only_error(self.location, "write to it")
        if m.kind == "logits" and m.format_version < CODED_VERSION:
            raise StoreError(old_version_message(str(self.location), m.format_version))

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
        marker: Marker | None = None,
        out: np.ndarray | None = None,
        piece: int | None = None,
    ) -> np.ndarray:
        """Packed rows of one committed shard, checked against the commit's block digests.

        Decoded in pieces of `piece` records (a multiple of chunk_records; default the whole
        shard) straight into `out`, so the backend's temporaries stay within one piece.
        """
        m = self.manifest
        marker = marker if marker is not None else self.marker(epoch, shard)
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

    def _check_epoch(self, epoch: int) -> None:
        m = self.manifest
        if not 0 <= epoch < m.planes:
            text = f", epoch {m.epochs} being the text plane" if m.kind == "embeddings" else ""
            raise StoreInputError(
                f"epoch {epoch} is outside the store's epochs [0, {m.planes}){text} ({self.location})"
            )

    def close(self) -> None:
        """Drop the decoded planes and the back-end's handles (lmdb's environment); a later read reopens them."""
        self._cache.clear()
        self.backend.close()
