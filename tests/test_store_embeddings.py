"""Embeddings stores: image planes per epoch plus a text plane, on both backends; v1 logits manifests."""

import json

import numpy as np
import pytest
import zarr
from store_helpers import manifest, records_for

from logit_store import (
    KINDS,
    Embeddings,
    Manifest,
    NotCommittedError,
    StoreError,
    StoreInputError,
    create_store,
    open_store,
    record_seeds,
)
from logit_store.cli import main as store_cli
from logit_store.records import row_dtype

N, D, EPOCHS = 1000, 16, 2  # default layout: shards (= blocks) of 128 records, the last 104
BACKENDS = ["zarr", "lmdb"]


def emb_manifest(backend: str = "zarr", **overrides: object) -> Manifest:
    fields = {"num_samples": N, "num_classes": 0, "k": 0, "epochs": EPOCHS, "kind": "embeddings", "embed_dim": D}
    return Manifest(**(fields | {"backend": backend, "global_seed": 7} | overrides))


def unit_vectors(plane: int, ids: np.ndarray) -> np.ndarray:
    """Random unit vectors (float32) that depend only on (plane, id)."""
    full = np.random.default_rng(plane).normal(size=(N, D))
    return (full / np.linalg.norm(full, axis=1, keepdims=True)).astype(np.float32)[ids]


def batch_for(m: Manifest, plane: int, ids: np.ndarray) -> Embeddings:
    seeds = record_seeds(m.global_seed, plane, ids) if plane < m.epochs else np.zeros(len(ids), np.uint32)
    return Embeddings(unit_vectors(plane, ids), seeds)


def write_plane(store, plane: int, shards: list[int] | None = None, batch: int = 97, order_seed: int = 0) -> None:
    with store.writer(plane, shards) as writer:
        ids = np.concatenate([np.arange(*store.manifest.shard_range(s)) for s in sorted(writer.locks)])
        np.random.default_rng(order_seed).shuffle(ids)
        for start in range(0, len(ids), batch):
            writer.write(ids[start : start + batch], batch_for(store.manifest, plane, ids[start : start + batch]))


def full_store(path, backend: str = "zarr"):
    store = create_store(path, emb_manifest(backend))
    for plane in range(store.manifest.planes):
        write_plane(store, plane, order_seed=plane)
    return open_store(path)


def write_one(store, plane: int, ids: np.ndarray, batch) -> None:
    writer = store.writer(plane, [0])
    try:
        writer.write(ids, batch)
    finally:
        writer.release()


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_image_and_text_planes(tmp_path, backend):
    store = full_store(tmp_path / "s", backend)
    m = store.manifest
    assert (m.kind, m.planes, store.text_plane, m.format_version) == ("embeddings", EPOCHS + 1, EPOCHS, 3)
    assert m.dtypes == {"embedding": "float16", "seed": "uint32"}
    assert store.backend.row_dtype.itemsize == 2 * D + 4 == row_dtype(0, 0, False, "embeddings", D).itemsize
    rng = np.random.default_rng(1)
    for plane in range(EPOCHS):
        ids = rng.permutation(N)[:300]
        got = store.read(plane, ids)
        assert isinstance(got, Embeddings) and got.embedding.dtype == np.float16
        np.testing.assert_array_equal(got.embedding, unit_vectors(plane, ids).astype(np.float16))
        np.testing.assert_array_equal(got.seed, record_seeds(m.global_seed, plane, ids))
    ids = rng.permutation(N)[:300]
    text = store.read_text(ids)
    np.testing.assert_array_equal(text.embedding, unit_vectors(EPOCHS, ids).astype(np.float16))
    np.testing.assert_array_equal(text.seed, np.zeros(len(ids), np.uint32))
    np.testing.assert_array_equal(store.read(store.text_plane, ids).embedding, text.embedding)
    assert (tmp_path / "s" / "commits" / f"e{EPOCHS:05d}-s000000.json").exists()
    info = store.info()
    assert info["completed_epochs"] == list(range(EPOCHS)) and info["text_complete"] is True
    assert set(info["content_hashes"]) == {"0", "1", "text"}
    assert info["records"] == (EPOCHS + 1) * N and info["text_records"] == N
    assert info["statistics"] == {
        "records": (EPOCHS + 1) * N,
        "mean_topk_mass": None,
        "mean_kl_full_to_rebuilt": None,
        "mean_kl_full_to_rebuilt_t2": None,
        "mean_kl_full_to_rebuilt_t4": None,
        "teacher_top1_agreement": None,
    }
    assert store.verify() == []
    if backend == "zarr":
        assert zarr.open_group(str(tmp_path / "s"), mode="r")["embedding"].shape == (EPOCHS + 1, N, D)


