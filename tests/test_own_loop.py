"""Training from a store in your own loop (`distill.offline.StoreDataset`): the README's loop as pasted, whose
targets are the live teacher's on the same views; processes' parts; workers; cycled epochs; mixed stores as
distill-train mixes them; bad input as one line; the timm example."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from test_readme import OWN_LOOP
from train_helpers import ROOT, small_digits

from distill.augment import Augmentation
from distill.data import create_dataset
from distill.errors import DatasetError, RecipeError
from distill.loader import ReplayDataset, TrainBatchSampler, replay_loader
from distill.offline import StoreDataset
from distill.save import run as save_run
from distill.save_config import SaveConfig
from distill.views import ReplayAugment, mix_batch
from logit_store import NotCommittedError, open_store
from logit_store.errors import DistillError, StoreInputError
from logit_store.manifest import recipe_hash
from teachers import create_teacher

MIX = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "interpolation": "bilinear", "scale": [0.5, 1.0]}


def save_store(folder, data: str, out: str, aug: str | dict, epochs: int, seed: int = 3) -> str:
    """A store of a random test_vit teacher (its weights in folder/teacher.safetensors) keeping every class."""
    ckpt = folder / "teacher.safetensors"
    if not ckpt.exists():
        torch.manual_seed(0)
        save_file(timm.create_model("test_vit", num_classes=10).state_dict(), str(ckpt))
    cfg = SaveConfig(teacher="timm:test_vit", data=data, out=out, epochs=epochs, k=10, checkpoint=str(ckpt),
                     aug=aug, img_size=32, batch_size=32, seed=seed)  # fmt: skip
    save_run(cfg).close()
    return out


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    """The walkthrough's names in a folder: my_images/{train,val} (160 training digits) and runs/my_teacher.zarr
    (1 epoch, basic views at 32 px, k = 10 classes); also a 2-epoch store of mixed views."""
    folder = tmp_path_factory.mktemp("own_loop")
    small = small_digits(folder)
    os.symlink(os.path.dirname(small["train"]), folder / "my_images")
    save_store(folder, str(folder / "my_images" / "train"), str(folder / "runs" / "my_teacher.zarr"), "basic", 1)
    save_store(folder, small["train"], str(folder / "mixed.zarr"), MIX, 2)
    return folder


@pytest.fixture(scope="module")
def teacher(walk):
    return create_teacher("timm:test_vit", 10, str(walk / "teacher.safetensors"))


@pytest.fixture
def in_walk(walk, monkeypatch):
    monkeypatch.chdir(walk)
    return walk


def live_log_probs(teacher, images: torch.Tensor, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        return (teacher.logits(images) / temperature).log_softmax(dim=1)


def test_the_readme_loop_runs_as_pasted_and_its_targets_are_the_live_teachers(in_walk, teacher, monkeypatch):
    seen = []
    log_targets = StoreDataset.log_targets

    def recording(self, batch, temperature=1.0):
        out = log_targets(self, batch, temperature)
        seen.append((batch["image"].clone(), batch["id"].clone(), batch["epoch"].clone(), temperature, out.detach()))
        return out

    monkeypatch.setattr(StoreDataset, "log_targets", recording)
    assert len(OWN_LOOP) == 1
    exec(compile(OWN_LOOP[0], "README.md", "exec"), {"__name__": "__main__"})
    assert (in_walk / "my_own_student.pt").exists()
    assert len(seen) == 2 * 3  # 2 epochs of 160 samples in batches of 64
    ids_per_epoch = [torch.cat([ids for _, ids, *_ in seen[e * 3 : e * 3 + 3]]) for e in (0, 1)]
    for ids in ids_per_epoch:  # every sample once per epoch, shuffled per epoch
        assert sorted(ids.tolist()) == list(range(160))
    assert not torch.equal(ids_per_epoch[0], ids_per_epoch[1])
    for images, _, epoch, temperature, got in seen:
        assert set(epoch.tolist()) == {0}  # the store holds one epoch: training epoch 1 replays it
        want = live_log_probs(teacher, images, temperature).exp()
        relative = ((got.exp() - want).abs() / want).max().item()
        assert relative < 5e-4, relative  # k = classes: every probability kept, at the store's precision


def test_processes_take_disjoint_parts_that_cover_the_epoch(walk, monkeypatch):
    parts = []
    for rank in range(3):
        data = StoreDataset(walk / "my_images" / "train", walk / "runs" / "my_teacher.zarr", rank=rank, world_size=3)
        parts.append([b["id"].tolist() for b in data.loader(2, batch_size=16)])
        assert all(len(b) <= 16 for b in parts[-1])
    ids = [i for part in parts for batch in part for i in batch]
    assert sorted(ids) == list(range(160))  # disjoint and covering
    assert sorted(sum(map(len, part)) for part in parts) == [53, 53, 54]
    whole = StoreDataset(walk / "my_images" / "train", walk / "runs" / "my_teacher.zarr")
    assert [i for b in whole.loader(2, batch_size=16) for i in b["id"].tolist()] == ids  # the epoch's one order
    # drop_last: every process the same number of full batches (what DDP needs)
    for rank in range(3):
        data = StoreDataset(walk / "my_images" / "train", walk / "runs" / "my_teacher.zarr", rank=rank, world_size=3)
        assert [len(b["id"]) for b in data.loader(0, batch_size=16, drop_last=True)] == [16, 16, 16]
    # rank and world size from torch.distributed when it is initialised
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    data = StoreDataset(walk / "my_images" / "train", walk / "runs" / "my_teacher.zarr")
    assert [b["id"].tolist() for b in data.loader(2, batch_size=16)] == parts[1]


def test_workers_give_the_same_batches(walk):
    data = StoreDataset(str(walk / "small" / "train"), str(walk / "mixed.zarr"))
    alone = list(data.loader(1, batch_size=24, num_workers=0))
    workers = list(data.loader(1, batch_size=24, num_workers=2))
    assert len(alone) == len(workers) == 7
    for a, b in zip(alone, workers, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_epochs_beyond_the_store_cycle_through_its_epochs(walk):
    data = StoreDataset(str(walk / "small" / "train"), str(walk / "mixed.zarr"))
    assert [data.view_epoch(e) for e in range(5)] == [0, 1, 0, 1, 0]
    third, first = list(data.loader(3, 40, shuffle=False)), list(data.loader(1, 40, shuffle=False))
    for a, b in zip(third, first, strict=True):
        assert a["epoch"].tolist() == [1] * len(a["id"])
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["id"], b["id"])
    # the targets are the store's epoch 1: its kept logits (all 10) softmaxed at T, written out
    records = open_store(walk / "mixed.zarr").read(1, third[0]["id"].numpy())
    logits = np.full((len(records.values), 10), -np.inf)
    np.put_along_axis(logits, records.indices.astype(np.int64), records.values, axis=1)
    z = logits / 2.0 - (logits / 2.0).max(axis=1, keepdims=True)
    want = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(data.targets(third[0], temperature=2.0).numpy(), want, rtol=1e-5, atol=1e-7)


def test_a_mixed_store_gives_the_views_distill_train_mixes(walk, teacher):
    data = StoreDataset(str(walk / "small" / "train"), str(walk / "mixed.zarr"))
    dataset = create_dataset(str(walk / "small" / "train"))
    views = ReplayDataset(dataset, ReplayAugment(Augmentation.from_dict(MIX), 32, 3))  # the store's seed
    sampler = TrainBatchSampler(len(dataset), 32, epoch=1, view_epoch=1, seed=3, partners=views.partners)
    trained = [mix_batch(b) for b in replay_loader(views, sampler, workers=0)]
    ours = list(data.loader(1, batch_size=32))[: len(trained)]
    assert len(trained) == 5
    for a, b in zip(ours, trained, strict=True):
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["lam"], b["lam"])
        assert torch.equal(a["image"], b["image"])
    lam = torch.cat([b["lam"] for b in ours])
    assert (lam < 1).sum() > 40  # mixed indeed
    got, want = data.targets(ours[0], 4.0), live_log_probs(teacher, ours[0]["image"], 4.0).exp()
    assert ((got - want).abs() / want).max() < 5e-4


def one_line(err: pytest.ExceptionInfo, *words: str) -> str:
    message = str(err.value)
    assert isinstance(err.value, DistillError) and "\n" not in message, message
    assert all(w in message for w in words), message
    return message


def test_bad_input_is_one_line(walk, tmp_path):
    store = str(walk / "mixed.zarr")
    with pytest.raises(DatasetError) as err:  # another folder: fewer samples
        StoreDataset(str(walk / "small" / "val"), store)
    one_line(err, "small/val", "dataset.fingerprint", "num_samples: store 160")
    data = StoreDataset(str(walk / "small" / "train"), store)
    with pytest.raises(StoreInputError) as err:
        data.loader(-1, 8)
    one_line(err, "epoch -1")
    with pytest.raises(StoreInputError) as err:
        data.batch(0, [3, 160])
    one_line(err, "[0, 160)")
    batch = data.batch(0, [3, 4])
    batch["id"] = torch.tensor([3, 999])
    with pytest.raises(StoreInputError) as err:
        data.targets(batch)
    one_line(err, "999", "160")
    with pytest.raises(StoreInputError) as err:
        StoreDataset(str(walk / "small" / "train"), store, rank=3, world_size=3)
    one_line(err, "rank 3 of world_size 3")
    # a store whose views this toolkit would not make: its mixing paired samples by another rule
    entry = open_store(store).manifest.augmentation
    before = {"recipe": {k: v for k, v in entry["recipe"].items() if k != "pairing"}}
    with pytest.raises(RecipeError) as err:
        Augmentation.from_manifest(before | {"hash": recipe_hash(before["recipe"])}, "store S")
    one_line(err, "store S", "not one this toolkit replays")
    assert Augmentation.from_manifest(entry, "store S") == Augmentation.from_dict(MIX)
    # a store still being written: its epoch 1 has no commit yet
    shutil.copytree(walk / "mixed.zarr", tmp_path / "partial.zarr")
    (tmp_path / "partial.zarr" / "commits" / "e00001-s000000.json").unlink()
    partial = StoreDataset(str(walk / "small" / "train"), str(tmp_path / "partial.zarr"))
    assert len(list(partial.loader(0, 64))) == 3
    with pytest.raises(NotCommittedError) as err:
        partial.loader(3, 64)
    one_line(err, "epoch 1 is not committed", "records [0, 64) of [0, 160)")


def test_the_timm_example_learns_from_the_store(walk, tmp_path, capsys):
    script = ROOT / "tools" / "timm_from_store.py"
    helped = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--store" in helped.stdout
    spec = importlib.util.spec_from_file_location("timm_from_store", script)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = ["--data", str(walk / "my_images" / "train"), "--store", str(walk / "runs" / "my_teacher.zarr"),
            "--val", str(walk / "my_images" / "val"), "--model", "test_vit", "--epochs", "4", "--batch-size", "32",
            "--lr", "0.003", "--out", str(tmp_path / "student.safetensors")]  # fmt: skip
    assert tool.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"] > 20, result  # 10 classes: chance is 10
    assert (tmp_path / "student.safetensors").exists()
    assert tool.main(["--data", str(walk / "my_images" / "val"), *args[2:4]]) == 2  # not the store's images
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_the_api_imports_no_method_and_no_trainer():
    code = "import sys, distill.offline; print(sorted(m for m in sys.modules if m.split('.')[0] == 'recipes' or m in ('distill.trainer', 'distill.plan')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]
