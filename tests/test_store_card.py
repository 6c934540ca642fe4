"""`distill-store card`: a dataset card whose YAML front matter equals the manifest and values computed here."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import yaml
from store_helpers import NO_TAIL, STEP, manifest, records_for

from logit_store import create_store
from logit_store.cli import main as store_cli

N, C, K, EPOCHS = 300, 10, 4, 2
SECRET = "s3cr3tKEY"
TEACHER = {"spec": "timm:resnet18", "weights_sha256": "cd" * 32, "img_size": 32, "batch_size": 16}
DATASET = {
    "spec": f"wds:s3://AKIA:{SECRET}@bucket/shards",  # an edited manifest may hold credentials: never shown
    "num_samples": N, "num_classes": C, "classes": [f"c{i}" for i in range(C)],
    "fingerprint": "ef" * 32, "fingerprint_mode": "fast", "skipped": [],
}  # fmt: skip
AUGMENTATION = {"recipe": {"hflip": 0.5, "scale": [0.35, 1.0]}}


def packed_rows(m, epoch: int) -> bytes:
    """The packed little-endian rows of an epoch in id order, by docs/STORE_FORMAT.md's table: uint16 value
    codes, uint16 indices, int16 tail code (-32768 for no tail), uint32 seed; no padding."""
    r = records_for(m, epoch, np.arange(N))
    row = np.dtype([("values", "<u2", (K,)), ("indices", "<u2", (K,)), ("tail_lse", "<i2"), ("seed", "<u4")])
    rows = np.zeros(N, row)
    rows["values"] = np.rint(-np.asarray(r.values, np.float64) / STEP)
    rows["indices"] = r.indices
    tail = np.asarray(r.tail_lse, np.float64)
    rows["tail_lse"] = np.where(tail == NO_TAIL, -32768, np.rint(tail / STEP))
    rows["seed"] = r.seed
    return rows.tobytes()


@pytest.fixture
def store(tmp_path):
    """A complete 2-epoch store with labels and KL figures: the statistics' sums have known means."""
    m = manifest(num_samples=N, num_classes=C, k=K, epochs=EPOCHS, teacher=TEACHER, dataset=DATASET,
                 augmentation=dict(AUGMENTATION))  # fmt: skip
    s = create_store(tmp_path / "s.zarr", m)
    kl = np.random.default_rng(0).uniform(0, 0.1, (EPOCHS, N, 3))
    for epoch in range(EPOCHS):
        ids = np.arange(N)
        with s.writer(epoch) as writer:
            writer.write(ids, records_for(m, epoch, ids), labels=ids % C, kl=kl[epoch])
    s.close()
    return tmp_path / "s.zarr", kl


def test_front_matter_is_the_manifest_and_values_computed_here(store, tmp_path, capsys):
    path, kl = store
    assert store_cli(["card", str(path), "-o", str(tmp_path / "README.md")]) == 0
    assert SECRET not in capsys.readouterr().out
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("---\n") and SECRET not in text
    front, body = text[4:].split("\n---\n", 1)
    card = yaml.safe_load(front)
    m = json.loads((path / "manifest.json").read_text())
    assert card["teacher"] == m["teacher"] == TEACHER
    assert card["dataset"]["fingerprint"] == m["dataset"]["fingerprint"] and card["num_samples"] == N
    assert card["dataset"]["spec"] == "wds:s3://***@bucket/shards"
    assert card["augmentation"] == m["augmentation"]
    recipe_text = json.dumps(AUGMENTATION["recipe"], sort_keys=True, separators=(",", ":"))
    assert card["augmentation"]["hash"] == hashlib.sha256(recipe_text.encode()).hexdigest()
    assert (card["k"], card["epochs"], card["num_classes"], card["format_version"]) == (K, EPOCHS, C, 3)
    assert card["classes"] == DATASET["classes"] and card["completed_epochs"] == [0, 1]
    # the content hash of each epoch: sha256 of the packed rows in id order, packed here
    written = manifest(num_samples=N, num_classes=C, k=K, epochs=EPOCHS)
    assert card["content_sha256"] == {
        str(e): hashlib.sha256(packed_rows(written, e)).hexdigest() for e in range(EPOCHS)
    }
    sizes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    assert card["bytes"] == sizes
    # statistics: means over every record of both epochs, from the written records and the KL figures
    r = [records_for(written, e, np.arange(N)) for e in range(EPOCHS)]
    values = np.concatenate([np.asarray(x.values, np.float64) for x in r])
    tail = np.concatenate([np.asarray(x.tail_lse, np.float64) for x in r])
    kept = np.exp(values).sum(1)
    stats = card["statistics"]
    assert stats["records"] == EPOCHS * N
    assert stats["mean_topk_mass"] == pytest.approx((kept / (kept + np.exp(tail))).mean(), rel=1e-6)
    for t, key in enumerate(("mean_kl_full_to_rebuilt", "mean_kl_full_to_rebuilt_t2", "mean_kl_full_to_rebuilt_t4")):
        assert stats[key] == pytest.approx(kl[..., t].mean(), rel=1e-9)
    top1 = np.concatenate([x.indices[:, 0] for x in r])
    assert stats["teacher_top1_agreement"] == pytest.approx((top1 == np.tile(np.arange(N) % C, EPOCHS)).mean())
    assert "## How to read it" in body and "Train from a store in your own loop" in body
    assert "docs/STORE_FORMAT.md" in body


def test_card_printed_without_output_file(store, capsys):
    path, _ = store
    assert store_cli(["card", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("---\n") and yaml.safe_load(out[4:].split("\n---\n", 1)[0])["k"] == K


def test_card_of_a_missing_store_is_one_line(tmp_path, capsys):
    assert store_cli(["card", str(tmp_path / "typo.zarr")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'typo.zarr'} does not exist" in err