def test_manifest_constraints():
    assert KINDS == ("logits", "embeddings")
    with pytest.raises(StoreInputError, match=r"'k' must be 0 for an embeddings store \(it has no top-k\), got 5"):
        emb_manifest(k=5)
    with pytest.raises(StoreInputError, match=r"'num_classes' must be 0 for an embeddings store .* got 10"):
        emb_manifest(num_classes=10)
    with pytest.raises(StoreInputError, match="'mixing' must be False for an embeddings store"):
        emb_manifest(mixing=True)
    with pytest.raises(StoreInputError, match="'embed_dim' must be a positive integer for an embeddings store, got 0"):
        emb_manifest(embed_dim=0)
    with pytest.raises(StoreInputError, match="'embed_dim' must be 0 for a logits store, got 4"):
        manifest(embed_dim=4)
    with pytest.raises(StoreInputError, match="kind 'audio' is not one of"):
        emb_manifest(kind="audio")
    with pytest.raises(StoreInputError, match="format_version 4 is not supported"):
        emb_manifest(format_version=4)
    with pytest.raises(StoreInputError, match="kind 'embeddings' needs format_version 2, got 1"):
        emb_manifest(format_version=1)
    big = emb_manifest(num_samples=1_000_000, embed_dim=512)
    assert (big.chunk_records, big.planes, manifest().planes) == (256, EPOCHS + 1, 2)


@pytest.fixture
def store(tmp_path):
    return create_store(tmp_path / "s", emb_manifest())


def test_bad_embeddings_are_refused_and_nothing_committed(store):
    m, ids = store.manifest, np.arange(8)
    scaled = batch_for(m, 0, ids)
    scaled.embedding[3] *= 1.1
    with pytest.raises(
        StoreInputError,
        match=r"field 'embedding' row 3 has L2 norm 1\.1, expected 1 within 0\.01: embeddings must be L2-normalised",
    ):
        write_one(store, 0, ids, scaled)
    nan = batch_for(m, 0, ids)
    nan.embedding[2, 5] = np.nan
    with pytest.raises(StoreInputError, match=r"field 'embedding' holds NaN or inf \(row 2\) after casting to float16"):
        write_one(store, 0, ids, nan)
    narrow = Embeddings(batch_for(m, 0, ids).embedding[:, : D - 1], batch_for(m, 0, ids).seed)
    with pytest.raises(StoreInputError, match=rf"field 'embedding' has shape \(8, {D - 1}\), expected \(8, {D}\)"):
        write_one(store, 0, ids, narrow)
    ints = Embeddings(np.ones((8, D), np.int32), batch_for(m, 0, ids).seed)
    with pytest.raises(StoreInputError, match=r"field 'embedding' has dtype int32, expected a floating dtype"):
        write_one(store, 0, ids, ints)
    with pytest.raises(StoreInputError, match="is an embeddings store: it takes Embeddings, got Records"):
        write_one(store, 0, ids, records_for(manifest(), 0, ids))
    # A whole shard with one bad row: refused, so nothing of it is committed.
    shard = np.arange(*m.shard_range(0))
    bad = batch_for(m, EPOCHS, shard)
    bad.embedding[100] = 0.0
    with pytest.raises(StoreInputError, match="row 100 has L2 norm 0"):
        write_one(store, EPOCHS, shard, bad)
    assert store.pending_shards(0) == store.pending_shards(EPOCHS) == list(range(m.num_shards))
    with pytest.raises(NotCommittedError, match=r"text plane records \[0, 128\) are not committed"):
        store.read_text([0])


def test_logits_store_refuses_embeddings(tmp_path):
    logits = create_store(tmp_path / "l", manifest())
    with pytest.raises(StoreInputError, match="is a logits store: it takes Records, got Embeddings"):
        write_one(logits, 0, np.arange(4), Embeddings(np.eye(4, D, dtype=np.float32), np.zeros(4, np.uint32)))


