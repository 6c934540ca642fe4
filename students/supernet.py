"""Cream one-shot supernet (MobileNetV3-like), standalone models for single paths, and the published architectures.

A *path* picks one op per searched layer. It is a flat tuple of choice indices, one int per
searched layer, stage after stage (``len(path) == sum(config.stage_depths)``); every function
here also accepts the nested form, one list per stage, and normalizes it with ``normalize_path``.
Choice ``i`` is ``config.choices[i]``, a ``(kernel_size, exp_ratio)`` pair; with the defaults::

    0: k3 e4   1: k3 e6   2: k5 e4   3: k5 e6   4: k7 e4   5: k7 e6

``SKIP`` (-1) leaves a layer out, as the reference's supernet does for ``-1``: a stage's depth is
part of the path. A stage's first layer is never skipped (it changes width and stride), so every
path keeps at least one layer per stage. A nested stage list shorter than the stage is padded
with ``SKIP``: ``[[3], [3, 1], ...]`` on a 4-deep supernet runs one layer of stage 0, two of stage 1.

Layout (defaults, 224x224 input)::

    stem     conv 3x3 s2 16 + BN + Swish, depth-wise separable 3x3 16 (SE)         224 -> 112
    stage 0  4 choice layers, 24 chs,  first stride 2                              112 -> 56
    stage 1  4 choice layers, 40 chs,  first stride 2                               56 -> 28
    stage 2  4 choice layers, 80 chs,  first stride 2                               28 -> 14
    stage 3  4 choice layers, 96 chs,  stride 1                                     14 -> 14
    stage 4  4 choice layers, 192 chs, first stride 2                               14 -> 7
    head     conv 1x1 320 + BN + Swish, global avg pool, conv 1x1 1280 + Swish, linear

The strides are MobileNetV3's (output stride 32, the 96-channel stage keeps 14x14) and four layers
per stage is the one-shot supernet of the Cream paper (the reference's ``search_for_layer`` picks
those depths for its 0-600M multiply-add search). Every choice is an inverted residual (timm's
``InvertedResidual``) with Swish and a MobileNetV3 squeeze-excite: reduced to ``se_ratio`` of the
expanded width, rounded to a multiple of 8, ReLU inside and a hard-sigmoid gate.

``export(supernet, path)`` copies a path's weights into a ``PathModel`` (no choice machinery, no
skipped layers), whose state dict loads into ``build_path_model(config, path, num_classes)``.
Importing this module registers the timm models ``cream_supernet``, ``cream_path`` and the six
published architectures ``cream_14`` ... ``cream_604`` (``PUBLISHED``)::

    timm.create_model("cream_path", path=[3, 1, 0, 5, 2, 2], tiny=True, num_classes=10)
    timm.create_model("cream_path", path=path, config={"stage_depths": [2, 3, 4, 4, 4]})
    timm.create_model("cream_43")  # its input size is in model.pretrained_cfg: 96x96

``path_flops`` counts FLOPs from shapes alone, the way ``torch.utils.flop_counter.FlopCounterMode``
does: 2 FLOPs per multiply-add of convolutions and linear layers; BN, activations, pooling and the SE
gate product are not counted, nor are biases. The paper's "FLOPs" are multiply-adds, half these
numbers: the default supernet's full-depth paths span 568 to 1102 MFLOPs here (284M to 551M
multiply-adds) at 224x224, 4.8M to 7.8M parameters; the supernet itself holds 28.8M.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ConvNormAct, get_padding, make_divisible
from timm.layers.activations import HardSigmoid
from timm.models import register_model
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual, SqueezeExcite

__all__ = [
    "PUBLISHED",
    "SKIP",
    "PathModel",
    "PublishedArch",
    "Supernet",
    "SupernetConfig",
    "build_path_model",
    "compact",
    "config_from_dict",
    "cream_path",
    "cream_supernet",
    "export",
    "normalize_path",
    "path_flops",
    "sample_path",
]

Path = tuple[int, ...]
SKIP = -1  # a layer left out of a path


@dataclass(frozen=True)
class SupernetConfig:
    """Shape of the supernet: fixed stem and head, searched stages of choice layers."""

    stage_chs: tuple[int, ...] = (24, 40, 80, 96, 192)
    stage_depths: tuple[int, ...] = (4, 4, 4, 4, 4)
    stage_strides: tuple[int, ...] = (2, 2, 2, 1, 2)
    kernel_sizes: tuple[int, ...] = (3, 5, 7)
    exp_ratios: tuple[float, ...] = (4.0, 6.0)
    se_ratio: float = 0.25
    stem_chs: int = 16
    head_chs: int = 320  # 1x1 conv + BN + Swish before pooling
    num_features: int = 1280  # 1x1 conv after pooling; 0 feeds the pooled head_chs to the classifier
    in_chans: int = 3
    drop_rate: float = 0.0  # dropout before the classifier

    def __post_init__(self) -> None:
        if not (len(self.stage_chs) == len(self.stage_depths) == len(self.stage_strides)):
            raise ValueError("stage_chs, stage_depths and stage_strides must have one entry per stage")
        if any(d < 1 for d in self.stage_depths):
            raise ValueError(f"every stage needs at least one layer, got depths {self.stage_depths}")

    @classmethod
    def tiny(cls) -> SupernetConfig:
        """A small supernet for 32x32 images (digits) in tests: 0.27M parameters, 3-4 MFLOPs per path."""
        return cls(
            stage_chs=(8, 16, 24),
            stage_depths=(2, 2, 2),
            stage_strides=(1, 2, 2),
            stem_chs=8,
            head_chs=32,
            num_features=64,
        )

    @property
    def choices(self) -> tuple[tuple[int, float], ...]:
        """``(kernel_size, exp_ratio)`` of each choice index, kernel-major."""
        return tuple((k, e) for k in self.kernel_sizes for e in self.exp_ratios)

    @property
    def num_choices(self) -> int:
        return len(self.kernel_sizes) * len(self.exp_ratios)

    @property
    def num_layers(self) -> int:
        """Searched layers, i.e. the length of a path."""
        return sum(self.stage_depths)

    def layer_specs(self) -> list[tuple[int, int, int, int]]:
        """``(stage, in_chs, out_chs, stride)`` of each searched layer, in path order."""
        specs = []
        in_chs = self.stem_chs
        for stage, (chs, depth, stride) in enumerate(
            zip(self.stage_chs, self.stage_depths, self.stage_strides, strict=True)
        ):
            for i in range(depth):
                specs.append((stage, in_chs, chs, stride if i == 0 else 1))
                in_chs = chs
        return specs


def normalize_path(config: SupernetConfig, path: Sequence[int] | Sequence[Sequence[int]]) -> Path:
    """Flat tuple form of ``path`` (flat, or one sequence per stage, a short one padded with ``SKIP``);
    ValueError if it does not fit ``config`` or skips a stage's first layer."""
    if len(path) and isinstance(path[0], Sequence):
        lengths = [len(stage) for stage in path]
        if len(path) != len(config.stage_depths) or not all(
            1 <= n <= d for n, d in zip(lengths, config.stage_depths, strict=True)
        ):
            raise ValueError(f"nested path has stage lengths {lengths}, expected 1 .. {config.stage_depths} per stage")
        flat = tuple(
            int(c)
            for stage, d in zip(path, config.stage_depths, strict=True)
            for c in [*stage] + [SKIP] * (d - len(stage))
        )
    else:
        flat = tuple(int(c) for c in path)
    if len(flat) != config.num_layers:
        raise ValueError(f"path has {len(flat)} choices, expected {config.num_layers} (one per searched layer)")
    if any(not SKIP <= c < config.num_choices for c in flat):
        raise ValueError(f"path {flat} has a choice outside 0..{config.num_choices - 1} (or {SKIP}: skip)")
    if any(flat[i] == SKIP for i in _stage_starts(config)):
        raise ValueError(f"path {flat} skips the first layer of a stage (it changes width and stride)")
    return flat


