"""Pruned open_clip CLIP models (TinyCLIP's automatic inheritance): towers whose blocks differ in heads and MLP
width, built from a ``pruned_cfg``.

A pruned model is an ordinary open_clip ``CLIP`` whose blocks may differ in heads and MLP width, and whose
attention inner width (heads * head_dim) no longer equals the model width; open_clip's config schema cannot
say that, so its attention modules are ``PrunedAttention`` (same parameter names as ``nn.MultiheadAttention``)
and ``model.pruned_cfg`` holds the open_clip config plus per-layer shapes; ``create_pruned_model(cfg)`` builds
an empty model of that shape to load a saved state_dict into. ``tower_parts`` locates what pruning acts on in
a tower. The masks that decide what to prune are TinyCLIP's (``recipes.tinyclip.masks``).
"""

from __future__ import annotations

import warnings
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import VisionTransformer
from torch import nn

from .tinyclip import text_prefix, text_tower

__all__ = [
    "TOWERS",
    "PrunedAttention",
    "TowerParts",
    "attention_shape",
    "create_pruned_model",
    "multihead_self_attention",
    "owner_param",
    "tower_parts",
]

TOWERS = ("image", "text")

# Block parameters the masked forward and the pruning rules know about; anything else (qk-norm, scaled cosine
# attention, head scales, extra norms) would be silently ignored, so such blocks are refused.
_BLOCK_PARAMS = {
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ls_1.gamma",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
    "ls_2.gamma",
}


