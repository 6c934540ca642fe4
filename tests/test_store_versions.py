"""Stores of older format versions: read as they were, refused for writing with a message that
names their version and the command that converts them, and converted (`--upgrade`) to resume."""

import json

import numpy as np
import pytest
import torch
from store_helpers import EPOCHS, N, legacy_records, manifest, stored_form, write_epoch, write_legacy_store

from logit_store import FORMAT_VERSION, StoreError, convert_store, create_store, open_store
from logit_store.cli import main as store_cli
from logit_store.sparse import rebuild_probs


@pytest.mark.parametrize("version", [1, 2])
def test_old_stores_are_read_as_they_were(tmp_path, version):
    m = write_legacy_store(tmp_path / "old", version, epochs=[0, 1])
    store = open_store(tmp_path / "old")
    assert store.manifest.format_version == version and store.manifest.kind == "logits"
    assert store.manifest.dtypes["values"] == store.manifest.dtypes["tail_lse"] == "float16"
    ids = np.array([2999, 0, 1234, 7])
    got, want = store.read(1, ids), legacy_records(m, 1, ids)
    for name in ("values", "indices", "tail_lse", "seed"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert got.values.dtype == np.float16
    # The rebuild takes them as it always did: kept probabilities of the float16 logits.
    sparse = (torch.from_numpy(got.values), torch.from_numpy(got.indices.astype(np.int64)))
    probs = rebuild_probs(*sparse, torch.from_numpy(got.tail_lse), m.num_classes)
    v, tail = want.values.astype(np.float64), want.tail_lse.astype(np.float64)
    kept = np.exp(v) / (np.exp(v).sum(axis=1) + np.exp(tail))[:, None]
    np.testing.assert_allclose(probs.gather(1, sparse[1]), kept, rtol=1e-5)
    assert store.verify() == []
    info = store.info()
    assert info["completed_epochs"] == [0, 1] and info["statistics"]["mean_kl_full_to_rebuilt_t2"] is None


@pytest.mark.parametrize("version", [1, 2])
def test_writing_into_an_old_store_names_its_version_and_the_command(tmp_path, version):
    write_legacy_store(tmp_path / "old", version, epochs=[0])
    command = rf"distill-store convert {tmp_path / 'old'} NEW_STORE --upgrade"
    message = rf"format-version-{version} logits store: .* writes version {FORMAT_VERSION} only.*{command}"
    with pytest.raises(StoreError, match=message):
        create_store(tmp_path / "old", manifest())  # a save resuming it
    with pytest.raises(StoreError, match=message):
        open_store(tmp_path / "old").writer(1)
    assert open_store(tmp_path / "old").committed_shards(1) == set()


def test_plain_convert_keeps_the_version_and_every_byte(tmp_path):
    write_legacy_store(tmp_path / "old", 1, epochs=[0, 1])
    old = open_store(tmp_path / "old")
    copy = convert_store(old, tmp_path / "old.lmdb", "lmdb")
    assert copy.manifest.format_version == 1
    assert copy.info()["content_hashes"] == old.info()["content_hashes"]
    assert "kind" not in json.loads((tmp_path / "old.lmdb" / "manifest.json").read_text())


def test_upgrade_converts_then_resumes(tmp_path, capsys):
    m = write_legacy_store(tmp_path / "old", 2, epochs=[0])
    assert store_cli(["convert", str(tmp_path / "old"), str(tmp_path / "new"), "--upgrade"]) == 0
    assert "(zarr) -> " in capsys.readouterr().out
    new = open_store(tmp_path / "new")
    assert new.manifest.format_version == FORMAT_VERSION and new.manifest.backend == "zarr"
    ids = np.arange(0, N, 3)
    got, want = new.read(0, ids), stored_form(legacy_records(m, 0, ids))  # float16 logits, re-coded
    for name in ("values", "indices", "tail_lse", "seed"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    resumed = create_store(tmp_path / "new", manifest())  # the save, resumed on the upgraded copy
    assert resumed.committed_shards(0) == set(range(m.num_shards))
    write_epoch(resumed, 1)
    assert open_store(tmp_path / "new").verify() == []
    assert open_store(tmp_path / "new").info()["completed_epochs"] == list(range(EPOCHS))
