"""Replayable augmentation: the view of (epoch, id) is a pure function of the `Augmentation` and seeds.

This module holds the `Augmentation` (what a view is made of: a preset, a YAML file or a recipe's
`augmentation` mapping) and the draws (numpy only, so it validates without torch);
`distill.views.ReplayAugment` applies the draws to images.

Every random draw of a view comes from generators seeded with
`record_seeds(global_seed, epoch, id)`, never from global state, so the teacher that
saved logits and every later student see the same view whatever their batch size,
worker count, process count, sampler order or output resolution. Geometry is drawn
relative to the source image (crop boxes, erasing boxes, CutMix boxes), so a student at
another resolution replays the same view.

Mixing partners come in pairs: `pair_partners(global_seed, epoch, n)` cuts a permutation of the
epoch's ids drawn from (global seed, epoch) into pairs, each id's partner the other of its pair
(with an odd count the last id of the permutation has none). Each sample's lambda and CutMix box
still come from its own seed. So both members of a pair can be viewed once and mixed in one batch
(`distill.views.mix_batch`), and the pairing depends on no batch size, worker or process count.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from logit_store.manifest import recipe_hash

from .errors import RecipeError
from .files import BadYaml, load_yaml_file
from .schema import parse_section

INTERPOLATIONS = ("bilinear", "bicubic")
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)  # timm.data's constants (tested equal), without importing timm
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
# The rule that pairs mixing partners; part of a mixing augmentation's canonical form (hence of its hash), so a
# store saved under another rule (before: a partner drawn per sample from the whole dataset) is refused.
PAIRING = "epoch-pairs"
_PAIRING_STREAM = 0x5041_4952  # "PAIR": the pairing's generator differs from the sampler's [seed, epoch]
# timm's RandAugment config strings: "rand" then "-" separated options (m9, n2, mstd0.5, inc1, ...);
# the string is parsed by timm itself when views are made (distill.views), this only refuses typos early.
_RAND_AUGMENT = re.compile(r"rand(-(m|n|w|mstd|mmax|inc|p)\d+(\.\d+)?)*")


@dataclass(frozen=True)
class Augmentation:
    """What a training view is made of. Its canonical form (no output size) is hashed into
    the store manifest; `img_size` is chosen by each consumer."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "random"  # of the crop and RandAugment: "bilinear", "bicubic" or "random" (per view, per op)
    hflip: float = 0.5
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0 disables
    auto_augment: str | None = None  # timm RandAugment config string, e.g. "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.0  # random erasing probability
    re_scale: tuple[float, float] = (0.02, 1 / 3)
    re_ratio: tuple[float, float] = (0.3, 3.3)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0  # probability that a view is mixed at all (when an alpha > 0)
    switch_prob: float = 0.5  # probability of CutMix rather than Mixup when both are on
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD

    def __post_init__(self) -> None:
        # Canonical numbers: YAML's `hflip: 1` and the preset's 1.0 must hash alike.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif isinstance(value, tuple | list):
                object.__setattr__(self, f.name, tuple(float(v) for v in value))
        if self.interpolation not in (*INTERPOLATIONS, "random"):
            raise RecipeError(f"interpolation: expected bilinear, bicubic or random, got {self.interpolation!r}")
        for name in ("hflip", "re_prob", "mix_prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise RecipeError(f"{name}: expected a probability in [0, 1], got {getattr(self, name)}")
        if self.auto_augment is not None and not _RAND_AUGMENT.fullmatch(self.auto_augment):
            raise RecipeError(
                f"auto_augment: expected a timm RandAugment string such as 'rand-m9-mstd0.5-inc1', "
                f"got {self.auto_augment!r}"
            )

    @property
    def mixing(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def canonical(self) -> dict[str, Any]:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(asdict(self).items())}
        # RandAugment resamples with `interpolation` unless it is "random"; it used to resample at random
        # whatever the crop did. The views of such augmentations changed, so their hash does too: a store saved
        # before is refused instead of replayed with other views. Other augmentations keep their hash.
        if self.auto_augment and self.interpolation != "random":
            out["rand_augment_interpolation"] = self.interpolation
        # Partners used to be drawn per sample from the whole dataset; they are now pairs of one permutation
        # per epoch (`pair_partners`). Mixing augmentations name the rule, so their stores saved before are refused.
        if self.mixing:
            out["pairing"] = PAIRING
        return out

    def hash(self) -> str:
        return recipe_hash(self.canonical())

    def manifest_entry(self) -> dict[str, Any]:
        """The `augmentation` entry of a store manifest: {"recipe": canonical form, "hash": its hash} (the on-disk
        format's key names, docs/STORE_FORMAT.md)."""
        return {"recipe": self.canonical(), "hash": self.hash()}

    @classmethod
    def from_dict(cls, data: Any) -> Augmentation:
        """Validated fields from plain data; errors name the field (RecipeError)."""
        return parse_section(cls, data, "")

    @classmethod
    def from_manifest(cls, entry: dict[str, Any], where: str) -> Augmentation:
        """The augmentation of a store manifest's `augmentation` entry (`manifest_entry`'s inverse). An entry this
        toolkit would not write for it (unknown fields, another pairing rule, a hash that differs) is a RecipeError
        naming `where`: its views cannot be replayed."""
        recipe = entry.get("recipe")
        derived = ("pairing", "rand_augment_interpolation")  # `canonical` adds them: not fields
        try:
            if not isinstance(recipe, dict):
                raise RecipeError(f"expected a mapping of augmentation fields, got {recipe!r}")
            augmentation = cls.from_dict({k: v for k, v in recipe.items() if k not in derived})
        except RecipeError as err:
            raise RecipeError(f"{where}: augmentation.recipe: {err}") from None
        if augmentation.manifest_entry() != {"recipe": recipe, "hash": entry.get("hash")}:
            raise RecipeError(
                f"{where}: augmentation entry {entry!r} is not one this toolkit replays (its canonical form or hash "
                "differs); save the store again with distill-save-logits"
            )
        return augmentation


# tinyvit: the TinyViT reference's training views (its DATA.INTERPOLATION is bicubic, for the crop and for
# RandAugment; colour jitter is off under RandAugment); tinyvit-mix adds its ImageNet-1k Mixup/CutMix.
PRESETS: dict[str, Augmentation] = {
    "none": Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0), interpolation="bilinear", hflip=0.0),
    "basic": Augmentation(scale=(0.35, 1.0), interpolation="bilinear"),
    "tinyvit": Augmentation(interpolation="bicubic", auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25),
    "tinyvit-mix": Augmentation(
        interpolation="bicubic", auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, mixup_alpha=0.8, cutmix_alpha=1.0
    ),
}


