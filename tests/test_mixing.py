"""Mixup/CutMix within the batch: pairs per epoch, pair-aware batches, views made once, the save's records."""

from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from train_helpers import base_recipe, small_digits

from distill.augment import PAIRING, PRESETS, Augmentation, pair_partners
from distill.data import create_dataset
from distill.errors import RecipeError
from distill.loader import ReplayDataset, TrainBatchSampler, collate, replay_loader, with_partners
from distill.losses import mixed_targets
from distill.plan import make_plan, store_difference
from distill.recipe import parse_recipe
from distill.save import run as save_run
from distill.save_config import SaveConfig
from distill.views import ReplayAugment, mix_batch
from logit_store import open_store
from logit_store.sparse import sparsify
from teachers import create_teacher

FULL = Augmentation(
    auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, re_prob=0.5, mixup_alpha=0.8, cutmix_alpha=1.0
)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixing")
    return {"root": root, **small_digits(root)}  # 160 train images (16 per class), 60 val


@pytest.fixture(scope="module")
def data(small):
    return ReplayDataset(create_dataset(small["train"], "train"), ReplayAugment(FULL, 16, global_seed=5))


def test_pairs_are_a_function_of_seed_and_epoch():
    for n in (2, 7, 160, 1001):
        partner = pair_partners(3, 1, n)
        assert np.array_equal(partner[partner], np.arange(n))  # a's partner is b, b's is a
        alone = np.flatnonzero(partner == np.arange(n))
        assert len(alone) == n % 2  # an odd count leaves exactly one unmixed
        assert np.array_equal(partner, pair_partners(3, 1, n).copy())
    assert not np.array_equal(pair_partners(3, 1, 160), pair_partners(3, 2, 160))
    assert not np.array_equal(pair_partners(3, 1, 160), pair_partners(4, 1, 160))


def mixed_by_id(data, batches) -> tuple[dict, dict, int]:
    """Per id: the mixed view and the mixed target of the batches, as training makes them; and the extra views."""
    views, targets, extras = {}, {}, 0
    for batch_ids in batches:
        batch = collate([data[i] for i in with_partners(batch_ids, data.partners)])
        extras += len(batch["image"]) - len(batch["id"])
        batch = mix_batch(batch)
        for i, x, t in zip(batch["id"].tolist(), batch["image"], mixed_targets(batch, 10), strict=True):
            assert i not in views
            views[i], targets[i] = x, t
    return views, targets, extras


@pytest.mark.parametrize("batch_size", [2, 6, 64])
def test_pair_aware_batches_give_the_same_views_and_targets_for_any_batch_size_and_process_count(data, batch_size):
    n = len(data)
    ids = np.delete(np.arange(n), 17)  # one id without its partner: paired with no one, in the last batch
    reference, seen = {}, {}
    for world in (1, 2):
        samplers = [
            TrainBatchSampler(ids, batch_size, 0, 1, seed=9, rank=r, world=world, partners=data.partners)
            for r in range(world)
        ]
        per_rank = [list(s) for s in samplers]
        # optimizer step s on one process = rank 0's then rank 1's micro-batch on two
        if world == 2:
            assert [a + b for a, b in zip(*per_rank, strict=True)] == seen[1]
        else:
            seen[1] = per_rank[0]
        views, targets, extras = {}, {}, 0
        for batches in per_rank:
            v, t, e = mixed_by_id(data, batches)
            views |= v
            targets |= t
            extras += e
        micro = batch_size // world
        # whole pairs in an even micro-batch; an odd one (6 over 2 processes) splits one pair per micro-batch
        assert extras <= (0 if micro % 2 == 0 else len(views) // micro)
        assert len(views) == n - 1 - (n - 1) % batch_size
        for i, x in views.items():
            if i not in reference:
                reference[i] = data.batch([(1, i)])  # the sample alone (its partner's view only mixed in)
            ref = reference[i]
            assert torch.equal(x, ref["image"][0]), (batch_size, world, i)
            assert torch.equal(targets[i], mixed_targets(ref, 10)[0])
    assert any(float(r["lam"][0]) < 1 for r in reference.values())
    assert any(r["lam"][0] < 1 and r["partner"][0] != r["id"][0] for r in reference.values())


def test_odd_batches_are_refused_when_views_mix(small, tmp_path):
    with pytest.raises(ValueError, match="batch_size 7 is odd"):
        TrainBatchSampler(160, 7, 0, 0, seed=0, partners=lambda e: pair_partners(0, e, 160))
    TrainBatchSampler(160, 7, 0, 0, seed=0, partners=lambda e: None)  # no mixing: any batch size
    recipe = parse_recipe(base_recipe(small, tmp_path / "run", augmentation="tinyvit-mix", batch_size=7))
    with pytest.raises(RecipeError, match=r"^batch_size: 7 is odd, but the augmentation mixes views in pairs"):
        make_plan(recipe, 1, torch.device("cpu"), build_student=False)


def test_one_loader_serves_every_epoch_with_persistent_workers(data):
    sampler = TrainBatchSampler(len(data), 32, 0, 0, seed=1, partners=data.partners)
    loader = replay_loader(data, sampler, workers=2, persistent=True)
    assert loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()
    iterators = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch, epoch, start_step=1 if epoch else 0)
        got = {}
        for batch in loader:
            assert len(batch["image"]) == len(batch["id"]) == 32  # pairs whole: no extra view
            batch = mix_batch(batch)
            got |= dict(zip(batch["id"].tolist(), batch["image"], strict=True))
            assert set(batch["epoch"].tolist()) == {epoch}
        iterators.append(loader._iterator)
        expect = [i for b in list(sampler) for _, i in b]
        assert sorted(got) == sorted(expect) and len(got) == (5 - epoch) * 32
        for i in expect[:8]:
            assert torch.equal(got[i], data.batch([(epoch, i)])["image"][0])
    assert iterators[0] is iterators[1]  # the same worker processes