def _stage_starts(config: SupernetConfig) -> list[int]:
    """Path positions of each stage's first layer."""
    return [sum(config.stage_depths[:s]) for s in range(len(config.stage_depths))]


def compact(config: SupernetConfig, path: Sequence[int] | Sequence[Sequence[int]]) -> tuple[SupernetConfig, Path]:
    """The same network without skipped layers: a config whose stage depths count the layers the path
    runs, and the path on it (no ``SKIP``). A path without skips comes back as it is."""
    flat = normalize_path(config, path)
    starts = [*_stage_starts(config), len(flat)]
    depths = tuple(sum(c != SKIP for c in flat[a:b]) for a, b in itertools.pairwise(starts))
    return dataclasses.replace(config, stage_depths=depths), tuple(c for c in flat if c != SKIP)


def sample_path(
    config: SupernetConfig, generator: torch.Generator | None = None, weights: torch.Tensor | None = None
) -> Path:
    """Draw a path: uniform over choices, or by ``weights`` (``[num_choices]`` shared by all layers, or
    ``[num_layers, num_choices]``; non-negative, need not sum to 1). One more column weighs ``SKIP``
    (never drawn for a stage's first layer); without it every layer runs, as in the reference."""
    if weights is None:
        return tuple(torch.randint(config.num_choices, (config.num_layers,), generator=generator).tolist())
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.dim() == 1:
        weights = weights.expand(config.num_layers, -1)
    columns = weights.shape[-1]
    if weights.shape[0] != config.num_layers or columns not in (config.num_choices, config.num_choices + 1):
        raise ValueError(
            f"weights shape {tuple(weights.shape)} is neither [num_choices (+1 for skip)] "
            "nor [num_layers, num_choices (+1 for skip)]"
        )
    if columns > config.num_choices:
        weights = weights.clone()
        weights[_stage_starts(config), -1] = 0.0
    drawn = torch.multinomial(weights, 1, generator=generator).squeeze(1).tolist()
    return tuple(SKIP if c == config.num_choices else c for c in drawn)