def load_augmentation(preset_or_yaml: str | dict[str, Any] | Augmentation) -> Augmentation:
    """A preset name, a YAML file path, or a mapping of Augmentation fields; a RecipeError names what is wrong."""
    if isinstance(preset_or_yaml, Augmentation):
        return preset_or_yaml
    if isinstance(preset_or_yaml, dict):
        return Augmentation.from_dict(preset_or_yaml)
    if preset_or_yaml in PRESETS:
        return PRESETS[preset_or_yaml]
    path = Path(preset_or_yaml)
    if not path.is_file():
        raise RecipeError(f"{preset_or_yaml!r} is neither a preset {sorted(PRESETS)} nor a YAML file")
    try:
        return Augmentation.from_dict(load_yaml_file(path, "an augmentation file") or {})
    except (RecipeError, BadYaml) as err:
        raise RecipeError(f"{path}: {err}") from None


# ---- the draws of one view, all relative to the image ---------------------------------------------------


@dataclass(frozen=True)
class ViewParams:
    """Everything random about one (unmixed) view; boxes are (left, top, width, height) in [0, 1]."""

    crop: tuple[float, float, float, float]
    interpolation: str
    flip: bool
    jitter: tuple[float, float, float] | None  # brightness, contrast, saturation factors
    augment_seed: int  # seeds timm's RandAugment
    erase: tuple[float, float, float, float] | None
    noise_seed: int  # seeds the erased pixels


@dataclass(frozen=True)
class MixParams:
    partner: int
    lam: float  # weight of the sample itself; 1.0 when not mixed
    box: tuple[float, float, float, float] | None = None  # CutMix box, relative; None for Mixup


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent generator per stream, so enabling one op never shifts another's draws."""
    return np.random.default_rng([seed, stream])