def test_collate_names_a_missing_partner(data):
    partner = int(data.partners(0)[3])
    with pytest.raises(ValueError, match=rf"partners \[{partner}\] are not in the batch"):
        collate([data[(0, 3)]])


def test_a_mixing_augmentation_names_its_pairing_and_old_stores_are_refused_by_it():
    entry = PRESETS["tinyvit-mix"].manifest_entry()
    assert entry["recipe"]["pairing"] == PAIRING
    assert "pairing" not in PRESETS["tinyvit"].canonical()  # augmentations without mixing keep their hash
    before = {k: v for k, v in entry["recipe"].items() if k != "pairing"}  # a store saved before the pairs
    message = store_difference("augmentation.hash", SimpleNamespace(augmentation={"recipe": before}), None, entry)
    assert f"pairing: store None, recipe {PAIRING!r}" in message and "save it again" in message


def test_stored_record_is_the_live_teacher_on_the_students_mixed_view(small, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_vit", num_classes=10).state_dict(), str(ckpt))
    aug = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "interpolation": "bilinear", "re_prob": 0.3}
    cfg = SaveConfig(teacher="timm:test_vit", data=small["train"], out=str(tmp_path / "store.zarr"), epochs=2, k=4,
                     checkpoint=str(ckpt), aug=aug, img_size=32, batch_size=16, seed=2)  # fmt: skip
    store = save_run(cfg)
    assert store.manifest.mixing and store.manifest.augmentation["recipe"]["pairing"] == PAIRING
    teacher = create_teacher("timm:test_vit", 10, str(ckpt))
    dataset = create_dataset(small["train"], "train")
    data = ReplayDataset(dataset, ReplayAugment(Augmentation.from_dict(aug), 32, 2))
    # a student's micro-batch: batch 6 over 2 processes, rank 1 (its odd micro-batches split a pair)
    sampler = TrainBatchSampler(len(dataset), 6, 1, 1, seed=0, rank=1, world=2, partners=data.partners)
    for batch_ids in list(sampler)[:4]:
        batch = mix_batch(collate([data[i] for i in with_partners(batch_ids, data.partners)]))
        ids = batch["id"].numpy()
        stored = store.read(1, ids)
        assert np.array_equal(stored.partner, batch["partner"].numpy())
        assert np.array_equal(stored.lam, batch["lam"].numpy())
        with torch.no_grad():
            live = sparsify(teacher.logits(batch["image"], 1, batch["id"]), 4)
        assert np.array_equal(live.indices.numpy(), stored.indices.astype(np.int64))
        top = live.values.float().numpy()
        np.testing.assert_allclose(top - top[:, :1], stored.values - stored.values[:, :1], atol=2e-3)
    assert (store.read(1, np.arange(len(dataset))).lam < 1).any()
    assert open_store(cfg.out).manifest.num_samples == 160