# ----------------------------------------------------------------------------- building blocks


def _se_layer(config: SupernetConfig) -> partial:
    # MobileNetV3's SE: ReLU inside, hard-sigmoid gate, reduced width a multiple of 8 of the expanded width.
    # timm's plain-op HardSigmoid, not nn.Hardsigmoid: the latter has no double backward, which the
    # bilevel meta update needs.
    return partial(
        SqueezeExcite,
        rd_ratio=config.se_ratio,
        rd_round_fn=make_divisible,
        gate_layer=HardSigmoid,
        force_act_layer=nn.ReLU,
    )


def _make_stem(config: SupernetConfig) -> nn.Sequential:
    return nn.Sequential(
        ConvNormAct(config.in_chans, config.stem_chs, 3, stride=2, act_layer=nn.SiLU),
        DepthwiseSeparableConv(config.stem_chs, config.stem_chs, 3, act_layer=nn.SiLU, se_layer=_se_layer(config)),
    )


def _make_op(config: SupernetConfig, in_chs: int, out_chs: int, stride: int, choice: int) -> InvertedResidual:
    kernel_size, exp_ratio = config.choices[choice]
    return InvertedResidual(
        in_chs,
        out_chs,
        dw_kernel_size=kernel_size,
        stride=stride,
        exp_ratio=exp_ratio,
        act_layer=nn.SiLU,
        se_layer=_se_layer(config),
    )


