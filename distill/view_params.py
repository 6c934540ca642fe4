"""Every stored view's parameters written out, so that anyone rebuilds the view with PIL, numpy and torch
alone (`distill-store views`; docs/STORE_FORMAT.md, "Views, explicitly").

`view_parameters(store, dataset, epoch, ids)` replays the draws of `distill.augment` for the store's
augmentation and global seed and turns them into plain numbers: the crop box in source pixels, the output
size, the interpolation, the flip, the colour jitter factors, the RandAugment operations that fired with the
arguments of their PIL calls, the random-erasing box in output pixels with the torch seed of its noise, and
the mixing partner, lambda and CutMix box. No number needs this toolkit's code to decode.

RandAugment is timm's own transform (`distill.views.ReplayAugment.rand_augment`), run under the view's seeded
`random`/`np.random` state with each operation's function replaced by a recorder: the operations, their
magnitudes, random signs and resampling filters are those timm draws for the view, in its order. Only that
step imports torch and timm, on first use; the rest needs numpy and image headers.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from logit_store import open_store, record_seeds
from logit_store.manifest import Manifest
from logit_store.store import LogitStore

from .augment import Augmentation, draw_mix, draw_view, pair_partners
from .data import ImageDataset, create_dataset
from .errors import DatasetError, RecipeError

__all__ = ["NOISE", "add_command", "view_line", "view_parameters"]

# How an erased box's noise is made from its seed: torch's own generator, so no code of ours decodes it.
NOISE = "torch.randn((3, y1 - y0, x1 - x0), generator=torch.Generator().manual_seed(noise_seed))"
# timm RandAugment operations -> the PIL call they make (docs/STORE_FORMAT.md lists the arguments).
_AFFINE = {"ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}
_ENHANCE = {"Color", "Contrast", "Brightness", "Sharpness"}
_RESAMPLES = {"Rotate", *_AFFINE}  # the operations that resample (timm's `_check_args_tf`)
_RESAMPLING_NAMES = {2: "bilinear", 3: "bicubic", 0: "nearest"}  # PIL.Image.Resampling values


def view_parameters(
    store: LogitStore | Manifest, dataset: str | ImageDataset, epoch: int, ids: Sequence[int]
) -> list[dict[str, Any]]:
    """The parameters of the views (epoch, id) for `ids`, at the store teacher's input size, as plain data.

    `dataset` is the store's data (a spec or an `ImageDataset`); its fingerprint must be the manifest's. A
    DatasetError or RecipeError names what does not fit: another dataset, an epoch or id out of range."""
    m = store.manifest if isinstance(store, LogitStore) else store
    check_request(m, epoch, ids)
    aug = augmentation_of(m)
    data = dataset if isinstance(dataset, ImageDataset) else create_dataset(dataset, skip_unreadable=_skipped(m))
    check_fingerprint(m, data)
    size = int(m.teacher.get("img_size") or 0)
    if size < 1:
        raise RecipeError("manifest.json: teacher.img_size is missing; the views' output size is not known")
    seeds = record_seeds(m.global_seed, epoch, np.asarray(ids, dtype=np.int64))
    partners = pair_partners(m.global_seed, epoch, m.num_samples) if aug.mixing else None
    record_ops = _rand_augment_recorder(aug, size) if aug.auto_augment else None
    out = []
    for sample_id, seed in zip(ids, seeds.tolist(), strict=True):
        w, h = data.image_size(int(sample_id))
        params = draw_view(aug, int(seed), w, h)
        left, top, cw, ch = params.crop
        view: dict[str, Any] = {
            "epoch": int(epoch),
            "id": int(sample_id),
            "source_size": [w, h],
            "crop_box": [left * w, top * h, (left + cw) * w, (top + ch) * h],
            "output_size": [size, size],
            "interpolation": params.interpolation,
            "flip": params.flip,
            "color_jitter": None,
            "rand_augment": None if record_ops is None else record_ops(params.augment_seed),
            "normalize": {"mean": list(aug.mean), "std": list(aug.std)},
            "erase": None,
            "mix": None,
        }
        if params.jitter is not None:
            view["color_jitter"] = dict(zip(("brightness", "contrast", "saturation"), params.jitter, strict=True))
        if params.erase is not None:
            view["erase"] = {"box": _pixels(params.erase, size), "noise_seed": params.noise_seed, "noise": NOISE}
        partner = int(sample_id) if partners is None else int(partners[int(sample_id)])
        mix = draw_mix(aug, int(seed), int(sample_id), partner)
        if mix.partner != sample_id:
            view["mix"] = {"mode": "mixup" if mix.box is None else "cutmix", "partner": mix.partner, "lam": mix.lam}
            if mix.box is not None:
                view["mix"]["box"] = _pixels(mix.box, size)
        out.append(view)
    return out


def augmentation_of(m: Manifest) -> Augmentation:
    """The store's augmentation from its manifest (a RecipeError when this toolkit does not replay its form)."""
    return Augmentation.from_manifest(m.augmentation, "manifest.json")