def test_mix_batch_blends_pastes_and_leaves_unmixed_rows():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 8, 8, generator=g)  # rows 0-2 the batch, row 3 a partner's view only mixed in
    batch = {
        "image": images.clone(),  # (mixed in place)
        "id": torch.tensor([10, 11, 12]),
        "lam": torch.tensor([0.3, 0.75, 1.0]),
        "partner_row": torch.tensor([1, 3, 2]),
        "cutmix": torch.tensor([False, True, False]),
        "box": torch.tensor([[0, 0, 0, 0], [2, 4, 1, 5], [0, 0, 0, 0]]),
    }
    out = mix_batch(batch)
    assert set(out) == {"image", "id", "lam"} and out["image"].shape == (3, 3, 8, 8)
    assert torch.equal(out["image"][0], images[0] * torch.tensor(0.3) + images[1] * (1 - torch.tensor(0.3)))
    pasted = images[1].clone()
    pasted[:, 2:4, 1:5] = images[3][:, 2:4, 1:5]
    assert torch.equal(out["image"][1], pasted) and torch.equal(out["image"][2], images[2])
    assert mix_batch(out) is out  # nothing left to mix
    # in place, rows that read each other: a Mixup pair, a CutMix pair, a Mixup row reading a CutMix row
    for cut, order in (([False, False], [0, 1]), ([True, True], [0, 1]), ([False, True], [0, 1]),
                       ([True, False], [1, 0])):  # fmt: skip
        views = torch.randn(2, 3, 8, 8, generator=g)
        lam = torch.tensor([0.4, 0.9])
        box = torch.tensor([[1, 6, 2, 7], [0, 3, 3, 8]])
        expect = [None, None]
        for i in (0, 1):
            if cut[i]:
                expect[i] = views[i].clone()
                y0, y1, x0, x1 = box[i].tolist()
                expect[i][:, y0:y1, x0:x1] = views[1 - i][:, y0:y1, x0:x1]
            else:
                expect[i] = views[i] * lam[i] + views[1 - i] * (1 - lam[i])
        rows = torch.tensor(order)
        got = mix_batch({"image": views[rows].clone(), "id": rows, "lam": lam[rows], "partner_row": torch.tensor([1, 0]),
                         "cutmix": torch.tensor(cut)[rows], "box": box[rows]})["image"]  # fmt: skip
        for r, i in enumerate(order):
            assert torch.equal(got[r], expect[i]), (cut, order, i)


def test_a_mixing_run_builds_its_loader_once_with_persistent_workers(small, tmp_path, monkeypatch):
    import distill.trainer as trainer_module
    from distill.trainer import Trainer

    built = []

    def counting_loader(*args, **kwargs):
        built.append(trainer_module.replay_loader.__wrapped__(*args, **kwargs))
        return built[-1]

    counting_loader.__wrapped__ = trainer_module.replay_loader
    monkeypatch.setattr(trainer_module, "replay_loader", counting_loader)
    raw = base_recipe(small, tmp_path / "run", augmentation="tinyvit-mix", batch_size=16, epochs=2,
                      data__img_size=16, data__workers=2, eval__every=2)  # fmt: skip
    trainer = Trainer(make_plan(parse_recipe(raw), 1, torch.device("cpu")))
    seen = []
    step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda batch: seen.append(batch["epoch"][0].item()) or step(batch))
    summary = trainer.fit()
    assert len(built) == 1 and built[0].persistent_workers and built[0].num_workers == 2
    assert seen == [0] * 10 + [1] * 10 and summary["steps"] == 20


@pytest.mark.slow
def test_two_processes_train_like_one_with_mixing(small, tmp_path):
    """Mixed views too: batch 6 over 2 processes (micro-batches of 3 split a pair: its partner's view is added)."""
    from safetensors.torch import load_file
    from test_train import max_difference, two_process_weights
    from train_helpers import run_cli, write_recipe

    changes = {"epochs": 1, "batch_size": 6, "augmentation": "tinyvit-mix", "data__img_size": 16}
    one = write_recipe(tmp_path / "one.yaml", base_recipe(small, tmp_path / "one", **changes))
    assert run_cli("distill-train", [str(one)], small["root"]).returncode == 0
    two = two_process_weights(small, tmp_path / "two", **changes)
    # every step's loss agrees to float rounding (the same mixed views and targets); over 26 Adam steps that
    # rounding moves the weights by up to ~3e-4 (the 5-step test without mixing in test_train holds 1e-4)
    losses = [
        [
            float(r.split(",")[2])
            for r in (tmp_path / run / "metrics.csv").read_text().splitlines()
            if ",train/loss," in r
        ]
        for run in ("one", "two")
    ]
    assert len(losses[0]) == len(losses[1]) == 26
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert max_difference(load_file(str(tmp_path / "one" / "model.safetensors")), two) < 1e-3