def draw_view(aug: Augmentation, seed: int, width: int, height: int) -> ViewParams:
    """Draw the view's parameters for a source image of width x height pixels."""
    rng = _rng(seed, 0)
    crop = _draw_crop(rng, aug.scale, aug.ratio, width / height)
    interp = aug.interpolation if aug.interpolation != "random" else ("bilinear", "bicubic")[int(rng.integers(2))]
    flip = bool(rng.random() < aug.hflip)
    jitter = None
    if aug.color_jitter > 0:
        s = aug.color_jitter
        jitter = tuple(float(rng.uniform(max(0.0, 1 - s), 1 + s)) for _ in range(3))
    erase = None
    if aug.re_prob > 0 and rng.random() < aug.re_prob:
        erase = _draw_box(rng, aug.re_scale, aug.re_ratio, 1.0)
    return ViewParams(crop, interp, flip, jitter, int(rng.integers(2**31)), erase, int(rng.integers(2**31)))


def _draw_box(
    rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float], aspect: float, tries: int = 10
) -> tuple[float, float, float, float] | None:
    """A box of relative area in `scale` and pixel aspect ratio in `ratio` (log-uniform)."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(tries):
        area = rng.uniform(*scale)
        r = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(area * r / aspect), math.sqrt(area / r * aspect)
        if w <= 1 and h <= 1:
            return float(rng.uniform(0, 1 - w)), float(rng.uniform(0, 1 - h)), w, h
    return None


def _draw_crop(
    rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float], aspect: float
) -> tuple[float, float, float, float]:
    box = _draw_box(rng, scale, ratio, aspect)
    if box is not None:
        return box
    # Fallback as in torchvision: the largest central crop with the aspect ratio clamped to `ratio`.
    r = min(max(aspect, ratio[0]), ratio[1])
    w, h = (r / aspect, 1.0) if r < aspect else (1.0, aspect / r)
    return (1 - w) / 2, (1 - h) / 2, w, h


@functools.lru_cache(maxsize=4)
def pair_partners(global_seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """partner[id] of every id of an epoch: a permutation drawn from (global seed, epoch) cut into pairs
    (a, b), a's partner b and b's a; with an odd count the permutation's last id is its own (unmixed).
    A read-only array, cached: a sampler and every worker compute it once per epoch."""
    order = np.random.default_rng([global_seed, epoch, _PAIRING_STREAM]).permutation(num_samples)
    partner = np.arange(num_samples)
    half = num_samples // 2 * 2
    partner[order[0:half:2]] = order[1:half:2]
    partner[order[1:half:2]] = order[0:half:2]
    partner.flags.writeable = False
    return partner


def draw_mix(aug: Augmentation, seed: int, sample_id: int, partner: int) -> MixParams:
    """Lambda (and CutMix box) of a sample mixed with `partner` (from `pair_partners`): functions of its seed
    alone, so any batch size replays them. Unmixed (lambda 1) when the partner is itself."""
    rng = _rng(seed, 1)
    if not aug.mixing or partner == sample_id or rng.random() >= aug.mix_prob:
        return MixParams(sample_id, 1.0)
    use_cutmix = aug.cutmix_alpha > 0 and (aug.mixup_alpha <= 0 or rng.random() < aug.switch_prob)
    alpha = aug.cutmix_alpha if use_cutmix else aug.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if not use_cutmix:
        return MixParams(partner, lam)
    cut = math.sqrt(1 - lam)
    cx, cy = rng.random(), rng.random()
    x0, x1 = max(cx - cut / 2, 0.0), min(cx + cut / 2, 1.0)
    y0, y1 = max(cy - cut / 2, 0.0), min(cy + cut / 2, 1.0)
    box = (x0, y0, x1 - x0, y1 - y0)
    return MixParams(partner, 1.0 - box[2] * box[3], box)  # lambda follows the clipped box


__all__ = [
    "PAIRING",
    "PRESETS",
    "Augmentation",
    "MixParams",
    "ViewParams",
    "draw_mix",
    "draw_view",
    "load_augmentation",
    "pair_partners",
]
