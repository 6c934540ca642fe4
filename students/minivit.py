"""MiniViT weight multiplexing for timm ViT/DeiT and Swin models.

MiniViT (Zhang et al., CVPR 2022) compresses a vision transformer by letting consecutive blocks share one set of
qkv, attention-projection and MLP (fc1, fc2) weights. Every block keeps its own LayerNorms and its own small
*weight transformations*, so the blocks of a group still compute different functions:

- attention: a heads x heads linear mix of the attention logits before the softmax and another of the attention
  probabilities after it (`AttentionHeadMix`, identity-initialised);
- Swin only: a LayerNorm + 7x7 depth-wise convolution with a residual before the MLP (`DepthwiseConvTransform`,
  conv weight and bias zero-initialised so it starts as the identity).

Sharing is real: the shared `nn.Linear` modules are the same objects in every block of a group, so each weight is a
single `nn.Parameter` that `model.parameters()` and an optimizer see once and whose `.grad` is the sum over the
blocks using it. Use `save_minivit` / `load_minivit` (safetensors' `save_model` / `load_model`, which store a shared
tensor once) for checkpoints; `safetensors.torch.save_file(model.state_dict())` refuses shared tensors. A plain
`torch.save(model.state_dict())` / `load_state_dict` round-trip works too.

    model = multiplex(timm.create_model("deit_small_patch16_224"), share=[2], init_from="deit_s.pth")
    model = timm.create_model("mini_deit_small_patch16_224", num_classes=100)  # after `import students.minivit`

Registered configurations (1000 classes, 224 px; `share` is the group size per stage):

    name                                 share          params    paper   unshared timm base
    mini_deit_tiny_patch16_224           [2]            3.05M     3M      5.72M
    mini_deit_small_patch16_224          [2]            11.41M    11M     22.05M
    mini_deit_base_patch16_224           [2]            44.06M    44M     86.57M
    mini_swin_tiny_patch4_window7_224    [2, 2, 6, 2]   12.02M    12M     28.29M
    mini_swin_small_patch4_window7_224   [2, 2, 2, 2]   26.49M    26M     49.61M
    mini_swin_base_patch4_window7_224    [2, 2, 2, 2]   46.48M    46M     87.77M

Mini-Swin-T shares whole stages. For Mini-Swin-S/B, pairs in the deep (18-block) stage alone ([1, 1, 2, 1]) leave
34.13M / 60.05M; pairs in every stage (for the 2-block stages that is the whole stage) give the paper's 26M / 46M.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import safetensors.torch
import timm
import torch
from timm.layers import resize_rel_pos_bias_table, to_2tuple, trunc_normal_
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models import register_model
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    get_relative_position_index,
)
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = [
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

ShareSpec = int | Sequence[int]
StateSource = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike


class AttentionHeadMix(nn.Module):
    """A per-block heads x heads linear mix of (B, heads, N, N) attention maps, initialised to the identity."""

    def __init__(self, num_heads: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(num_heads, device=device, dtype=dtype))

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        # out[b, g] = sum_h weight[g, h] * attn[b, h]
        return torch.einsum("gh,bhnm->bgnm", self.weight, attn)


class DepthwiseConvTransform(nn.Module):
    """Mini-Swin's per-block MLP weight transformation: x + DWConv7x7(LayerNorm(x)) on (B, H, W, C) maps.

    The conv weight and bias are zero-initialised, so the transformation starts as the identity and a freshly
    multiplexed Swin computes what its shared weights compute; the conv still gets a gradient from the first step
    (its input LayerNorm(x) is non-zero) and the LayerNorm from the second.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(dim, **dd)
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + y