class Head(nn.Module):
    """conv 1x1 + BN + Swish, global average pool, optional conv 1x1 + Swish, dropout, linear."""

    def __init__(self, config: SupernetConfig, in_chs: int, num_classes: int) -> None:
        super().__init__()
        self.conv_head = ConvNormAct(in_chs, config.head_chs, 1, act_layer=nn.SiLU)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        if config.num_features:
            # MobileNetV3 puts the widest 1x1 conv after pooling, where it is cheap; no BN there.
            self.conv_features = nn.Conv2d(config.head_chs, config.num_features, 1, bias=True)
            self.act = nn.SiLU(inplace=True)
        else:
            self.conv_features = nn.Identity()
            self.act = nn.Identity()
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(config.drop_rate)
        self.classifier = nn.Linear(config.num_features or config.head_chs, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(self.conv_head(x))
        x = self.flatten(self.act(self.conv_features(x)))
        return x if pre_logits else self.classifier(self.drop(x))


class ChoiceLayer(nn.Module):
    """One searched layer: all candidate ops side by side; ``forward`` runs the chosen one."""

    def __init__(self, config: SupernetConfig, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.ops = nn.ModuleList(_make_op(config, in_chs, out_chs, stride, c) for c in range(config.num_choices))

    def forward(self, x: torch.Tensor, choice: int) -> torch.Tensor:
        return self.ops[choice](x)


# ----------------------------------------------------------------------------- supernet and path model


class Supernet(nn.Module):
    """Weight-sharing one-shot supernet; ``supernet(x, path)`` runs one path.

    Parameters are ``stem.*``, ``blocks.{stage}.{layer}.ops.{choice}.*`` and ``head.*``; the same
    op in a ``PathModel`` is ``blocks.{stage}.{layer}.*``.
    """

    def __init__(self, config: SupernetConfig | None = None, num_classes: int = 1000) -> None:
        super().__init__()
        self.config = config = config or SupernetConfig()
        self.num_classes = num_classes
        self.stem = _make_stem(config)
        stages: list[list[ChoiceLayer]] = [[] for _ in config.stage_chs]
        for stage, in_chs, out_chs, stride in config.layer_specs():
            stages[stage].append(ChoiceLayer(config, in_chs, out_chs, stride))
        self.blocks = nn.ModuleList(nn.ModuleList(layers) for layers in stages)
        self.head = Head(config, config.stage_chs[-1], num_classes)

    def sample_path(self, generator: torch.Generator | None = None, weights: torch.Tensor | None = None) -> Path:
        """A random path (see module-level ``sample_path``)."""
        return sample_path(self.config, generator, weights)

    def forward_features(self, x: torch.Tensor, path: Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
        choices = iter(normalize_path(self.config, path))
        x = self.stem(x)
        for stage in self.blocks:
            for layer in stage:
                choice = next(choices)
                if choice != SKIP:
                    x = layer(x, choice)
        return x

    def forward(self, x: torch.Tensor, path: Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
        return self.head(self.forward_features(x, path))


class PathModel(nn.Module):
    """A standalone network for one path: ``stem``, ``blocks`` (one ``nn.Sequential`` per stage), ``head``.

    Skipped layers are left out: ``config`` and ``path`` are the ``compact`` ones (``supernet_path``
    keeps the path as given, on the config given).
    """

    def __init__(
        self, config: SupernetConfig, path: Sequence[int] | Sequence[Sequence[int]], num_classes: int = 1000
    ) -> None:
        super().__init__()
        self.supernet_path = normalize_path(config, path)
        self.config, self.path = config, path = compact(config, path)
        self.num_classes = num_classes
        self.stem = _make_stem(config)
        stages: list[list[nn.Module]] = [[] for _ in config.stage_chs]
        for (stage, in_chs, out_chs, stride), choice in zip(config.layer_specs(), path, strict=True):
            stages[stage].append(_make_op(config, in_chs, out_chs, stride, choice))
        self.blocks = nn.Sequential(*(nn.Sequential(*layers) for layers in stages))
        self.head = Head(config, config.stage_chs[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_path_model(
    config: SupernetConfig, path: Sequence[int] | Sequence[Sequence[int]], num_classes: int = 1000
) -> PathModel:
    """A freshly initialized ``PathModel``; ``export``'s state dicts load into it."""
    return PathModel(config, path, num_classes)


def config_from_dict(fields: dict[str, Any] | None = None, tiny: bool = False) -> SupernetConfig:
    """``SupernetConfig`` fields over the defaults (or over ``SupernetConfig.tiny()``); lists become tuples."""
    base = SupernetConfig.tiny() if tiny else SupernetConfig()
    known = {f.name for f in dataclasses.fields(SupernetConfig)}
    unknown = sorted(set(fields or {}) - known)
    if unknown:
        raise ValueError(f"unknown supernet config field(s) {unknown}; expected some of {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in (fields or {}).items()}
    return dataclasses.replace(base, **values)


def _no_timm_extras(name: str, pretrained: bool, kwargs: dict[str, Any]) -> None:
    """timm passes its own keywords (meaningless here); anything else is an error, as are pretrained weights."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    if kwargs:
        raise TypeError(f"{name}: unexpected keyword argument(s) {sorted(kwargs)}")
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights: load them from a checkpoint")


@register_model
def cream_supernet(
    pretrained: bool = False,
    *,
    config: dict[str, Any] | None = None,
    tiny: bool = False,
    num_classes: int = 1000,
    **kwargs: Any,
) -> Supernet:
    """timm entry point of the supernet: ``config`` holds ``SupernetConfig`` fields, over the defaults or over
    ``SupernetConfig.tiny()`` with ``tiny=True``."""
    _no_timm_extras("cream_supernet", pretrained, kwargs)
    return Supernet(config_from_dict(config, tiny), num_classes)


@register_model
def cream_path(
    pretrained: bool = False,
    *,
    path: Sequence[int] | Sequence[Sequence[int]],
    config: dict[str, Any] | None = None,
    tiny: bool = False,
    num_classes: int = 1000,
    drop_rate: float | None = None,
    **kwargs: Any,
) -> PathModel:
    """timm entry point of a standalone path model: ``path`` (flat or nested), ``config`` (``SupernetConfig``
    fields, over the defaults or over ``SupernetConfig.tiny()`` with ``tiny=True``). Weights come from a
    checkpoint (e.g. an ``export``ed path saved with safetensors); there are no pretrained ones."""
    _no_timm_extras("cream_path", pretrained, kwargs)
    cfg = config_from_dict(config, tiny)
    if drop_rate is not None:
        cfg = dataclasses.replace(cfg, drop_rate=drop_rate)
    return build_path_model(cfg, path, num_classes)


@torch.no_grad()
def export(supernet: Supernet, path: Sequence[int] | Sequence[Sequence[int]]) -> PathModel:
    """Copy ``path``'s weights (and BN statistics) out of ``supernet`` into a standalone ``PathModel``,
    on the supernet's device and dtype and in its train/eval mode."""
    config = supernet.config
    path = normalize_path(config, path)
    ref = next(supernet.parameters())
    model = build_path_model(config, path, supernet.num_classes).to(device=ref.device, dtype=ref.dtype)
    model.stem.load_state_dict(supernet.stem.state_dict())
    layers = [layer for stage in supernet.blocks for layer in stage]
    chosen_ops = (layer.ops[choice] for layer, choice in zip(layers, path, strict=True) if choice != SKIP)
    target_ops = (op for stage in model.blocks for op in stage)
    for chosen, op in zip(chosen_ops, target_ops, strict=True):
        op.load_state_dict(chosen.state_dict())
    model.head.load_state_dict(supernet.head.state_dict())
    return model.train(supernet.training)


# ----------------------------------------------------------------------------- FLOPs


def _conv_out(size: int, kernel_size: int, stride: int) -> int:
    # timm's default padding ('') is symmetric get_padding(); the output size follows nn.Conv2d's formula.
    return (size + 2 * get_padding(kernel_size, stride) - kernel_size) // stride + 1


def _conv_flops(in_chs: int, out_chs: int, kernel_size: int, out_hw: int, groups: int = 1) -> int:
    return 2 * out_chs * (in_chs // groups) * kernel_size * kernel_size * out_hw


def _se_flops(chs: int, config: SupernetConfig) -> int:
    rd_chs = make_divisible(chs * config.se_ratio)
    return _conv_flops(chs, rd_chs, 1, 1) + _conv_flops(rd_chs, chs, 1, 1)  # on the pooled 1x1 map


def path_flops(
    config: SupernetConfig,
    path: Sequence[int] | Sequence[Sequence[int]],
    img_size: int | tuple[int, int] = 224,
    num_classes: int = 1000,
) -> int:
    """FLOPs of one image through ``path`` (2 per multiply-add, as ``FlopCounterMode``), from shapes only."""
    config, path = compact(config, path)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size

    # stem: conv 3x3 s2, then depth-wise 3x3 + SE + point-wise 1x1
    h, w = _conv_out(h, 3, 2), _conv_out(w, 3, 2)
    c = config.stem_chs
    flops = _conv_flops(config.in_chans, c, 3, h * w)
    flops += _conv_flops(c, c, 3, h * w, groups=c) + _se_flops(c, config) + _conv_flops(c, c, 1, h * w)

    for (_, in_chs, out_chs, stride), choice in zip(config.layer_specs(), path, strict=True):
        kernel_size, exp_ratio = config.choices[choice]
        mid_chs = make_divisible(in_chs * exp_ratio)
        flops += _conv_flops(in_chs, mid_chs, 1, h * w)  # expansion, at the input resolution
        h, w = _conv_out(h, kernel_size, stride), _conv_out(w, kernel_size, stride)
        flops += _conv_flops(mid_chs, mid_chs, kernel_size, h * w, groups=mid_chs)
        flops += _se_flops(mid_chs, config)
        flops += _conv_flops(mid_chs, out_chs, 1, h * w)

    flops += _conv_flops(config.stage_chs[-1], config.head_chs, 1, h * w)
    if config.num_features:
        flops += _conv_flops(config.head_chs, config.num_features, 1, 1)
    flops += 2 * (config.num_features or config.head_chs) * num_classes
    return flops


# ----------------------------------------------------------------------------- the published architectures


@dataclass(frozen=True)
class PublishedArch:
    """One of the six architectures of Cream's README: its choices, one tuple per stage (each stage as deep
    as its tuple), the input size of its retrain config, and the README's figures."""

    stages: tuple[tuple[int, ...], ...]
    img_size: int
    mmacs: int  # the README's "FLOPs" column: millions of multiply-adds at img_size
    top1: float  # ImageNet-1k top-1 / top-5 (%), as the README reports them
    top5: float

    @property
    def config(self) -> SupernetConfig:
        return SupernetConfig(stage_depths=tuple(len(stage) for stage in self.stages))


# The reference's retrain script's architecture lists (without their fixed stem and head entries) and the
# input sizes it sets for them. Their stage depths are the lists' lengths: the small models run fewer layers
# than the 4-deep supernet; cream_481 runs 5 layers in stage 2 and cream_604 5 or 6 per stage, so these two
# are not paths of the default supernet (a search for them needs a deeper one: `stage_depths`).
PUBLISHED: dict[str, PublishedArch] = {
    "cream_14": PublishedArch(((3,), (3, 3), (3, 3), (3,), (3,)), 64, 14, 53.8, 77.2),
    "cream_43": PublishedArch(((3,), (3, 1), (3, 1), (3, 3, 3), (3, 3)), 96, 43, 66.3, 86.7),
    "cream_114": PublishedArch(((3,), (3, 3), (3, 3), (3, 3, 3), (3, 3)), 160, 114, 72.8, 90.8),
    "cream_287": PublishedArch(((3,), (3, 3), (3, 1, 3), (3, 3, 3, 3), (3, 3, 3)), 224, 287, 77.6, 93.3),
    "cream_481": PublishedArch(
        ((3, 4, 3, 1), (3, 2, 3, 0), (3, 3, 3, 1, 1), (3, 3, 3, 3), (3, 3, 3, 3)), 224, 481, 79.2, 94.2
    ),
    "cream_604": PublishedArch(
        ((3, 3, 2, 3, 3), (3, 2, 3, 2, 3), (3, 2, 3, 2, 3), (3, 3, 2, 2, 3, 3), (3, 3, 2, 3, 3, 3)),
        224,
        604,
        80.0,
        94.7,
    ),
}

# timm registers these with the entry points below (timm.models.get_pretrained_cfg, model.pretrained_cfg,
# timm.data.resolve_data_config). The retrain script evaluates with a bicubic resize to img_size / 0.875
# and a centre crop. There are no weights.
default_cfgs = {
    name: {
        "input_size": (3, arch.img_size, arch.img_size),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "num_classes": 1000,
        "first_conv": "stem.0.conv",
        "classifier": "head.classifier",
    }
    for name, arch in PUBLISHED.items()
}


def _published_entry(name: str) -> Callable[..., PathModel]:
    """The timm entry point of a published architecture (``drop_rate``: dropout before the classifier,
    0.2 in the reference's retrain configs)."""
    arch = PUBLISHED[name]

    def entry(pretrained: bool = False, *, num_classes: int = 1000, drop_rate: float = 0.0, **kwargs: Any) -> PathModel:
        _no_timm_extras(name, pretrained, kwargs)
        model = build_path_model(dataclasses.replace(arch.config, drop_rate=drop_rate), arch.stages, num_classes)
        model.pretrained_cfg = dict(default_cfgs[name], num_classes=num_classes)
        return model

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"Cream's {arch.mmacs}M multiply-add model at {arch.img_size}x{arch.img_size} ({arch.top1}% top-1)."
    return entry


for _name in PUBLISHED:
    register_model(_published_entry(_name))
