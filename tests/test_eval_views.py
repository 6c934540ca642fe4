"""Evaluation views: timm's (and the TinyViT / Cream references') resize-and-centre-crop, set by the recipe's `eval`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import create_transform

from distill.augment import PRESETS
from distill.plan import eval_view
from distill.recipe import Recipe, RecipeError, parse_section
from distill.views import EvalView

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


def _recipe(model: str = "tiny_vit_5m_224", **eval_settings) -> Recipe:
    raw = {"method": "supervised", "student": {"model": model}, "data": {"train": "-", "val": "-", "img_size": 32},
           "epochs": 1, "batch_size": 1, "output_dir": "-", "eval": eval_settings}  # fmt: skip
    return parse_section(Recipe, raw, "")


@pytest.mark.parametrize(
    ("size", "crop_pct", "interpolation"),
    [(32, 0.875, "bicubic"), (24, 1.0, "bilinear"), (40, 0.95, "bicubic"), (17, 0.5, "bilinear")],
)
def test_eval_view_is_timms_eval_transform(size: int, crop_pct: float, interpolation: str) -> None:
    timm_eval = create_transform(
        input_size=size, is_training=False, crop_pct=crop_pct, interpolation=interpolation, mean=MEAN, std=STD
    )
    ours = EvalView(size, crop_pct, interpolation, MEAN, STD)
    for image in (_image(50, 37), _image(29, 61, seed=1), _image(size, size, seed=2)):
        expected = timm_eval(image)
        x, mix = ours(lambda i, image=image: image, 7, 3, 10)
        assert x.shape == expected.shape == (3, size, size) and mix.partner == 7 and mix.lam == 1.0
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


def test_crop_pct_one_keeps_the_whole_square_image() -> None:
    image = _image(20, 20)
    whole = image.resize((32, 32), Image.Resampling.BILINEAR)  # the whole image, nothing cropped
    expected = TF.normalize(TF.pil_to_tensor(whole).float() / 255, MEAN, STD)
    torch.testing.assert_close(EvalView(32, 1.0, "bilinear", MEAN, STD).view(image), expected, rtol=0, atol=1e-6)


def test_recipe_settings_then_the_students_timm_defaults_then_timms() -> None:
    augmentation = PRESETS["tinyvit"]
    default = eval_view(_recipe(), augmentation)  # timm's tiny_vit config: 0.95, bicubic
    assert (default.crop_pct, default.interpolation.value, default.resize_to) == (0.95, "bicubic", 33)
    unknown = eval_view(_recipe("cream_path"), augmentation)  # no timm config: timm's DEFAULT_CROP_PCT, bicubic
    assert (unknown.crop_pct, unknown.interpolation.value, unknown.resize_to) == (0.875, "bicubic", 36)
    cream = eval_view(_recipe("cream_43"), augmentation)  # the reference's retrain evaluation
    assert (cream.crop_pct, cream.interpolation.value) == (0.875, "bicubic")
    pinned = eval_view(_recipe(crop_pct=1.0, interpolation="bilinear"), augmentation)
    assert (pinned.crop_pct, pinned.interpolation.value, pinned.resize_to) == (1.0, "bilinear", 32)
    assert (pinned.mean, pinned.std) == (augmentation.mean, augmentation.std)  # normalised as the training views


def test_eval_settings_are_checked() -> None:
    with pytest.raises(RecipeError, match=r"eval\.crop_pct: expected a fraction in \(0, 1\], got 1\.5"):
        _recipe(crop_pct=1.5)
    with pytest.raises(RecipeError, match=r"eval\.interpolation: expected one of \['bilinear', 'bicubic'\]"):
        _recipe(interpolation="nearest")