class MultiplexedAttention(nn.Module):
    """ViT self-attention over possibly shared qkv / proj Linear modules, with the block's own head mixes.

    Replaces timm's `Attention` (same sub-module names, so unshared weights keep their state-dict keys). Computes
    softmax(mix_pre(q k^T / sqrt(d)) + mask) -> mix_post -> @ v explicitly; the mixes rule out fused SDPA.
    """

    def __init__(
        self,
        qkv: nn.Linear,
        proj: nn.Linear,
        num_heads: int,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        norm: nn.Module | None = None,
        gate: nn.Linear | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        dd = {"device": qkv.weight.device, "dtype": qkv.weight.dtype}
        self.num_heads = num_heads
        self.attn_dim = qkv.out_features // 3
        self.head_dim = self.attn_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = qkv
        # A per-block hook point on the qkv output: hooks on `qkv` itself fire once per block sharing it.
        self.qkv_tap = nn.Identity()
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.logit_mix = AttentionHeadMix(num_heads, **dd)
        self.prob_mix = AttentionHeadMix(num_heads, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm if norm is not None else nn.Identity()
        self.gate = gate
        self.proj = proj
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, attn: Attention) -> MultiplexedAttention:
        """Wrap the modules of a timm `Attention` (no weights are copied)."""
        if not isinstance(attn, Attention):
            raise TypeError(f"expected timm Attention, got {type(attn).__name__}")
        return cls(
            attn.qkv,
            attn.proj,
            attn.num_heads,
            q_norm=attn.q_norm,
            k_norm=attn.k_norm,
            norm=getattr(attn, "norm", None),
            gate=getattr(attn, "gate", None),
            attn_drop=attn.attn_drop.p,
            proj_drop=attn.proj_drop.p,
        )

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv_tap(self.qkv(x)).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        attn = self.logit_mix((q * self.scale) @ k.transpose(-2, -1))
        # The mask goes in after the mix: mixing heads must not move masked logits back into range.
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.prob_mix(attn.softmax(dim=-1))
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim)

        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class MultiplexedWindowAttention(nn.Module):
    """Swin window attention over possibly shared qkv / proj Linear modules, with the block's own head mixes.

    Replaces timm's `WindowAttention`. The relative position bias table stays per block (it is tiny and is tied to
    the block's window layout); it is added to the logits before the pre-softmax mix, the shift mask after it.
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
        self.qkv_tap = nn.Identity()  # per-block hook point, see MultiplexedAttention
        self.logit_mix = AttentionHeadMix(num_heads, **dd)
        self.prob_mix = AttentionHeadMix(num_heads, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = proj
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, attn: WindowAttention) -> MultiplexedWindowAttention:
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
        )

    def _init_buffers(self) -> None:
        index = get_relative_position_index(*self.window_size, device=self.relative_position_index.device)
        self.relative_position_index.copy_(index)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the relative position index (timm calls this after meta-device initialisation)."""
        self._init_buffers()

    def set_window_size(self, window_size: int | tuple[int, int]) -> None:
        """Change the window size, resampling the relative position bias table (called by Swin's set_input_size)."""
        window_size = to_2tuple(window_size)
        if window_size == self.window_size:
            return
        old_window_size, self.window_size = self.window_size, window_size
        win_h, win_w = window_size
        self.window_area = win_h * win_w
        table = self.relative_position_bias_table
        with torch.no_grad():
            resized = resize_rel_pos_bias_table(
                table,
                new_window_size=window_size,
                new_bias_shape=((2 * win_h - 1) * (2 * win_w - 1), self.num_heads),
                old_window_size=old_window_size,
            )
        self.relative_position_bias_table = nn.Parameter(resized, requires_grad=table.requires_grad)
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
    """Swin block with multiplexed window attention and a `DepthwiseConvTransform` between attention and MLP.

    `from_block` converts an existing timm block in place by re-classing it: `SwinTransformerBlock.forward` has no
    hook point between its two residual branches, and subclassing reuses timm's window, shift, padding and mask
    logic unchanged while keeping timm's state-dict keys.
    """

    mlp_transform: DepthwiseConvTransform

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_transformations()

    @classmethod
    def from_block(cls, block: SwinTransformerBlock) -> MultiplexedSwinBlock:
        """Convert `block` in place (its weights become this block's own; `multiplex` then ties them)."""
        if isinstance(block, cls) or not isinstance(block, SwinTransformerBlock):
            raise TypeError(f"expected a plain timm SwinTransformerBlock, got {type(block).__name__}")
        block.__class__ = cls
        block._add_transformations()
        return block

    def _add_transformations(self) -> None:
        weight = self.norm1.weight
        self.attn = MultiplexedWindowAttention.from_timm(self.attn)
        self.mlp_transform = DepthwiseConvTransform(self.dim, device=weight.device, dtype=weight.dtype)

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
    return timm.models.load_state_dict(os.fspath(source))


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


