"""Replayable augmentation: a view depends on (augmentation, global seed, epoch, id) only."""

import hashlib
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from distill.augment import PRESETS, Augmentation, draw_mix, draw_view, load_augmentation, pair_partners
from distill.data import create_dataset
from distill.errors import RecipeError
from distill.loader import ReplayDataset, ShardBatchSampler, collate, replay_loader
from distill.losses import mixed_targets
from distill.views import ReplayAugment, mix_batch

FULL = Augmentation(
    auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, re_prob=0.5, mixup_alpha=0.8, cutmix_alpha=1.0
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return create_dataset("digits", split="train", cache_dir=str(tmp_path_factory.mktemp("cache")))


def views_by_loader(
    data: ReplayDataset, epoch: int, ids: list[int], batch_size: int, workers: int
) -> dict[int, torch.Tensor]:
    sampler = [[(epoch, i) for i in ids[s : s + batch_size]] for s in range(0, len(ids), batch_size)]
    out = {}
    for batch in replay_loader(data, sampler, workers):
        for i, x in zip(batch["id"].tolist(), mix_batch(batch)["image"], strict=True):
            out[i] = x
    return out


def test_view_independent_of_workers_and_batch_size(digits):
    data = ReplayDataset(digits, ReplayAugment(FULL, 24, global_seed=3))
    ids = np.random.default_rng(0).permutation(len(digits))[:40].tolist()
    reference = views_by_loader(data, 2, ids, 1, 0)
    for batch_size, workers in [(7, 0), (32, 1), (7, 2), (1, 2), (32, 2)]:
        got = views_by_loader(data, 2, list(reversed(ids)), batch_size, workers)
        for i in ids:
            assert torch.equal(got[i], reference[i]), (batch_size, workers, i)
    other_epoch = views_by_loader(data, 3, ids, 32, 0)
    assert not all(torch.equal(other_epoch[i], reference[i]) for i in ids)


def test_crop_boxes_agree_across_resolutions():
    # A source image whose pixels encode their own coordinates.
    yy, xx = np.mgrid[0:90, 0:120]
    src = Image.fromarray(np.stack([xx * 2, yy * 2, np.zeros_like(xx)], axis=-1).astype(np.uint8))
    augmentation = Augmentation(interpolation="bilinear", mean=(0, 0, 0), std=(1, 1, 1))
    for seed in range(20):
        params = draw_view(augmentation, seed, *src.size)
        small = ReplayAugment(augmentation, 32).view(src, params)
        large = ReplayAugment(augmentation, 64).view(src, params)
        down = torch.nn.functional.avg_pool2d(large[None], 2)[0]
        # Same source region at both sizes: the coordinate maps agree to within a pixel.
        assert (small - down).abs().mean() * 255 / 2 < 1.0, seed
        left, top, w, h = params.crop
        assert left >= 0 and left + w <= 1 + 1e-9 and top >= 0 and top + h <= 1 + 1e-9
        area = w * h
        assert augmentation.scale[0] - 1e-9 <= area <= augmentation.scale[1] + 1e-9


def test_mixing_is_per_sample_and_replayable(digits):
    data = ReplayDataset(digits, ReplayAugment(FULL, 16, global_seed=1))
    a = [data.batch([(0, i)]) for i in range(30)]
    b = [data.batch([(0, i)]) for i in reversed(range(30))][::-1]
    for x, y in zip(a, b, strict=True):
        assert x["partner"] == y["partner"] and x["lam"] == y["lam"]
        assert torch.equal(x["image"], y["image"])
    mixed = [x for x in a if x["partner"] != x["id"]]
    assert mixed and all(0.0 <= x["lam"] <= 1.0 for x in mixed)
    for x in a:
        t = mixed_targets(x, 10)[0]
        label, partner_label, lam = int(x["label"]), int(x["partner_label"]), float(x["lam"])
        assert abs(float(t[label]) - (lam if label != partner_label else 1.0)) < 1e-6
        torch.testing.assert_close(t.sum(), torch.tensor(1.0))
        assert partner_label == int(digits.labels[int(x["partner"])])
    # Mixup rebuilds from the two unmixed views, the partner's as it is in its own batch.
    augmentation = Augmentation(mixup_alpha=0.8, interpolation="bilinear")
    aug = ReplayAugment(augmentation, 16)
    partner = int(pair_partners(0, 0, len(digits))[5])
    mix = draw_mix(augmentation, aug.seed(0, 5), 5, partner)
    assert mix.box is None and mix.partner == partner != 5
    x = ReplayDataset(digits, aug).batch([(0, 5)])["image"][0]
    plain = ReplayAugment(Augmentation(interpolation="bilinear"), 16)
    own = plain.view(digits.load(5), draw_view(augmentation, aug.seed(0, 5), *digits.load(5).size))
    other = plain.view(digits.load(partner), draw_view(augmentation, aug.seed(0, partner), *digits.load(partner).size))
    torch.testing.assert_close(x, mix.lam * own + (1 - mix.lam) * other)
    assert torch.equal(other, aug(digits.load, partner, 0, len(digits))[0])  # views are made unmixed


def test_cutmix_lambda_matches_box():
    augmentation = Augmentation(cutmix_alpha=1.0)
    for seed in range(50):
        mix = draw_mix(augmentation, seed, 0, 1)
        assert mix.box is not None
        assert abs(mix.lam - (1 - mix.box[2] * mix.box[3])) < 1e-12
    assert draw_mix(augmentation, 0, 3, 3).lam == 1.0  # an id that is its own partner is not mixed


def test_rand_augment_leaves_global_rngs_alone():
    img = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    aug = ReplayAugment(Augmentation(auto_augment="rand-m9-mstd0.5-inc1"), 32)
    random.seed(123)
    np.random.seed(123)
    before = (random.random(), np.random.random())
    random.seed(123)
    np.random.seed(123)
    params = draw_view(aug.augmentation, 7, 40, 40)
    first = aug.view(img, params)
    assert (random.random(), np.random.random()) == before
    assert torch.equal(first, aug.view(img, params))
    assert not torch.equal(first, aug.view(img, draw_view(aug.augmentation, 8, 40, 40)))


def test_augmentation_canonical_form_and_hash(tmp_path):
    # the hash is sha256 of the canonical form as sorted, unspaced JSON (computed here independently)
    text = json.dumps(Augmentation().canonical(), sort_keys=True, separators=(",", ":"))
    assert Augmentation().hash() == hashlib.sha256(text.encode()).hexdigest()
    assert Augmentation(hflip=0.4).hash() != Augmentation().hash()
    assert Augmentation(hflip=1, scale=[1, 1]).hash() == Augmentation(hflip=1.0, scale=(1.0, 1.0)).hash()
    assert "img_size" not in Augmentation().canonical()
    path = tmp_path / "aug.yaml"
    path.write_text("auto_augment: rand-m9-mstd0.5-inc1\nre_prob: 0.25\ninterpolation: bicubic\n")
    assert load_augmentation(str(path)).hash() == PRESETS["tinyvit"].hash()
    path.write_text("flip: 0.5\n")
    with pytest.raises(RecipeError, match=r"aug\.yaml: flip: unknown key"):
        load_augmentation(str(path))
    with pytest.raises(RecipeError, match="neither a preset"):
        load_augmentation("no-such-preset")
    with pytest.raises(RecipeError, match=r"hflip: expected a probability in \[0, 1\], got 2\.0"):
        Augmentation(hflip=2.0)
    with pytest.raises(RecipeError, match=r"scale: expected a list of 2 \(a number, a number\)"):
        load_augmentation({"scale": [0.5]})
    with pytest.raises(RecipeError, match="auto_augment: expected a timm RandAugment string"):
        load_augmentation({"auto_augment": "rand-m9-everything"})


def test_tinyvit_presets_resample_bicubic_in_the_crop_and_rand_augment():
    # The TinyViT reference: DATA.INTERPOLATION bicubic for RandomResizedCrop and for RandAugment's ops.
    for name in ("tinyvit", "tinyvit-mix"):
        augmentation = PRESETS[name]
        assert augmentation.interpolation == "bicubic" and augmentation.auto_augment == "rand-m9-mstd0.5-inc1"
        assert all(draw_view(augmentation, seed, 40, 30).interpolation == "bicubic" for seed in range(20))
        ops = ReplayAugment(augmentation, 32).rand_augment.ops
        assert ops and all(op.kwargs["resample"] == Image.Resampling.BICUBIC for op in ops)
    # interpolation: random stays an option: per view for the crop, per op (timm's own choice) for RandAugment.
    random_aug = Augmentation(auto_augment="rand-m9-mstd0.5-inc1")
    assert {draw_view(random_aug, seed, 40, 30).interpolation for seed in range(20)} == {"bilinear", "bicubic"}
    ops = ReplayAugment(random_aug, 32).rand_augment.ops
    assert all(set(op.kwargs["resample"]) == {Image.Resampling.BILINEAR, Image.Resampling.BICUBIC} for op in ops)


def test_rand_augment_interpolation_enters_the_hash_only_where_views_changed():
    # RandAugment used to resample at random whatever `interpolation` said: augmentations whose views change with
    # the fix hash differently (their old stores are refused); the others keep the hash they had.
    fixed = Augmentation(auto_augment="rand-m9-mstd0.5-inc1", interpolation="bilinear")
    assert fixed.canonical()["rand_augment_interpolation"] == "bilinear"
    for unchanged in (Augmentation(auto_augment="rand-m9-mstd0.5-inc1"), PRESETS["basic"], PRESETS["none"]):
        assert "rand_augment_interpolation" not in unchanged.canonical()
    assert PRESETS["basic"].hash() == "e493679cfc3f819455da8644e211ff41e4f9c8a80e9252fc60eb39ce909a1d07"


def test_imagenet_constants_are_timms():
    # distill.augment writes them out to stay light; they must be timm's own
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert (Augmentation().mean, Augmentation().std) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def test_shard_batches_do_not_cross_shards():
    sampler = ShardBatchSampler(4, [(0, 10), (20, 25)], 4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    assert [len(b) for b in batches] == [4, 4, 2, 4, 1]
    assert batches[3] == [(4, 20), (4, 21), (4, 22), (4, 23)]
    assert collate(
        [{"image": torch.zeros(3, 2, 2), "id": 1, "epoch": 0, "label": 2, "partner": 1, "partner_label": 2, "lam": 1.0}]
    )["image"].shape == (1, 3, 2, 2)
