"""TinyCLIP student configurations (Wu et al., ICCV 2023), registered with open_clip on import.

After ``import students`` (or ``import students.tinyclip``), ``open_clip.create_model("TinyCLIP-ViT-8M-16-Text-3M")``
builds a student.
Each name states the size of its towers: the image tower's parameter count, and the text tower's without its
token-embedding table (the 49408-row vocabulary would otherwise dominate every small text tower).

Widths, depths and patch sizes follow REFERENCE.md section 3. What it leaves open is kept at CLIP's defaults:
head width 64 in the image towers, MLP ratio 4, context length 77, vocabulary 49408. Counts obtained
(``tower_param_counts``, image / text without token embedding):

====================================  ==========  ==========
config                                image       text
====================================  ==========  ==========
TinyCLIP-ViT-8M-16-Text-3M            8,276,992   2,520,576
TinyCLIP-ViT-39M-16-Text-19M          38,587,392  19,216,896
TinyCLIP-ViT-40M-32-Text-19M          39,691,776  19,216,896
TinyCLIP-ViT-61M-32-Text-29M          61,411,200  28,674,048
TinyCLIP-ResNet-19M-Text-19M          18,596,766  19,479,040
TinyCLIP-ResNet-30M-Text-29M          29,583,780  28,936,192
====================================  ==========  ==========

All are within 10% of the name except the 3-layer, width-256 text tower of ViT-8M (2.52M for "3M"), which is
within 0.5M. It keeps CLIP's MLP ratio 4 rather than a widened MLP (ratio 5 would give 2.91M), since nothing
here says the released model departs from the defaults.

``TinyCLIP-test`` is a toy configuration (32 px images, width 32) for fast tests, and ``TinyCLIP-test-teacher``
its toy teacher (width 64, 4 layers, same head width, so the student can inherit from it).
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import open_clip
import open_clip.factory
from torch import nn


def _vit(embed_dim: int, width: int, layers: int, patch_size: int, text_width: int, text_layers: int) -> dict[str, Any]:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 224, "layers": layers, "width": width, "patch_size": patch_size, "head_width": 64},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": text_width,
            "heads": text_width // 64,
            "layers": text_layers,
        },
    }


def _resnet(width: int, text_layers: int) -> dict[str, Any]:
    return {
        "embed_dim": 1024,
        # Modified ResNet (3 stem convs, attention pooling); attention-pool heads = width * 32 // head_width.
        "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": width, "head_width": 64, "patch_size": None},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": text_layers},
    }


TINYCLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "TinyCLIP-ViT-8M-16-Text-3M": _vit(512, width=256, layers=10, patch_size=16, text_width=256, text_layers=3),
    "TinyCLIP-ViT-39M-16-Text-19M": _vit(512, width=512, layers=12, patch_size=16, text_width=512, text_layers=6),
    "TinyCLIP-ViT-40M-32-Text-19M": _vit(512, width=512, layers=12, patch_size=32, text_width=512, text_layers=6),
    "TinyCLIP-ViT-61M-32-Text-29M": _vit(512, width=640, layers=12, patch_size=32, text_width=512, text_layers=9),
    "TinyCLIP-ResNet-19M-Text-19M": _resnet(width=44, text_layers=6),
    "TinyCLIP-ResNet-30M-Text-29M": _resnet(width=56, text_layers=9),
    # Toy model for tests: real vocabulary so that open_clip's tokenizer works with it.
    "TinyCLIP-test": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    },
    # Toy teacher of TinyCLIP-test (twice its width and depth, same head width): used by the digits recipes.
    "TinyCLIP-test-teacher": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 8, "layers": 4},
    },
}

# (image, text without token embedding) sizes promised by each released name, in parameters.
TINYCLIP_NOMINAL_SIZES: dict[str, tuple[int, int]] = {
    "TinyCLIP-ViT-8M-16-Text-3M": (8_000_000, 3_000_000),
    "TinyCLIP-ViT-39M-16-Text-19M": (39_000_000, 19_000_000),
    "TinyCLIP-ViT-40M-32-Text-19M": (40_000_000, 19_000_000),
    "TinyCLIP-ViT-61M-32-Text-29M": (61_000_000, 29_000_000),
    "TinyCLIP-ResNet-19M-Text-19M": (19_000_000, 19_000_000),
    "TinyCLIP-ResNet-30M-Text-29M": (30_000_000, 29_000_000),
}


def register_tinyclip_configs() -> None:
    """Add the TinyCLIP configs to open_clip's registry (idempotent)."""
    # Looked up through the module each time: open_clip rebinds the dict when it rescans its config paths
    # (it keeps entries added this way, since the rescan starts from the current dict).
    for name, cfg in TINYCLIP_CONFIGS.items():
        open_clip.factory._MODEL_CONFIGS[name] = deepcopy(cfg)


def text_tower(model: nn.Module) -> nn.Module:
    """The module owning the text tower's parts (token_embedding, transformer, ln_final, text_projection).

    open_clip's ``CLIP`` keeps them on the model itself, ``CustomTextCLIP`` on ``model.text``.
    """
    return model.text if hasattr(model, "text") else model


def text_prefix(model: nn.Module) -> str:
    """State-dict prefix of the text tower's parts."""
    return "text." if hasattr(model, "text") else ""


def tower_param_counts(model: nn.Module) -> tuple[int, int]:
    """(image tower parameters, text tower parameters without the token-embedding table)."""
    image = sum(p.numel() for p in model.visual.parameters())
    text_owner = text_tower(model)
    if text_owner is model:
        # CLIP: the text parts sit on the model next to visual and the logit scale/bias.
        skip = {id(p) for p in model.visual.parameters()}
        skip |= {id(p) for p in (model.logit_scale, getattr(model, "logit_bias", None)) if p is not None}
        params = [p for p in model.parameters() if id(p) not in skip]
    else:
        params = list(text_owner.parameters())
    token_embedding = text_owner.token_embedding.weight.numel()
    return image, sum(p.numel() for p in params) - token_embedding


register_tinyclip_configs()