def _skipped(m: Manifest) -> bool:
    """Whether the store was saved with unreadable files skipped (the ids then skip them too)."""
    return bool(m.dataset.get("skipped"))


def check_fingerprint(m: Manifest, data: ImageDataset) -> None:
    """DatasetError unless `data`'s fingerprint (in the manifest's mode) is the manifest's."""
    stored = m.dataset.get("fingerprint")
    ours = data.fingerprint(m.dataset.get("fingerprint_mode") or "fast")
    if stored != ours:
        raise DatasetError(
            f"dataset {data.spec}: fingerprint {ours} is not the store's dataset.fingerprint {stored} "
            f"(saved from {m.dataset.get('spec')!r}, {m.dataset.get('num_samples')} samples)"
        )


def check_request(m: Manifest, epoch: int, ids: Sequence[int]) -> None:
    if not 0 <= epoch < m.epochs:
        raise RecipeError(f"--epoch {epoch}: the store has epochs 0 to {m.epochs - 1}")
    bad = [int(i) for i in ids if not 0 <= int(i) < m.num_samples]
    if bad:
        raise RecipeError(f"--ids: id {bad[0]} is out of range; the store has ids 0 to {m.num_samples - 1}")


def _pixels(box: tuple[float, float, float, float], size: int) -> list[int]:
    """A relative (left, top, width, height) box as [x0, y0, x1, y1] output pixels (half-open), rounded as the
    views round it (`distill.views.pixel_box`)."""
    left, top, w, h = box
    return [round(left * size), round(top * size), round((left + w) * size), round((top + h) * size)]


def _rand_augment_recorder(aug: Augmentation, size: int) -> Callable[[int], list[dict[str, Any]]]:
    """seed -> the RandAugment operations that fire for that seed, each with its PIL call's arguments."""
    from .views import ReplayAugment, seeded_global_rngs

    transform = copy.deepcopy(ReplayAugment(aug, size).rand_augment)  # the views' own transform, instrumented
    recorder = _Recorder(size)
    for op in transform.ops:
        op.level_fn = recorder.level(op.level_fn)
        op.aug_fn = recorder.op(op.name)

    def record(seed: int) -> list[dict[str, Any]]:
        recorder.fired = []
        with seeded_global_rngs(seed):
            transform(None)  # the recorders pass the "image" through untouched
        return recorder.fired

    return record


class _Recorder:
    """Stands in for timm's level and operation functions. An operation that fires calls its level function
    (when it has one) with the clamped magnitude, then its operation function with the level's arguments."""

    def __init__(self, size: int) -> None:
        self.size, self.fired, self.magnitude = size, [], None

    def level(self, level_fn: Callable[..., tuple] | None) -> Callable[..., tuple] | None:
        if level_fn is None:
            return None

        def level(magnitude: float, hparams: dict[str, Any]) -> tuple:
            self.magnitude = float(magnitude)
            return level_fn(magnitude, hparams)

        return level

    def op(self, name: str) -> Callable[..., Any]:
        """An affine operation or a rotation picks its filter with `random.choice` when given several (timm's
        `_interpolation`): the recorder draws it, the same draw at the same point."""

        def op(img: Any, *args: Any, fillcolor: Any = None, resample: Any = None) -> Any:
            entry: dict[str, Any] = {"op": name}
            if self.magnitude is not None:
                entry["magnitude"], self.magnitude = self.magnitude, None
            if name in _RESAMPLES:
                chosen = random.choice(resample) if isinstance(resample, list | tuple) else resample
                entry |= {"resample": _RESAMPLING_NAMES[int(chosen)], "fill": [int(c) for c in fillcolor]}
            self.fired.append(entry | _arguments(name, args, self.size))
            return img

        return op


