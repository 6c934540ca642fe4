"""MiniViT weight multiplexing for timm ViT/DeiT and Swin models, as the reference (microsoft/Cream, MiniViT) builds them.

MiniViT (Zhang et al., CVPR 2022) compresses a vision transformer by letting consecutive blocks share one set of
qkv, attention-projection and MLP (fc1, fc2) weights. Every block keeps its own LayerNorms and its own small
*weight transformations*, so the blocks of a group still compute different functions:

- attention: a heads x heads linear mix of the attention logits before the softmax and another of the attention
  probabilities after it (`AttentionHeadMix`): without bias in Mini-DeiT (the reference's 1x1 Conv2d), with bias
  in Mini-Swin (its `nn.Linear(heads, heads)`);
- Swin only, between attention and MLP (`DepthwiseConvTransform`): the residual stream is replaced by its
  LayerNorm and a 7x7 depth-wise convolution is added around it, `x = LN(x); x = x + DWConv(x)`.

Initialisation follows the reference (`transform_init="reference"`): head mixes drawn from a truncated normal
(std 0.02, bias 0), the depth-wise conv at PyTorch's default. `transform_init="identity"` (a toolkit option) starts
the mixes at the identity and the conv at zero, so the attention computes what its shared weights compute and the
MLP transformation reduces to its LayerNorm.

Mini-Swin also shares the relative-position bias table within a group (the reference has one WindowAttention per
group). Mini-DeiT is not a DeiT with shared weights only: it has no class token (the LayerNorm'd tokens are
average-pooled) and its attention carries iRPE (`students.irpe`: contextual product method on keys, one table
shared by the heads, ratio 1.9), one encoding per block.

Sharing is real: the shared `nn.Linear` modules are the same objects in every block of a group, so each weight is a
single `nn.Parameter` that `model.parameters()` and an optimizer see once and whose `.grad` is the sum over the
blocks using it. Use `save_minivit` / `load_minivit` (safetensors' `save_model` / `load_model`, which store a shared
tensor once) for checkpoints; `safetensors.torch.save_file(model.state_dict())` refuses shared tensors. A plain
`torch.save(model.state_dict())` / `load_state_dict` round-trip works too.

    model = timm.create_model("mini_deit_small_patch16_224", num_classes=100)  # after `import students.minivit`
    model = multiplex(timm.create_model("swin_tiny_patch4_window7_224"), share=[2, 2, 6, 2])

Registered configurations (1000 classes; `share` is the group size per stage; paper: the MiniViT README):

    name                                 share          params    paper   unshared timm base
    mini_deit_tiny_patch16_224           [2]            3.09M     3M      5.72M
    mini_deit_small_patch16_224          [2]            11.45M    11M     22.05M
    mini_deit_base_patch16_224           [2]            44.10M    44M     86.57M
    mini_deit_base_patch16_384           [2]            44.39M    44M     86.86M
    mini_swin_tiny_patch4_window7_224    [2, 2, 6, 2]   12.00M    12M     28.29M
    mini_swin_small_patch4_window7_224   [2, 2, 2, 2]   26.45M    26M     49.61M
    mini_swin_base_patch4_window7_224    [2, 2, 2, 2]   46.42M    46M     87.77M

Mini-Swin-T shares whole stages (the reference's SEPARATE_LAYERNUM_LIST [1, 1, 1, 1]); Mini-Swin-S/B share pairs
in every stage ([1, 1, 9, 1]: one group for each 2-block stage, nine pairs in the 18-block stage).

Where this differs from the reference, on purpose: the reference also applies the shifted-window attention mask
to the unshifted blocks of a group (it passes the group's mask whatever the shift); here, as Swin defines it, only
shifted blocks are masked by default, and `mask_unshifted=True` reproduces the reference (e.g. for its released
weights).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table, to_2tuple, trunc_normal_
from timm.layers.attention import Attention
from timm.models import register_model
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    get_relative_position_index,
)
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .irpe import IRPEAttention, IRPEConfig

__all__ = [
    "MINI_DEIT_RPE",
    "AttentionHeadMix",
    "DepthwiseConvTransform",
    "MultiplexedAttention",
    "MultiplexedSwinBlock",
    "MultiplexedWindowAttention",
    "load_minivit",
    "multiplex",
    "save_minivit",
]

# Sub-modules of a block that the blocks of a group share (attn.gate only exists on gated timm attention).
SHARED_MODULES = ("attn.qkv", "attn.proj", "attn.gate", "mlp.fc1", "mlp.fc2")
# The reference's Mini-DeiT iRPE (mini_deit_models.get_deit_rpe_config).
MINI_DEIT_RPE = IRPEConfig(ratio=1.9, mode="contextual", shared_head=True, skip=0, on="k")

ShareSpec = int | Sequence[int]
StateSource = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike
TransformInit = Literal["reference", "identity"]
TRANSFORM_INITS = ("reference", "identity")


class AttentionHeadMix(nn.Module):
    """A per-block heads x heads linear mix of (B, heads, N, N) attention maps: out[:, g] = sum_h W[g, h] in[:, h]
    (+ b[g]), the reference's 1x1 Conv2d over heads (Mini-DeiT, no bias) or Linear(heads, heads) (Mini-Swin).

    init "reference": W from a truncated normal with std 0.02, b = 0; "identity": W = I, b = 0.
    """

    def __init__(
        self,
        num_heads: int,
        bias: bool = False,
        init: TransformInit = "reference",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_heads, num_heads, **dd))
        self.bias = nn.Parameter(torch.empty(num_heads, **dd)) if bias else None
        self.reset_parameters(init)

    def reset_parameters(self, init: TransformInit = "reference") -> None:
        if init == "identity":
            with torch.no_grad():
                self.weight.copy_(torch.eye(self.weight.shape[0]))
        else:
            trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("gh,bhnm->bgnm", self.weight, attn)
        return out if self.bias is None else out + self.bias[:, None, None]


class DepthwiseConvTransform(nn.Module):
    """Mini-Swin's per-block MLP weight transformation on (B, H, W, C) maps: y = LayerNorm(x); y + DWConv7x7(y).

    The reference replaces the residual stream by its LayerNorm here (the MLP's own residual then starts from y),
    so this is not the identity even with a zero conv. init "reference": PyTorch's default conv init (the
    reference leaves it); "identity": conv weight and bias zero, i.e. the transformation starts as the LayerNorm.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        init: TransformInit = "reference",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(dim, **dd)
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, **dd)
        self.reset_parameters(init)

    def reset_parameters(self, init: TransformInit = "reference") -> None:
        self.norm.reset_parameters()
        if init == "identity":
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)
        else:
            self.conv.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x + self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class MultiplexedAttention(IRPEAttention):
    """ViT self-attention over possibly shared qkv / proj Linear modules, with the block's own head mixes (no bias,
    as Mini-DeiT) and optional iRPE (`students.irpe.IRPEAttention`, whose forward this is).

    Replaces timm's `Attention` (same sub-module names, so unshared weights keep their state-dict keys).
    """

    def __init__(self, *args: Any, transform_init: TransformInit = "reference", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        dd = {"device": self.qkv.weight.device, "dtype": self.qkv.weight.dtype}
        self.logit_mix = AttentionHeadMix(self.num_heads, init=transform_init, **dd)
        self.prob_mix = AttentionHeadMix(self.num_heads, init=transform_init, **dd)


class MultiplexedWindowAttention(nn.Module):
    """Swin window attention over possibly shared qkv / proj Linear modules and relative position bias table, with
    the block's own head mixes (with bias, as Mini-Swin).

    Replaces timm's `WindowAttention`. The relative position bias is added to the logits before the pre-softmax
    mix, the shift mask after it (the reference's order).
    """

    def __init__(
        self,
        qkv: nn.Linear,
        proj: nn.Linear,
        num_heads: int,
        window_size: int | tuple[int, int] = 7,
        relative_position_bias_table: nn.Parameter | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        transform_init: TransformInit = "reference",
    ) -> None:
        super().__init__()
        dd = {"device": qkv.weight.device, "dtype": qkv.weight.dtype}
        self.window_size = to_2tuple(window_size)
        win_h, win_w = self.window_size
        self.window_area = win_h * win_w
        self.num_heads = num_heads
        self.attn_dim = qkv.out_features // 3
        self.scale = (self.attn_dim // num_heads) ** -0.5
        if relative_position_bias_table is None:
            relative_position_bias_table = nn.Parameter(torch.empty((2 * win_h - 1) * (2 * win_w - 1), num_heads, **dd))
            trunc_normal_(relative_position_bias_table, std=0.02)
        self.relative_position_bias_table = relative_position_bias_table
        self.register_buffer(
            "relative_position_index",
            torch.empty(self.window_area, self.window_area, device=dd["device"], dtype=torch.long),
            persistent=False,
        )
        self._init_buffers()

        self.qkv = qkv
        self.qkv_tap = nn.Identity()  # per-block hook point, see IRPEAttention
        self.logit_mix = AttentionHeadMix(num_heads, bias=True, init=transform_init, **dd)
        self.prob_mix = AttentionHeadMix(num_heads, bias=True, init=transform_init, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = proj
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(
        cls, attn: WindowAttention, transform_init: TransformInit = "reference"
    ) -> MultiplexedWindowAttention:
        """Wrap the modules and relative position bias of a timm `WindowAttention` (no weights are copied)."""
        if not isinstance(attn, WindowAttention):
            raise TypeError(f"expected timm WindowAttention, got {type(attn).__name__}")
        return cls(
            attn.qkv,
            attn.proj,
            attn.num_heads,
            window_size=attn.window_size,
            relative_position_bias_table=attn.relative_position_bias_table,
            attn_drop=attn.attn_drop.p,
            proj_drop=attn.proj_drop.p,
            transform_init=transform_init,
        )

    def _init_buffers(self) -> None:
        index = get_relative_position_index(*self.window_size, device=self.relative_position_index.device)
        self.relative_position_index.copy_(index)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the relative position index (timm calls this after meta-device initialisation)."""
        self._init_buffers()

    def set_window_size(self, window_size: int | tuple[int, int]) -> None:
        """Change the window size, resampling the relative position bias table (called by Swin's set_input_size).

        The table may be shared by the blocks of a group: it is resized in place, once (the first block of the
        group to be called finds it at the old size, the others at the new one), so it stays one Parameter.
        """
        window_size = to_2tuple(window_size)
        if window_size == self.window_size:
            return
        old_window_size, self.window_size = self.window_size, window_size
        win_h, win_w = window_size
        self.window_area = win_h * win_w
        table = self.relative_position_bias_table
        new_shape = ((2 * win_h - 1) * (2 * win_w - 1), self.num_heads)
        if tuple(table.shape) != new_shape:
            with torch.no_grad():
                table.data = resize_rel_pos_bias_table(
                    table, new_window_size=window_size, new_bias_shape=new_shape, old_window_size=old_window_size
                )
        self.register_buffer(
            "relative_position_index",
            get_relative_position_index(win_h, win_w, device=table.device),
            persistent=False,
        )

    def _rel_pos_bias(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (num_windows * B, N, C); mask: (num_windows, N, N) of 0 / -100, or None."""
        B_, N, _ = x.shape
        qkv = self.qkv_tap(self.qkv(x)).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)

        attn = self.logit_mix((q * self.scale) @ k.transpose(-2, -1) + self._rel_pos_bias())
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.prob_mix(attn.softmax(dim=-1))
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class MultiplexedSwinBlock(SwinTransformerBlock):
    """Swin block with multiplexed window attention and a `DepthwiseConvTransform` between attention and MLP:

        x = x + drop_path(attention(norm1(x)));  x = LN(x);  x = x + DWConv(x);  x = x + drop_path(mlp(norm2(x)))

    `from_block` converts an existing timm block in place by re-classing it: `SwinTransformerBlock.forward` has no
    hook point between its two residual branches, and subclassing reuses timm's window, shift, padding and mask
    logic unchanged while keeping timm's state-dict keys.
    """

    mlp_transform: DepthwiseConvTransform
    # The reference's quirk, off by default: an unshifted block gets the shifted layout's attention mask too.
    mask_unshifted: bool = False

    def __init__(self, *args: Any, transform_init: TransformInit = "reference", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_transformations(transform_init)

    def get_attn_mask(
        self, x: torch.Tensor | None = None, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor | None:
        """timm's shift mask; with `mask_unshifted`, an unshifted block in a stage that shifts gets the mask of
        the shifted layout, as the reference passes its group's mask to every repeat (see `set_mask_unshifted`)."""
        if not self.mask_unshifted or any(self.shift_size):
            return super().get_attn_mask(x, device, dtype)
        own = self.shift_size
        res, win = self.input_resolution, self.window_size
        self.shift_size = tuple(w // 2 if r > w else 0 for r, w in zip(res, win, strict=True))
        try:
            return super().get_attn_mask(x, device, dtype)
        finally:
            self.shift_size = own

    def set_mask_unshifted(self, enabled: bool) -> None:
        """Reproduce (True) or not (False, Swin's definition) the reference's mask on unshifted blocks."""
        self.mask_unshifted = enabled
        self._init_buffers()

    @classmethod
    def from_block(
        cls, block: SwinTransformerBlock, transform_init: TransformInit = "reference"
    ) -> MultiplexedSwinBlock:
        """Convert `block` in place (its weights become this block's own; `multiplex` then ties them)."""
        if isinstance(block, cls) or not isinstance(block, SwinTransformerBlock):
            raise TypeError(f"expected a plain timm SwinTransformerBlock, got {type(block).__name__}")
        block.__class__ = cls
        block._add_transformations(transform_init)
        return block

    def _add_transformations(self, transform_init: TransformInit) -> None:
        weight = self.norm1.weight
        self.attn = MultiplexedWindowAttention.from_timm(self.attn, transform_init)
        self.mlp_transform = DepthwiseConvTransform(
            self.dim, init=transform_init, device=weight.device, dtype=weight.dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = self.mlp_transform(x)
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


def _stages(model: nn.Module) -> list[list[nn.Module]]:
    """The transformer blocks of a timm ViT (one stage) or Swin (one list per stage)."""
    if isinstance(model, VisionTransformer):
        return [list(model.blocks)]
    if isinstance(model, SwinTransformer):
        return [list(stage.blocks) for stage in model.layers]
    raise TypeError(f"multiplex supports timm VisionTransformer and SwinTransformer, got {type(model).__name__}")


def _group_sizes(share: ShareSpec, num_stages: int) -> tuple[int, ...]:
    sizes = (share,) if isinstance(share, int) else tuple(share)
    if len(sizes) != num_stages:
        raise ValueError(f"share needs one group size per stage ({num_stages}), got {share!r}")
    if any(size < 1 for size in sizes):
        raise ValueError(f"group sizes must be >= 1, got {share!r}")
    return sizes


def _state_dict_from(source: StateSource) -> Mapping[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, Mapping):
        return source
    # safetensors, or torch.load(weights_only=True): never unpickles objects; the model's weights, not an EMA's
    return timm.models.load_state_dict(os.fspath(source), use_ema=False, weights_only=True)


def _check_block(block: nn.Module) -> None:
    if isinstance(block, MultiplexedSwinBlock) or isinstance(getattr(block, "attn", None), MultiplexedAttention):
        raise TypeError("model is already multiplexed")
    if not isinstance(block.attn, Attention | WindowAttention):
        raise TypeError(f"expected timm Attention or WindowAttention, got {type(block.attn).__name__}")
    if not (
        isinstance(getattr(block.mlp, "fc1", None), nn.Linear)
        and isinstance(getattr(block.mlp, "fc2", None), nn.Linear)
    ):
        raise TypeError(f"expected an MLP with fc1 / fc2 Linear layers, got {type(block.mlp).__name__}")


def _convert_block(block: nn.Module, rpe: IRPEConfig | None, transform_init: TransformInit) -> None:
    if isinstance(block, SwinTransformerBlock):
        MultiplexedSwinBlock.from_block(block, transform_init)
    else:
        block.attn = MultiplexedAttention.from_timm(block.attn, rpe, transform_init=transform_init)


def _tie(block: nn.Module, first: nn.Module) -> None:
    """Point `block`'s shared sub-modules (and a Swin block's relative position bias table) at `first`'s: the
    group's first block, whose weights MiniViT keeps."""
    for path in SHARED_MODULES:
        parent_path, name = path.rsplit(".", 1)
        if getattr(first.get_submodule(parent_path), name, None) is not None:
            setattr(block.get_submodule(parent_path), name, first.get_submodule(path))
    if isinstance(block.attn, MultiplexedWindowAttention):
        table = first.attn.relative_position_bias_table
        if table.shape != block.attn.relative_position_bias_table.shape:
            raise ValueError("the blocks of a Swin group must have the same window size to share one bias table")
        block.attn.relative_position_bias_table = table


def multiplex(
    model: nn.Module,
    share: ShareSpec,
    init_from: StateSource | None = None,
    *,
    rpe: IRPEConfig | None = None,
    transform_init: TransformInit = "reference",
    mask_unshifted: bool = False,
) -> nn.Module:
    """Turn a timm ViT/DeiT or Swin into its weight-multiplexed MiniViT form, in place, and return it.

    Args:
        model: A plain (not yet multiplexed) timm `VisionTransformer` or `SwinTransformer`.
        share: Group size per stage (an int or [n] for ViT, one entry per stage for Swin): consecutive blocks of a
            group share qkv, attention projection and MLP weights (Swin: and the relative position bias table);
            a stage's last group may be shorter.
        init_from: Optional trained, non-multiplexed weights of the same architecture (module, state dict or
            checkpoint path), loaded before multiplexing: each group keeps its first block's shared weights and
            every block its own norms. A toolkit option: the reference trains MiniViT students from scratch.
        rpe: ViT only: give each block iRPE attention with this setting (`skip` becomes the model's prefix-token
            count); the tables are per block, like the head mixes.
        transform_init: "reference" (truncated-normal head mixes, default-initialised conv) or "identity".
        mask_unshifted: Swin only: also mask the unshifted blocks with the shifted layout's mask, as the reference
            does (a quirk of its code, off by default: Swin masks shifted windows only).
    """
    if transform_init not in TRANSFORM_INITS:
        raise ValueError(f"transform_init must be one of {TRANSFORM_INITS}, got {transform_init!r}")
    stages = _stages(model)
    sizes = _group_sizes(share, len(stages))
    if rpe is not None:
        if not isinstance(model, VisionTransformer):
            raise TypeError("rpe (iRPE) is for timm VisionTransformer models")
        rpe = dataclasses.replace(rpe, skip=model.num_prefix_tokens)
    for block in itertools.chain.from_iterable(stages):  # check everything before changing anything
        _check_block(block)
    if init_from is not None:
        model.load_state_dict(_state_dict_from(init_from))
    for blocks, size in zip(stages, sizes, strict=True):
        for block in blocks:
            _convert_block(block, rpe, transform_init)
            if mask_unshifted and isinstance(block, MultiplexedSwinBlock):
                block.set_mask_unshifted(True)
        for start in range(0, len(blocks), size):
            group = blocks[start : start + size]
            for block in group[1:]:
                _tie(block, group[0])
    model.minivit_share = sizes
    return model


def load_finetune(model: VisionTransformer, source: StateSource) -> None:
    """Weights of the same architecture trained at another input size, as DeiT's `--finetune` loads them: the
    absolute position embedding is resampled (bicubic) to the model's patch grid, and a classifier head of
    another class count is left at the model's initialisation."""
    state = dict(_state_dict_from(source))
    own = model.state_dict()
    head = [key for key in ("head.weight", "head.bias") if key in state and state[key].shape != own[key].shape]
    for key in head:
        del state[key]
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"],
            new_size=list(model.patch_embed.grid_size),
            num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens,
            interpolation="bicubic",
            antialias=False,
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(head):
        raise ValueError(f"finetune_from: weights of another model (missing: {missing}, unexpected: {unexpected})")


def save_minivit(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a (multiplexed) model to safetensors, storing each shared tensor once."""
    safetensors.torch.save_model(model, os.fspath(path))


def load_minivit(
    model: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[list[str], list[str]]:
    """Load a checkpoint written by `save_minivit` into a model built with the same config; returns
    (missing, unexpected) keys."""
    return safetensors.torch.load_model(model, os.fspath(path), strict=strict, device=str(device))


def _create_mini(
    variant: str,
    base: str,
    default_share: ShareSpec,
    pretrained: bool = False,
    share: ShareSpec | None = None,
    init_from: StateSource | None = None,
    finetune_from: StateSource | None = None,
    transform_init: TransformInit = "reference",
    rpe: IRPEConfig | None = None,
    mask_unshifted: bool = False,
    **kwargs: Any,
) -> nn.Module:
    # timm.create_model passes pretrained cfgs for the *mini* name, which has none; the base model resolves its own.
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    model = timm.create_model(base, pretrained=pretrained, **kwargs)
    share = default_share if share is None else share
    model = multiplex(model, share, init_from, rpe=rpe, transform_init=transform_init, mask_unshifted=mask_unshifted)
    if finetune_from is not None:
        load_finetune(model, finetune_from)
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg = dict(model.pretrained_cfg, architecture=variant)
    return model


def _create_mini_deit(variant: str, base: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The reference's Mini-DeiT: no class token, LayerNorm then average pooling, iRPE, pairs sharing weights."""
    if pretrained:
        raise ValueError(
            f"{variant}: there are no pretrained weights to multiplex (the reference trains Mini-DeiT from scratch; "
            "DeiT's own weights have a class token this model does not)"
        )
    kwargs = {"class_token": False, "global_pool": "avg", "fc_norm": False, "rpe": MINI_DEIT_RPE} | kwargs
    if kwargs["rpe"] is False:  # timm.create_model drops None-valued kwargs: False turns iRPE off
        kwargs["rpe"] = None
    return _create_mini(variant, base, [2], **kwargs)


# Keyword args of the entrypoints below: `share` overrides the group sizes, `transform_init` the transformations'
# initialisation, `init_from` loads trained unshared weights before multiplexing, `finetune_from` a trained Mini
# model of another input size after it (Mini-DeiT: also `rpe`, an IRPEConfig, or False for none; Mini-Swin:
# `mask_unshifted`); everything else goes to the timm base model. For Mini-Swin, pretrained=True loads the unshared Swin's ImageNet weights and multiplexes them
# (a toolkit option, not a trained MiniViT).


@register_model
def mini_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Mini-DeiT-Ti (3M params): DeiT-Ti without class token, with iRPE, pairs of blocks sharing weights."""
    return _create_mini_deit("mini_deit_tiny_patch16_224", "deit_tiny_patch16_224", pretrained, **kwargs)


@register_model
def mini_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Mini-DeiT-S (11M params): DeiT-S without class token, with iRPE, pairs of blocks sharing weights."""
    return _create_mini_deit("mini_deit_small_patch16_224", "deit_small_patch16_224", pretrained, **kwargs)


@register_model
def mini_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Mini-DeiT-B (44M params): DeiT-B without class token, with iRPE, pairs of blocks sharing weights."""
    return _create_mini_deit("mini_deit_base_patch16_224", "deit_base_patch16_224", pretrained, **kwargs)


@register_model
def mini_deit_base_patch16_384(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Mini-DeiT-B at 384 px (44M params), fine-tuned from the 224 px model (`finetune_from`)."""
    return _create_mini_deit("mini_deit_base_patch16_384", "deit_base_patch16_384", pretrained, **kwargs)


@register_model
def mini_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Mini-Swin-T (12M params): Swin-T with every stage sharing one set of weights."""
    share = [2, 2, 6, 2]
    return _create_mini(
        "mini_swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224", share, pretrained, **kwargs
    )


@register_model
def mini_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Mini-Swin-S (26M params): Swin-S with pairs of blocks sharing weights in every stage."""
    share = [2, 2, 2, 2]
    return _create_mini(
        "mini_swin_small_patch4_window7_224", "swin_small_patch4_window7_224", share, pretrained, **kwargs
    )


@register_model
def mini_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Mini-Swin-B (46M params): Swin-B with pairs of blocks sharing weights in every stage."""
    share = [2, 2, 2, 2]
    return _create_mini(
        "mini_swin_base_patch4_window7_224", "swin_base_patch4_window7_224", share, pretrained, **kwargs
    )


# ---- the digits recipes' teacher ---------------------------------------------------------------------------


def tiny_deit_kwargs() -> dict[str, Any]:
    """A 32 px DeiT without class token (as Mini-DeiT: LayerNorm, then the 4 x 4 patch tokens averaged): 8 px
    patches, width 96, 6 blocks of 3 heads (0.69M params with 10 classes)."""
    return {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 96,
        "depth": 6,
        "num_heads": 3,
        "class_token": False,
        "global_pool": "avg",
        "fc_norm": False,
    }


def tiny_deit_teacher(num_classes: int = 10) -> VisionTransformer:
    """The digits recipes' teacher, `module:students.minivit:tiny_deit_teacher`: the model that
    `recipes/configs/minivit_digits_teacher.yaml` trains (`deit_tiny_patch16_224` with `tiny_deit_kwargs()`)."""
    return timm.create_model("deit_tiny_patch16_224", num_classes=num_classes, **tiny_deit_kwargs())