def multihead_self_attention(
    x: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor | None,
    num_heads: int,
    out_proj: nn.Linear,
    attn_mask: torch.Tensor | None = None,
    head_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch-first self-attention; the inner width is ``in_proj_weight.shape[0] // 3``, the heads split it evenly.

    ``head_scale`` ([num_heads]) multiplies each head's output before the output projection.
    """
    n, length, _ = x.shape
    if num_heads == 0:
        return out_proj(x.new_zeros(n, length, 0))  # only the output bias is left
    q, k, v = F.linear(x, in_proj_weight, in_proj_bias).view(n, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # True = may not attend, as in nn.MultiheadAttention
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
        attn_mask = attn_mask.to(q.dtype)
        if attn_mask.ndim == 3:  # [n * heads, L, L]
            attn_mask = attn_mask.view(n, num_heads, length, length)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if head_scale is not None:
        out = out * head_scale.to(out.dtype).view(1, -1, 1, 1)
    return out_proj(out.transpose(1, 2).reshape(n, length, -1))


class PrunedAttention(nn.Module):
    """Self-attention with ``num_heads * head_dim`` inner width, independent of the model width.

    Parameter names match ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``, ``out_proj``).
    ``mha_style`` makes it answer the way ``nn.MultiheadAttention`` does (``(output, None)``), as open_clip's
    ``ResidualAttentionBlock`` expects; otherwise it returns the output, like open_clip's ``Attention``.
    """

    def __init__(self, width: int, num_heads: int, head_dim: int, mha_style: bool = True, batch_first: bool = True):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.mha_style = mha_style
        self.batch_first = batch_first
        self.in_proj_weight = nn.Parameter(torch.randn(3 * inner, width) * width**-0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner))
        self.out_proj = nn.Linear(inner, width)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("PrunedAttention is self-attention only")
        x = query if self.batch_first else query.transpose(0, 1)
        out = multihead_self_attention(
            x, self.in_proj_weight, self.in_proj_bias, self.num_heads, self.out_proj, attn_mask
        )
        out = out if self.batch_first else out.transpose(0, 1)
        return (out, None) if self.mha_style else out


def attention_shape(attn: nn.Module) -> tuple[int, int]:
    """(heads, head_dim) of nn.MultiheadAttention, open_clip's Attention or PrunedAttention."""
    if getattr(attn, "in_proj_weight", None) is None:
        raise ValueError(f"{type(attn).__name__} has no packed in_proj_weight (separate q/k/v dims are not supported)")
    heads = attn.num_heads
    inner = attn.in_proj_weight.shape[0] // 3
    return heads, (inner // heads if heads else getattr(attn, "head_dim", 0))


@dataclass
class TowerParts:
    """The parts of one open_clip tower the masks act on."""

    name: str
    owner: nn.Module  # model.visual, or the module holding the text parts
    prefix: str  # state-dict prefix of `owner`
    blocks: nn.ModuleList
    norms: tuple[str, ...]  # owner-level LayerNorms that read the residual stream
    width: int
    # (owner-level parameter name, index of its residual-width dim, fold the hidden mask in?)
    width_params: tuple[tuple[str, int, bool], ...]
    fixed_params: tuple[str, ...]  # owner-level parameters no mask changes


def tower_parts(model: nn.Module, tower: str) -> TowerParts:
    """Locate a tower of an open_clip CLIP/CustomTextCLIP; raises for towers the masks do not support."""
    if tower == "image":
        visual = model.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise ValueError(
                f"pruning supports open_clip VisionTransformer image towers without attentional pooling, "
                f"not {type(visual).__name__}; mask only the text tower (towers=('text',))"
            )
        width = visual.class_embedding.shape[0]
        params = [("conv1.weight", 0, False), ("class_embedding", 0, False), ("positional_embedding", 1, False)]
        params += (
            [("ln_pre.weight", 0, True), ("ln_pre.bias", 0, True)] if isinstance(visual.ln_pre, nn.LayerNorm) else []
        )
        params += [("ln_post.weight", 0, True), ("ln_post.bias", 0, True)]
        params += [("proj", 0, False)] if visual.proj is not None else []
        parts = TowerParts(
            "image", visual, "visual.", visual.transformer.resblocks, ("ln_pre", "ln_post"), width, tuple(params), ()
        )
    elif tower == "text":
        owner = text_tower(model)
        if not hasattr(owner, "token_embedding") or not hasattr(owner, "transformer"):
            raise ValueError(f"pruning supports open_clip transformer text towers, not {type(owner).__name__}")
        width = owner.positional_embedding.shape[-1]
        params = [("token_embedding.weight", 1, False), ("positional_embedding", 1, False)]
        params += [("cls_emb", 0, False)] if getattr(owner, "cls_emb", None) is not None else []
        params += [("ln_final.weight", 0, True), ("ln_final.bias", 0, True)]
        fixed: tuple[str, ...] = ()
        if isinstance(owner.text_projection, nn.Linear):
            params += [("text_projection.weight", 1, False)]
            fixed = ("text_projection.bias",) if owner.text_projection.bias is not None else ()
        elif owner.text_projection is not None:
            params += [("text_projection", 0, False)]
        parts = TowerParts(
            "text", owner, text_prefix(model), owner.transformer.resblocks, ("ln_final",), width, tuple(params), fixed
        )
    else:
        raise ValueError(f"unknown tower {tower!r}; expected one of {TOWERS}")
    for i, block in enumerate(parts.blocks):
        names = {n for n, _ in block.named_parameters()}
        if not names <= _BLOCK_PARAMS:
            raise ValueError(
                f"{tower} block {i} has features pruning does not support: {sorted(names - _BLOCK_PARAMS)}"
            )
    return parts


def owner_param(parts: TowerParts, name: str) -> torch.Tensor:
    return parts.owner.get_parameter(name)


def create_pruned_model(cfg: dict[str, Any], device: torch.device | str | None = None) -> nn.Module:
    """An (untrained) open_clip model of the shape described by a ``pruned_cfg``, ready to load a state_dict."""
    cfg = deepcopy(cfg)
    shapes = cfg.pop("layer_shapes", {})
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    model_class = CustomTextCLIP if custom_text else CLIP
    # Head counts of the skeleton only need to divide the widths: its attention modules are replaced below.
    if "image" in shapes:
        cfg["vision_cfg"]["head_width"] = cfg["vision_cfg"]["width"]
    if "text" in shapes:
        cfg["text_cfg"]["heads"] = 1
    with torch.device(device or "cpu"), warnings.catch_warnings():
        # Layers left with no heads or no MLP units hold zero-size tensors, which torch's init warns about.
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        model = model_class(**cfg)
        for tower, shape in shapes.items():
            parts = tower_parts(model, tower)
            for block, heads, head_dim, units in zip(
                parts.blocks, shape["heads"], shape["head_dim"], shape["mlp"], strict=True
            ):
                old = block.attn
                block.attn = PrunedAttention(
                    parts.width,
                    heads,
                    head_dim,
                    mha_style=isinstance(old, nn.MultiheadAttention),
                    batch_first=getattr(old, "batch_first", True),
                )
                block.mlp.c_fc = nn.Linear(parts.width, units)
                block.mlp.c_proj = nn.Linear(units, parts.width)
    return model
