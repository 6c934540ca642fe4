"""The TinyCLIP recipes of the published models: valid, and holding the reference's numbers.

The reference's values are written out here from microsoft/Cream (TinyCLIP/script/*.sh, docs/PRETRAINING.md,
src/training/params.py), not read from the recipes, so that a recipe edited away from them fails.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from train_helpers import ROOT

from distill.augment import load_augmentation
from distill.plan import eval_view
from distill.recipe import Recipe, follow_ups, load_recipe_file, method_config, parse_recipe
from recipes.tinyclip.inheritance import inherit_weights

CONFIGS = ROOT / "recipes" / "configs"
GLOBAL_BATCH = 1024 * 4 * 8  # --batch-size per GPU, on 4 nodes of 8 GPUs
TEACHER_WEIGHTS = "checkpoints/vit_b_32-laion2b_e16-af8b2a0a.pth"  # ViT-B-32@laion2b_e16
# script/auto_weight_inherit_{100to75,75to50,50to25}.sh: (--prune-step, --target-sparsity of the original model)
AUTO_STAGES = [(3000, 0.25), (5000, 0.5), (8000, 0.75)]


def runs(name: str) -> list[tuple[Recipe, Any]]:
    """(recipe, parsed loss section) of the main run and of every follow-up, in order."""
    main = parse_recipe(load_recipe_file(CONFIGS / name))
    recipes = [main, *(parse_recipe(f.recipe) for f in follow_ups(main))]
    return [(r, method_config(r)[1]) for r in recipes]


def assert_reference_training(recipe: Recipe, loss: Any) -> None:
    """What every run of the reference's scripts shares."""
    opt = recipe.optimizer
    assert (recipe.batch_size, opt.name, opt.lr, opt.weight_decay, opt.clip_grad) == (
        GLOBAL_BATCH,
        "adamw",
        1e-4,
        0.2,
        5,
    )
    assert opt.kwargs == {"betas": [0.9, 0.98], "eps": 1e-6}
    assert (loss.affinity_scale, loss.alpha, loss.gather_with_grad) == (50.0, 1.0, True)
    assert recipe.augmentation["scale"] == [0.9, 1.0] and recipe.augmentation["interpolation"] == "bicubic"
    assert recipe.data.img_size == 224 and recipe.student.kwargs == {}


def test_auto_inheritance_recipe_has_the_references_three_stages():
    (main, main_loss), *rest = runs("tinyclip_auto_vit_b32_laion400m.yaml")
    assert (main.student.model, main.student.checkpoint) == ("ViT-B-32", TEACHER_WEIGHTS)
    masks, distils = [(main, main_loss), rest[1], rest[3]], [rest[0], rest[2], rest[4]]
    kept = 1.0
    for (recipe, loss), (steps, sparsity_of_original) in zip(masks, AUTO_STAGES, strict=True):
        assert_reference_training(recipe, loss)
        assert (recipe.teacher.source, recipe.teacher.checkpoint) == ("open_clip:ViT-B-32", TEACHER_WEIGHTS)
        prune = loss.prune
        assert (prune.steps, prune.ramp_steps, prune.mask_lr, prune.lagrangian_lr) == (steps, 1000, 0.02, 0.02)
        assert (prune.init_log_alpha, prune.init_lambda, prune.towers) == (10.0, 10.0, ["image", "text"])
        kept *= 1 - prune.target_sparsity  # relative to the model entering the stage
        assert 1 - kept == pytest.approx(sparsity_of_original)
        # one epoch over steps x batch samples, the weights' rate warming up over all of it
        assert recipe.epochs == 1 and (recipe.schedule.warmup_epochs, recipe.schedule.warmup_lr) == (1, 0.0)
    for recipe, loss in distils:  # a fresh AdamW, cosine from 1e-4 to 0 over the rest of the 6 epochs
        assert_reference_training(recipe, loss)
        assert loss.prune is None and recipe.epochs == 6
        assert (recipe.schedule.name, recipe.schedule.warmup_epochs, recipe.schedule.min_lr) == ("cosine", 0, 0.0)


@pytest.mark.parametrize(
    ("name", "teacher", "students"),
    [
        ("tinyclip_vit_61m_40m_32_laion400m.yaml", "ViT-B-32", ["TinyCLIP-ViT-61M-32-Text-29M", "TinyCLIP-ViT-40M-32-Text-19M"]),
        ("tinyclip_vit_39m_8m_16_yfcc15m.yaml", "ViT-B-16", ["TinyCLIP-ViT-39M-16-Text-19M", "TinyCLIP-ViT-8M-16-Text-3M"]),
    ],
)  # fmt: skip
def test_manual_inheritance_recipes_chain_two_students_from_one_teacher(name, teacher, students):
    (first, first_loss), (second, second_loss) = runs(name)
    for recipe, loss in ((first, first_loss), (second, second_loss)):
        assert_reference_training(recipe, loss)
        assert recipe.teacher.source == f"open_clip:{teacher}" and recipe.epochs == 6
        assert loss.prune is None and recipe.student.checkpoint is None
    assert [first.student.model, second.student.model] == students
    assert first_loss.inherit.model == teacher and first_loss.inherit.checkpoint == first.teacher.checkpoint
    # the second student inherits from the first one's trained weights
    assert (second_loss.inherit.model, second_loss.inherit.checkpoint) == (
        students[0],
        f"{first.output_dir}/model.safetensors",
    )
    # the configs are compatible: heads of one width, leading slices that fit
    with torch.device("meta"):
        models = [open_clip.create_model(n, device="meta") for n in (teacher, *students)]
    inherit_weights(models[0], models[1])
    inherit_weights(models[1], models[2])


def reference_eval_transform() -> Compose:
    """src/open_clip/transform.py image_transform(224, is_train=False): the shorter side resized to 224 (bicubic),
    the centre 224 square cropped, CLIP's mean and std."""
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    resize = Resize(224, interpolation=InterpolationMode.BICUBIC)
    return Compose([resize, CenterCrop(224), ToTensor(), Normalize(mean, std)])


@pytest.mark.parametrize(
    "name",
    ["tinyclip_auto_vit_b32_laion400m.yaml", "tinyclip_vit_61m_40m_32_laion400m.yaml",
     "tinyclip_vit_39m_8m_16_yfcc15m.yaml"],
)  # fmt: skip
def test_published_recipes_evaluate_on_the_references_views(name: str) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in ((300, 250), (240, 411))]
    reference = reference_eval_transform()
    for recipe, _ in runs(name):
        view = eval_view(recipe, load_augmentation(recipe.augmentation))
        assert (view.resize_to, view.img_size, view.interpolation) == (224, 224, InterpolationMode.BICUBIC)
        for image in images:
            torch.testing.assert_close(view.view(image), reference(image), rtol=0, atol=1e-6)
