"""Views from draws: `ReplayAugment` applies the parameters drawn in `distill.augment` to an image;
`EvalView` is the evaluation transform.

The same (augmentation, global seed, epoch, id) always gives the same tensor, whoever computes it:
the teacher that saved a store, any student replaying it, at any batch size or worker count.
Evaluation views draw nothing: they depend on the image alone, and are never stored.

Mixing happens on batches: every view is made once, unmixed, and `mix_batch` mixes each row of a
collated batch with its partner's row (`distill.loader` puts both in the batch), on whichever device
the batch is. The save pipeline and training call the same function, so the teacher's stored record
is of the mixed view the student sees.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from torchvision.transforms import InterpolationMode

from logit_store import record_seeds

from .augment import Augmentation, MixParams, ViewParams, draw_mix, draw_view, pair_partners

__all__ = ["MIX_KEYS", "EvalView", "ReplayAugment", "mix_batch"]

_RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """timm's RandAugment draws from `random` and `np.random`; seed them for one call, then
    restore them, so its ops stay timm's own and still replay exactly."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class ReplayAugment:
    """Turns (image loader, sample id, epoch) into the replayed view tensor at `img_size`."""

    def __init__(self, augmentation: Augmentation, img_size: int, global_seed: int = 0) -> None:
        self.augmentation, self.img_size, self.global_seed = augmentation, img_size, global_seed
        self.rand_augment = None
        if augmentation.auto_augment:
            fill = tuple(round(255 * m) for m in augmentation.mean)
            hparams: dict[str, object] = {"img_mean": fill, "translate_pct": 0.45}
            if augmentation.interpolation != "random":  # else timm's own: bilinear or bicubic at random, per op
                hparams["interpolation"] = _RESAMPLING[augmentation.interpolation]
            self.rand_augment = rand_augment_transform(augmentation.auto_augment, hparams)

    def seed(self, epoch: int, sample_id: int) -> int:
        return int(record_seeds(self.global_seed, epoch, np.array([sample_id]))[0])

    def view(self, image: Image.Image, params: ViewParams) -> torch.Tensor:
        """Apply one view's parameters to an RGB PIL image; returns a normalised [3, S, S] tensor."""
        w, h = image.size
        left, top, cw, ch = params.crop
        size = (self.img_size, self.img_size)
        img = image.resize(
            size, _RESAMPLING[params.interpolation], box=(left * w, top * h, (left + cw) * w, (top + ch) * h)
        )
        if params.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if params.jitter is not None:
            b, c, s = params.jitter
            img = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, b), c), s)
        if self.rand_augment is not None:
            with seeded_global_rngs(params.augment_seed):
                img = self.rand_augment(img)
        x = TF.normalize(TF.pil_to_tensor(img).float().div_(255), self.augmentation.mean, self.augmentation.std)
        if params.erase is not None:
            x = _erase(x, params.erase, params.noise_seed)
        return x

    def partners(self, epoch: int, num_samples: int) -> np.ndarray | None:
        """Every id's mixing partner in `epoch` (`pair_partners`); None when the augmentation does not mix."""
        return pair_partners(self.global_seed, epoch, num_samples) if self.augmentation.mixing else None

    def __call__(
        self, load: Callable[[int], Image.Image], sample_id: int, epoch: int, num_samples: int
    ) -> tuple[torch.Tensor, MixParams]:
        """The (unmixed) view of `sample_id` in `epoch`, and how `mix_batch` mixes it with its partner's."""
        seed = self.seed(epoch, sample_id)
        image = load(sample_id)
        x = self.view(image, draw_view(self.augmentation, seed, *image.size))
        partners = self.partners(epoch, num_samples)
        partner = sample_id if partners is None else int(partners[sample_id])
        return x, draw_mix(self.augmentation, seed, sample_id, partner)