def _convert_block(block: nn.Module) -> None:
    if isinstance(block, SwinTransformerBlock):
        MultiplexedSwinBlock.from_block(block)
    else:
        block.attn = MultiplexedAttention.from_timm(block.attn)


def _tie(block: nn.Module, first: nn.Module) -> None:
    """Point `block`'s shared sub-modules at `first`'s (the group's first block: MiniViT keeps its weights)."""
    for path in SHARED_MODULES:
        parent_path, name = path.rsplit(".", 1)
        if getattr(first.get_submodule(parent_path), name, None) is not None:
            setattr(block.get_submodule(parent_path), name, first.get_submodule(path))


def multiplex(model: nn.Module, share: ShareSpec, init_from: StateSource | None = None) -> nn.Module:
    """Turn a timm ViT/DeiT or Swin into its weight-multiplexed MiniViT form, in place, and return it.

    Args:
        model: A plain (not yet multiplexed) timm `VisionTransformer` or `SwinTransformer`.
        share: Group size per stage (an int or [n] for ViT, one entry per stage for Swin): consecutive blocks of a
            group share qkv, attention projection and MLP weights; a stage's last group may be shorter.
        init_from: Optional trained, non-multiplexed weights of the same architecture (module, state dict or
            checkpoint path), loaded before multiplexing. Each group keeps its first block's shared weights and
            every block its own norms and position biases, as MiniViT initialises from its teacher.
    """
    stages = _stages(model)
    sizes = _group_sizes(share, len(stages))
    for block in itertools.chain.from_iterable(stages):  # check everything before changing anything
        _check_block(block)
    if init_from is not None:
        model.load_state_dict(_state_dict_from(init_from))
    for blocks, size in zip(stages, sizes, strict=True):
        for block in blocks:
            _convert_block(block)
        for start in range(0, len(blocks), size):
            group = blocks[start : start + size]
            for block in group[1:]:
                _tie(block, group[0])
    model.minivit_share = sizes
    return model


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
    **kwargs: Any,
) -> nn.Module:
    # timm.create_model passes pretrained cfgs for the *mini* name, which has none; the base model resolves its own.
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    model = timm.create_model(base, pretrained=pretrained, **kwargs)
    model = multiplex(model, default_share if share is None else share, init_from=init_from)
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg = dict(model.pretrained_cfg, architecture=variant)
    return model


# pretrained=True on the entrypoints below loads the unshared base model's ImageNet weights and multiplexes them
# (MiniViT's starting point, not a trained MiniViT). Keyword args: `share` overrides the group sizes, `init_from`
# loads trained unshared weights before multiplexing, everything else goes to the timm base model.


@register_model
def mini_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Mini-DeiT-Ti (3M params): DeiT-Ti with pairs of blocks sharing weights."""
    return _create_mini("mini_deit_tiny_patch16_224", "deit_tiny_patch16_224", [2], pretrained, **kwargs)


@register_model
def mini_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Mini-DeiT-S (11M params): DeiT-S with pairs of blocks sharing weights."""
    return _create_mini("mini_deit_small_patch16_224", "deit_small_patch16_224", [2], pretrained, **kwargs)


@register_model
def mini_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Mini-DeiT-B (44M params): DeiT-B with pairs of blocks sharing weights."""
    return _create_mini("mini_deit_base_patch16_224", "deit_base_patch16_224", [2], pretrained, **kwargs)


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
    """A 32 px DeiT: 8 px patches (4 x 4 + 1 tokens), width 96, 6 blocks of 3 heads (0.69M params with 10 classes)."""
    return {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 3}


def tiny_deit_teacher(num_classes: int = 10) -> VisionTransformer:
    """The digits recipes' teacher, `module:students.minivit:tiny_deit_teacher`: the model that
    `recipes/configs/minivit_digits_teacher.yaml` trains (`deit_tiny_patch16_224` with `tiny_deit_kwargs()`)."""
    return timm.create_model("deit_tiny_patch16_224", num_classes=num_classes, **tiny_deit_kwargs())