def test_uncommitted_text_plane(store):
    for plane in range(EPOCHS):
        write_plane(store, plane)
    write_plane(store, store.text_plane, shards=[0])
    np.testing.assert_array_equal(store.read_text([5, 0]).embedding, unit_vectors(EPOCHS, [5, 0]).astype(np.float16))
    with pytest.raises(NotCommittedError, match=r"text plane records \[384, 512\) are not committed"):
        store.read_text([0, 500])
    problems = [str(p) for p in store.verify()]
    assert problems[0] == "text plane records [128, 256): missing (not committed)"
    assert len(problems) == store.manifest.num_shards - 1 and all(p.startswith("text plane") for p in problems)
    info = store.info()
    assert info["completed_epochs"] == [0, 1] and info["text_complete"] is False and info["text_records"] == 128
    assert "text" not in info["content_hashes"]
    with pytest.raises(
        StoreInputError, match=r"epoch 3 is outside the store's epochs \[0, 3\), epoch 2 being the text"
    ):
        store.read(3, [0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_finds_a_damaged_text_block(tmp_path, backend, capsys):
    path = tmp_path / "s"
    store = full_store(path, backend)
    assert store_cli(["verify", str(path)]) == 0
    assert "OK: 3 planes (2 epochs + text plane) x 1000 records intact" in capsys.readouterr().out
    if backend == "lmdb":  # one flipped byte in the value of block 3 (records [384, 512)) of the text plane
        key = np.array([EPOCHS, 3], dtype=">u4").tobytes()
        with store.backend.env.begin(write=True) as txn:  # the process's one handle on the environment
            value = bytearray(txn.get(key))
            value[10 * store.backend.row_dtype.itemsize] ^= 0x01
            txn.put(key, bytes(value))
    else:  # rewrite the chunk with valid but different data, bypassing the store
        zarr.open_group(str(path), mode="r+")["seed"][EPOCHS, 400] = 12345
    problems = [str(p) for p in open_store(path).verify()]
    assert problems == ["text plane records [384, 512): damaged (checksum mismatch)"]
    assert store_cli(["verify", str(path)]) == 1
    assert "text plane records [384, 512): damaged" in capsys.readouterr().out
    with pytest.raises(StoreError, match=r"text plane records \[384, 512\) fail their checksum"):
        open_store(path).read_text([400])
    np.testing.assert_array_equal(open_store(path).read(1, [400]).seed, record_seeds(7, 1, [400]))


def test_convert_keeps_content_hashes(tmp_path, capsys):
    full_store(tmp_path / "a.zarr")
    assert store_cli(["convert", str(tmp_path / "a.zarr"), str(tmp_path / "b.lmdb")]) == 0
    capsys.readouterr()
    infos = []
    for name in ("a.zarr", "b.lmdb"):
        assert store_cli(["info", str(tmp_path / name), "--json"]) == 0
        infos.append(json.loads(capsys.readouterr().out))
    assert infos[1]["manifest"]["backend"] == "lmdb" and infos[1]["manifest"]["kind"] == "embeddings"
    assert set(infos[0]["content_hashes"]) == {"0", "1", "text"}
    assert infos[1]["content_hashes"] == infos[0]["content_hashes"]
    assert infos[1]["statistics"] == infos[0]["statistics"] and infos[1]["text_complete"] is True
    assert open_store(tmp_path / "b.lmdb").verify() == []


def test_cli_info_on_an_embeddings_store(tmp_path, capsys):
    full_store(tmp_path / "s")
    assert store_cli(["info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert f"kind         embeddings, embed_dim={D}" in out
    assert "classes" not in out
    assert "text plane   complete, 1000 records" in out
    assert "  text plane sha256 " in out and "  epoch    1 sha256 " in out


def test_embeddings_store_of_version_2_resumes(tmp_path):
    """Embeddings are laid out alike in versions 2 and 3: a version-2 store resumes as it is."""
    path = tmp_path / "e2"
    store = create_store(path, emb_manifest())
    write_plane(store, 0)
    data = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(data | {"format_version": 2}))
    resumed = create_store(path, emb_manifest())
    assert resumed.manifest.format_version == 2 and resumed.committed_shards(0) == set(range(8))
    write_plane(resumed, 1)
    assert json.loads((path / "manifest.json").read_text())["format_version"] == 2
    ids = np.array([999, 0, 500])
    np.testing.assert_array_equal(open_store(path).read(1, ids).embedding, unit_vectors(1, ids).astype(np.float16))


def test_manifest_keys_stay_strict(tmp_path):
    data = manifest().to_dict()
    del data["kind"]
    with pytest.raises(StoreInputError, match=r"missing field\(s\) \['kind'\]"):
        Manifest.from_dict(data)
    data = manifest().to_dict() | {"format_version": 4}
    with pytest.raises(StoreInputError, match="format_version 4 is not supported"):
        Manifest.from_dict(data)


def test_text_plane_on_a_logits_store_raises(tmp_path):
    store = create_store(tmp_path / "l", manifest("lmdb"))
    with pytest.raises(StoreInputError, match="is a logits store: it has no text plane"):
        _ = store.text_plane
    with pytest.raises(StoreInputError, match="is a logits store: it has no text plane"):
        store.read_text([0])
    with pytest.raises(StoreInputError, match=r"epoch 2 is outside the store's epochs \[0, 2\)"):
        store.writer(2)