def _arguments(name: str, args: tuple, size: int) -> dict[str, Any]:
    """The explicit arguments of one operation's PIL call (docs/STORE_FORMAT.md, "Views, explicitly")."""
    base = name.removesuffix("Increasing").removesuffix("Original")
    if name == "Rotate":
        return {"degrees": float(args[0])}
    if name in _AFFINE:
        v = float(args[0])
        if name.endswith("Rel"):
            v = v * size  # timm: pct * img.size[0 or 1]; the image is square at this point
        matrix = {"ShearX": [1, v, 0, 0, 1, 0], "ShearY": [1, 0, 0, v, 1, 0]}.get(name)
        if matrix is None:
            matrix = [1, 0, v, 0, 1, 0] if name.startswith("TranslateX") else [1, 0, 0, 0, 1, v]
        return {"affine": [float(x) for x in matrix]}
    if base in _ENHANCE:
        return {"enhance": base, "factor": float(args[0])}
    if base == "Posterize":
        return {"bits": int(args[0])}
    if base == "Solarize":
        return {"threshold": int(args[0])}
    if name == "SolarizeAdd":
        return {"add": int(args[0]), "threshold": 128}
    if name in ("AutoContrast", "Equalize", "Invert"):
        return {}
    raise RecipeError(f"RandAugment operation {name!r} has no explicit form in distill-store views")


def view_line(view: dict[str, Any]) -> str:
    """One readable line of a view's parameters."""
    x0, y0, x1, y1 = view["crop_box"]
    w, h = view["source_size"]
    s = view["output_size"][0]
    parts = [f"epoch {view['epoch']} id {view['id']}: {w}x{h} crop ({x0:.2f},{y0:.2f})-({x1:.2f},{y1:.2f})"]
    parts[0] += f" -> {s}x{s} {view['interpolation']}" + (" flipped" if view["flip"] else "")
    if view["color_jitter"]:
        parts.append("jitter " + " ".join(f"{k} {v:.4f}" for k, v in view["color_jitter"].items()))
    if view["rand_augment"] is not None:
        ops = [_op_text(op) for op in view["rand_augment"]]
        parts.append("RandAugment " + (" ".join(ops) if ops else "none"))
    if view["erase"]:
        e = view["erase"]
        parts.append(f"erase {tuple(e['box'])} noise seed {e['noise_seed']}")
    if view["mix"]:
        mix = view["mix"]
        box = f" box {tuple(mix['box'])}" if "box" in mix else ""
        parts.append(f"{mix['mode']} with id {mix['partner']} lam {mix['lam']:.4f}{box}")
    return ", ".join(parts)


def _op_text(op: dict[str, Any]) -> str:
    args = {k: v for k, v in op.items() if k not in ("op", "fill", "magnitude")}
    text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in args.items())
    return f"{op['op']}({text})"


def add_command(sub: argparse._SubParsersAction) -> None:
    """`distill-store views` (an entry of the `logit_store.commands` group: the store's CLI imports no engine)."""
    views = sub.add_parser(
        "views", help="every view's parameters written out (crop, flip, RandAugment ops, erasing, mixing)"
    )
    views.add_argument("store")
    views.add_argument("--data", required=True, help="the store's dataset (its fingerprint must be the manifest's)")
    views.add_argument("--epoch", type=int, required=True)
    views.add_argument("--ids", required=True, help="START:STOP (half-open) or one ID")
    views.add_argument("--json", action="store_true", help="a JSON list of the views")
    views.set_defaults(func=cmd_views)


def cmd_views(args: argparse.Namespace) -> int:
    ids = parse_ids(args.ids)
    with open_store(args.store, read_only=True) as store:
        views = view_parameters(store, args.data, args.epoch, ids)
    if args.json:
        print(json.dumps(views, indent=1))
    else:
        for view in views:
            print(view_line(view))
    return 0


def parse_ids(text: str) -> range:
    """The ids of `--ids`: START:STOP (half-open) or one ID."""
    start, sep, stop = text.partition(":")
    try:
        first = int(start)
        ids = range(first, int(stop) if sep else first + 1)
    except ValueError:
        raise RecipeError(f"--ids: expected START:STOP or one ID (integers), got {text!r}") from None
    if not ids:
        raise RecipeError(f"--ids {text}: an empty range")
    return ids