class EvalView:
    """The evaluation transform of timm's `create_transform(is_training=False)` and of the TinyViT and Cream
    references: the shorter side resized to floor(img_size / crop_pct) (aspect kept), the centre img_size
    square cropped, normalised. crop_pct 1.0 keeps the whole of a square image (for tiny images).
    Called like `ReplayAugment`; the view depends on the image alone (never mixed)."""

    def __init__(
        self,
        img_size: int,
        crop_pct: float,
        interpolation: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.img_size, self.crop_pct, self.mean, self.std = img_size, crop_pct, mean, std
        self.interpolation = InterpolationMode(interpolation)
        self.resize_to = math.floor(img_size / crop_pct)

    def __repr__(self) -> str:
        return (
            f"EvalView(resize {self.resize_to} {self.interpolation.value}, centre crop {self.img_size}, "
            f"crop_pct {self.crop_pct:g})"
        )

    def view(self, image: Image.Image) -> torch.Tensor:
        """A normalised [3, S, S] tensor of an RGB PIL image."""
        img = TF.center_crop(TF.resize(image, self.resize_to, self.interpolation), self.img_size)
        return TF.normalize(TF.pil_to_tensor(img).float().div_(255), self.mean, self.std)

    def partners(self, epoch: int, num_samples: int) -> None:
        return None

    def __call__(
        self, load: Callable[[int], Image.Image], sample_id: int, epoch: int, num_samples: int
    ) -> tuple[torch.Tensor, MixParams]:
        return self.view(load(sample_id)), MixParams(sample_id, 1.0)


MIX_KEYS = ("partner_row", "cutmix", "box")  # how a batch mixes: host-side metadata, read by `mix_batch`


def mix_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with its views mixed: row i becomes lam_i * view_i + (1 - lam_i) * view_partner(i) (Mixup), or
    view_i with its CutMix box pasted from view_partner(i); unmixed rows stay as they are.

    `batch` is `distill.loader.collate`'s: "image" holds the batch's unmixed views, then those of partners
    outside the batch; `MIX_KEYS` say how each sample mixes: "partner_row" [B] the row of its partner's view,
    "cutmix" [B] and "box" [B, 4] its CutMix box (pixel y0, y1, x0, x1). Those three are read on the host (keep
    them there: only the images and "lam" need the device). Returns the batch of B mixed images without them; a
    batch without them (already mixed, or never mixing) is returned as it is. "image" is mixed in place, as
    timm's Mixup does (what a later row still reads of an earlier one is kept first), row by row: each row by
    the same float32 operations in any batch and on any device, the one mixing of the save and of training."""
    if "partner_row" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k not in MIX_KEYS}
    images, n = batch["image"], len(batch["id"])
    lam = batch["lam"].to(device=images.device, dtype=images.dtype)
    partner, cutmix, boxes = batch["partner_row"].tolist(), batch["cutmix"].tolist(), batch["box"].tolist()
    readers: dict[int, list[int]] = {}
    for j in range(n):
        if partner[j] != j:
            readers.setdefault(partner[j], []).append(j)
    views: dict[int, torch.Tensor] = {}  # earlier rows' unmixed views that a later row reads
    boxes_kept: dict[int, torch.Tensor] = {}  # or only the box that its one later (CutMix) reader pastes
    for i in range(n):
        p = partner[i]
        if p == i:
            continue
        later = [j for j in readers.get(i, ()) if j > i]
        if len(later) == 1 and cutmix[later[0]]:
            y0, y1, x0, x1 = boxes[later[0]]
            boxes_kept[i] = images[i, :, y0:y1, x0:x1].clone()
        elif later:
            views[i] = images[i].clone()
        y0, y1, x0, x1 = boxes[i]
        if cutmix[i]:
            box = boxes_kept.pop(p, None)
            images[i, :, y0:y1, x0:x1] = box if box is not None else views.get(p, images[p])[:, y0:y1, x0:x1]
        else:
            images[i].mul_(lam[i]).add_(views.get(p, images[p]) * (1 - lam[i]))
    out["image"] = images[:n]
    return out


def pixel_box(box: tuple[float, float, float, float], size: int) -> tuple[int, int, int, int]:
    left, top, w, h = box
    return round(top * size), round((top + h) * size), round(left * size), round((left + w) * size)


def _erase(x: torch.Tensor, box: tuple[float, float, float, float], noise_seed: int) -> torch.Tensor:
    """Random erasing (timm's 'pixel' mode): the box is filled with per-pixel normal noise."""
    y0, y1, x0, x1 = pixel_box(box, x.shape[-1])
    g = torch.Generator().manual_seed(noise_seed)
    x[:, y0:y1, x0:x1] = torch.randn((x.shape[0], y1 - y0, x1 - x0), generator=g)
    return x
