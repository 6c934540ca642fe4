"""The recipes of the published Cream and TinyViT experiments: they parse, build their students at the reference's
input sizes, and their schedules and optimizers are the reference's (formulas written out here)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

from distill.recipe import load_recipe_file, parse_recipe
from distill.trainer import create_schedule

CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "configs"
# The input size the reference's retrain script sets for each model.
CREAM = {"14": 64, "43": 96, "114": 160, "287": 224, "481": 224, "604": 224}
TINYVIT = [f"tinyvit_{m}_{kind}" for m in ("5m", "11m", "21m") for kind in ("22k_distill", "22kto1k", "in1k")]


def _recipe(name: str):
    return parse_recipe(load_recipe_file(CONFIGS / f"{name}.yaml"))


def _lrs(recipe, steps_per_epoch: int, steps: list[int]) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.optimizer.lr)
    schedule = create_schedule(optimizer, recipe, steps_per_epoch)
    lrs = []
    for step in steps:
        schedule.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("model", sorted(CREAM))
def test_cream_retrain_recipes_train_the_published_model_at_its_size(model: str) -> None:
    recipe = _recipe(f"cream_{model}_in1k")
    assert recipe.student.model == f"cream_{model}" and recipe.data.img_size == CREAM[model]
    assert timm.models.get_pretrained_cfg(recipe.student.model).input_size == (3, CREAM[model], CREAM[model])
    assert (recipe.epochs, recipe.batch_size, recipe.ema.decay, recipe.loss) == (
        500,
        1024,
        0.9999,
        {"label_smoothing": 0.1},
    )
    model_ = timm.create_model(recipe.student.model, **recipe.student.kwargs)
    assert model_.head.drop.p == 0.2
    optimizer = create_optimizer_v2(model_, opt=recipe.optimizer.name, lr=recipe.optimizer.lr,
                                    weight_decay=recipe.optimizer.weight_decay, **recipe.optimizer.kwargs)  # fmt: skip
    assert type(optimizer).__name__ == "RMSpropTF" and optimizer.defaults["eps"] == 1e-3


def test_cream_retrain_schedules_are_the_references() -> None:
    per_epoch = 1251  # 1,281,167 images / 1024
    # 14 and 43: warm-up 3 epochs from 1e-6, then x0.973 every 2.4 epochs (counted from the start).
    recipe = _recipe("cream_14_in1k")
    steps = [0, per_epoch, 3 * per_epoch, 10 * per_epoch, 100 * per_epoch]
    warm = [1e-6 + (0.064 - 1e-6) * t / (3 * per_epoch) for t in steps[:2]]
    decayed = [0.064 * 0.973 ** math.floor(t / (2.4 * per_epoch)) for t in steps[2:]]
    assert _lrs(recipe, per_epoch, steps) == pytest.approx(warm + decayed, rel=1e-9)
    # 114 ... 604: cosine from 0.064 to 1e-5 over the 500 epochs, the warm-up laid over its start (timm's
    # scheduler then and now).
    recipe = _recipe("cream_287_in1k")
    steps = [100 * per_epoch, 250 * per_epoch, 499 * per_epoch]
    expected = [1e-5 + 0.5 * (0.064 - 1e-5) * (1 + math.cos(math.pi * t / (500 * per_epoch))) for t in steps]
    assert _lrs(recipe, per_epoch, steps) == pytest.approx(expected, rel=1e-6)


def test_cream_search_recipe_is_the_references_train_config() -> None:
    recipe = _recipe("cream_search_in1k")
    loss = recipe.loss
    assert (recipe.epochs, recipe.batch_size, loss["board_start_epoch"], loss["admission_margin"]) == (
        120,
        1024,
        21,
        5.0,
    )
    assert (recipe.optimizer.name, recipe.optimizer.lr, recipe.optimizer.weight_decay) == ("sgd", 1.0, 1e-4)
    # The reference's LambdaLR: lr x (1 - step / steps), per step, to 0 at the end.
    per_epoch, total = 1251, 120 * 1251
    steps = [0, 1, total // 3, total // 2, total - 1]
    assert _lrs(recipe, per_epoch, steps) == pytest.approx([1.0 - t / total for t in steps], rel=1e-9)
    retrain = recipe.then[0]
    assert retrain["optimizer"]["name"] == "rmsproptf" and retrain["epochs"] == 500


@pytest.mark.parametrize("name", TINYVIT)
def test_tinyvit_recipes_are_the_references_configs(name: str) -> None:
    recipe = _recipe(name)
    size = name.split("_")[1]
    drop_path = {"22k_distill": {"5m": 0.0, "11m": 0.0, "21m": 0.1}, "22kto1k": {"5m": 0.0, "11m": 0.0, "21m": 0.1},
                 "in1k": {"5m": 0.0, "11m": 0.1, "21m": 0.2}}[name.split("_", 2)[2]][size]  # fmt: skip
    assert recipe.student.model == f"tiny_vit_{size}_224" and recipe.student.kwargs == {"drop_path_rate": drop_path}
    assert (recipe.eval.crop_pct, recipe.eval.interpolation, recipe.optimizer.clip_grad) == (0.875, "bicubic", 5.0)
    if name.endswith("22k_distill"):  # 2.5e-4 per 512 images at 4096, 90 epochs, no mixing, top-100 store
        assert (recipe.method, recipe.epochs, recipe.batch_size, recipe.augmentation) == (
            "tinyvit",
            90,
            4096,
            "tinyvit",
        )
        assert (recipe.optimizer.lr, recipe.optimizer.weight_decay, recipe.schedule.warmup_epochs) == (2e-3, 0.01, 5)
    elif name.endswith("22kto1k"):
        assert (recipe.method, recipe.epochs, recipe.optimizer.lr, recipe.optimizer.weight_decay) == (
            "supervised",
            30,
            5e-4,
            1e-8,
        )
        assert recipe.optimizer.kwargs == {"layer_decay": 0.8} and recipe.augmentation == "tinyvit"
    else:  # from scratch: warm-up 20, Mixup 0.8 / CutMix 1.0
        assert (recipe.method, recipe.epochs, recipe.schedule.warmup_epochs, recipe.augmentation) == (
            "supervised",
            300,
            20,
            "tinyvit-mix",
        )
        assert recipe.optimizer.lr == 1e-3 and recipe.loss == {"label_smoothing": 0.1}


def test_tinyvit_fine_tune_layer_decay_reaches_timm() -> None:
    recipe = _recipe("tinyvit_5m_22kto1k")
    model = timm.create_model(recipe.student.model, num_classes=10)
    optimizer = create_optimizer_v2(model, opt=recipe.optimizer.name, lr=recipe.optimizer.lr,
                                    weight_decay=recipe.optimizer.weight_decay, **recipe.optimizer.kwargs)  # fmt: skip
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    assert scales[-1] == 1.0 and scales[-2] == pytest.approx(0.8) and len(scales) > 3
