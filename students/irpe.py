"""iRPE: image relative position encoding (Wu et al., "Rethinking and Improving Relative Position Encoding for
Vision Transformer", ICCV 2021), in plain PyTorch, for CPU and GPU.

iRPE adds to each attention logit a term that depends on the relative 2-D position of the query and key tokens.
The relative offset (dr, dc) of two patches is quantised per axis by the piecewise index function

    g(d) = d                                                          if |d| <= alpha
    g(d) = sign(d) * min(beta_int, round(alpha + ln(|d| / alpha) / ln(gamma / alpha) * (beta - alpha)))   otherwise

with alpha = ratio, beta = 2 ratio, gamma = 8 ratio and beta_int = int(beta), and the "product" method gives each
pair the bucket (g(dr) + beta_int) * (2 beta_int + 1) + (g(dc) + beta_int): (2 beta_int + 1)^2 buckets, 49 at the
reference's ratio 1.9. With `skip` prefix tokens (a class token) every pair involving one of them gets one extra
bucket. What a bucket holds depends on the mode and where the encoding sits:

- contextual, on keys:    logit[i, j] += q_i . r[bucket(i, j)]         (r: head_dim per bucket)
- contextual, on queries: logit[i, j] += k_j . r[bucket(j, i)]
- contextual, on values:  out_i += sum_j attn[i, j] r[bucket(i, j)]
- bias (q or k):          logit[i, j] += b[bucket(i, j)]

`q` and `k` enter already multiplied by the attention scale, as in the reference. Tables start at zero (the
reference's default), so a fresh iRPE attention computes what plain attention computes. `shared_head` uses one
table for all heads. Only the product method is implemented: it is the one MiniViT and the released iRPE DeiTs use.

`IRPEAttention` is timm's `Attention` (same sub-modules and state-dict keys) with iRPE, computed explicitly; it also
carries the hook points MiniViT's multiplexed attention builds on (`qkv_tap`, `logit_mix`, `prob_mix`, identities
here). `add_irpe` converts a timm ViT/DeiT in place. Registered (1000 classes, 224 px; the reference's names, whose
"50" counts the 49 product buckets and the class token's):

    name                                               params    iRPE repo
    deit_tiny_patch16_224_ctx_product_50_shared_k      5.76M     5.76M
    deit_small_patch16_224_ctx_product_50_shared_k     22.09M    22.09M
    deit_small_patch16_224_ctx_product_50_shared_qk    22.13M    22.13M
    deit_small_patch16_224_ctx_product_50_shared_qkv   22.17M    22.17M
    deit_base_patch16_224_ctx_product_50_shared_k      86.61M    86.61M
    deit_base_patch16_224_ctx_product_50_shared_qkv    86.68M    86.68M
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import timm
import torch
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = [
    "IRPEAttention",
    "IRPEConfig",
    "ImageRPE",
    "add_irpe",
    "piecewise_index",
    "product_bucket_ids",
]


@dataclass(frozen=True)
class IRPEConfig:
    """One iRPE setting, shared by the encodings on queries, keys and values that `on` names."""

    ratio: float = 1.9  # alpha = ratio, beta = 2 ratio, gamma = 8 ratio
    mode: Literal["contextual", "bias"] = "contextual"
    shared_head: bool = True  # one table for all heads
    skip: int = 0  # prefix tokens (class token) before the square grid of patch tokens
    on: str = "k"  # any of "q", "k", "v"

    def __post_init__(self) -> None:
        if self.ratio <= 0:
            raise ValueError(f"iRPE ratio must be > 0, got {self.ratio}")
        if self.mode not in ("contextual", "bias"):
            raise ValueError(f"iRPE mode must be 'contextual' or 'bias', got {self.mode!r}")
        if not self.on or set(self.on) - set("qkv"):
            raise ValueError(f"iRPE `on` must name some of q, k, v, got {self.on!r}")
        if "v" in self.on and self.mode != "contextual":
            raise ValueError("iRPE on values exists only in contextual mode")
        if self.skip < 0:
            raise ValueError(f"iRPE skip must be >= 0, got {self.skip}")

    @property
    def beta_int(self) -> int:
        return int(2 * self.ratio)

    @property
    def num_buckets(self) -> int:
        """Product buckets, plus one shared by every pair that involves a prefix token."""
        return (2 * self.beta_int + 1) ** 2 + (1 if self.skip else 0)


def piecewise_index(relative: torch.Tensor, ratio: float) -> torch.Tensor:
    """iRPE's piecewise index g(d) of integer offsets (any shape): exact near 0, logarithmic beyond alpha, clipped
    to [-beta_int, beta_int]. Returns a long tensor."""
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    d = relative.double()
    far = d.abs().clamp(min=alpha)  # clamped only so the log is defined where the near branch is taken
    log_part = (alpha + torch.log(far / alpha) / math.log(gamma / alpha) * (beta - alpha)).round()
    far_index = torch.sign(d) * log_part.clamp(max=int(beta))
    return torch.where(d.abs() <= alpha, d.round(), far_index).long()


def product_bucket_ids(
    height: int, width: int, ratio: float, skip: int = 0, device: torch.device | None = None
) -> torch.Tensor:
    """(skip + H W, skip + H W) bucket of each (query, key) pair of a row-major H x W grid after `skip` prefix
    tokens: the product method's (g(dr) + b) (2b + 1) + (g(dc) + b), b = beta_int, offsets query minus key;
    pairs with a prefix token get the extra bucket (2b + 1)^2."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    b = int(2 * ratio)
    dr = piecewise_index(rows[:, None] - rows[None, :], ratio) + b
    dc = piecewise_index(cols[:, None] - cols[None, :], ratio) + b
    grid = dr * (2 * b + 1) + dc
    if not skip:
        return grid
    ids = torch.full((skip + grid.shape[0],) * 2, (2 * b + 1) ** 2, dtype=torch.long, device=device)
    ids[skip:, skip:] = grid
    return ids


class ImageRPE(nn.Module):
    """One iRPE encoding (product method) on queries, keys or values of a square grid of tokens.

    On queries or keys: forward((B, H, N, D) scaled queries, or keys) -> (B, H, N, N) logit term, indexed
    [query token, key token] for keys and [key token, query token] for queries (the caller transposes).
    On values: forward((B, H, N, N) attention) -> (B, H, N, D) term added to attention @ v.
    The parameter names are the reference's (`lookup_table_weight`, `lookup_table_bias`).
    """

    def __init__(
        self,
        config: IRPEConfig,
        head_dim: int,
        num_heads: int,
        on: Literal["q", "k", "v"] = "k",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.config = config
        self.on = on
        self.num_heads = num_heads
        tables = 1 if config.shared_head else num_heads
        buckets = config.num_buckets
        if config.mode == "bias":
            self.lookup_table_bias = nn.Parameter(torch.zeros(tables, buckets, **dd))
        elif on == "v":
            self.lookup_table_weight = nn.Parameter(torch.zeros(tables, buckets, head_dim, **dd))
        else:
            self.lookup_table_weight = nn.Parameter(torch.zeros(tables, head_dim, buckets, **dd))
        self._ids: dict[tuple[int, torch.device], torch.Tensor] = {}

    def bucket_ids(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """The (N, N) buckets for N tokens (cached per N and device)."""
        key = (num_tokens, device)
        if key not in self._ids:
            side = math.isqrt(num_tokens - self.config.skip)
            if side * side != num_tokens - self.config.skip:
                raise ValueError(
                    f"iRPE needs {self.config.skip} prefix token(s) and a square grid of patch tokens, got "
                    f"{num_tokens} tokens"
                )
            self._ids[key] = product_bucket_ids(side, side, self.config.ratio, self.config.skip, device)
        return self._ids[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, N = x.shape[:3]
        ids = self.bucket_ids(N, x.device)
        if self.config.mode == "bias":
            return self.lookup_table_bias[:, ids].unsqueeze(0)  # (1, H or 1, N, N)
        index = ids.expand(B, H, N, N)
        if self.on == "v":
            # sum_j attn[i, j] r[bucket(i, j)] = sum_b (sum_{j in bucket b} attn[i, j]) r[b]
            per_bucket = x.new_zeros(B, H, N, self.config.num_buckets).scatter_add_(-1, index, x)
            return per_bucket @ self.lookup_table_weight
        # x_i . r[b] for every bucket, then each pair picks its own bucket
        return (x @ self.lookup_table_weight).gather(-1, index)

    def extra_repr(self) -> str:
        c = self.config
        return f"on={self.on}, mode={c.mode}, ratio={c.ratio}, shared_head={c.shared_head}, skip={c.skip}"


class IRPEAttention(nn.Module):
    """Multi-head self-attention over timm `Attention`'s modules (same names, so the same state-dict keys) with
    iRPE on the queries, keys and values `rpe.on` names; no iRPE when `rpe` is None.

    Computes softmax(logit_mix(q k^T / sqrt(d) + iRPE) + mask) -> prob_mix -> dropout -> @ v (+ iRPE on values)
    explicitly (the position terms rule out fused SDPA). `qkv_tap`, `logit_mix` and `prob_mix` are identities here:
    a per-block hook point on the qkv output and the places where MiniViT's weight transformations go.
    """

    def __init__(
        self,
        qkv: nn.Linear,
        proj: nn.Linear,
        num_heads: int,
        rpe: IRPEConfig | None = None,
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
        # A per-block hook point on the qkv output (hooks on a shared `qkv` would fire once per block using it).
        self.qkv_tap = nn.Identity()
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.logit_mix: nn.Module = nn.Identity()
        self.prob_mix: nn.Module = nn.Identity()
        on = rpe.on if rpe is not None else ""
        for where in "qkv":
            module = ImageRPE(rpe, self.head_dim, num_heads, where, **dd) if where in on else None
            setattr(self, f"rpe_{where}", module)
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm if norm is not None else nn.Identity()
        self.gate = gate
        self.proj = proj
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, attn: Attention, rpe: IRPEConfig | None = None, **kwargs: Any) -> IRPEAttention:
        """Wrap the modules of a timm `Attention` (no weights are copied) and add iRPE; `kwargs` go to `cls`."""
        if not isinstance(attn, Attention):
            raise TypeError(f"expected timm Attention, got {type(attn).__name__}")
        return cls(
            attn.qkv,
            attn.proj,
            attn.num_heads,
            rpe=rpe,
            q_norm=attn.q_norm,
            k_norm=attn.k_norm,
            norm=getattr(attn, "norm", None),
            gate=getattr(attn, "gate", None),
            attn_drop=attn.attn_drop.p,
            proj_drop=attn.proj_drop.p,
            **kwargs,
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
        q, k = self.q_norm(q) * self.scale, self.k_norm(k)

        attn = q @ k.transpose(-2, -1)
        if self.rpe_k is not None:
            attn = attn + self.rpe_k(q)
        if self.rpe_q is not None:
            attn = attn + self.rpe_q(k * self.scale).transpose(-2, -1)
        attn = self.logit_mix(attn)
        # The mask goes in after the mix: mixing heads must not move masked logits back into range.
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.attn_drop(self.prob_mix(attn.softmax(dim=-1)))
        out = attn @ v
        if self.rpe_v is not None:
            out = out + self.rpe_v(attn)

        x = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def add_irpe(model: VisionTransformer, rpe: IRPEConfig) -> VisionTransformer:
    """Give every block of a timm ViT/DeiT iRPE attention, in place (weights kept; `skip` becomes the model's
    prefix-token count)."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"add_irpe supports timm VisionTransformer, got {type(model).__name__}")
    rpe = dataclasses.replace(rpe, skip=model.num_prefix_tokens)
    for block in model.blocks:
        block.attn = IRPEAttention.from_timm(block.attn, rpe)
    return model


def _create_irpe_deit(base: str, on: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    if pretrained:
        raise ValueError(
            "no pretrained iRPE weights are bundled: load the reference's released checkpoint into this model "
            "(its keys are this model's) instead of pretrained=True"
        )
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    rpe = kwargs.pop("rpe", IRPEConfig(on=on))
    return add_irpe(timm.create_model(base, **kwargs), rpe)


# The iRPE repo's DeiTs with contextual product iRPE, shared across heads, ratio 1.9, after a class token.


@register_model
def deit_tiny_patch16_224_ctx_product_50_shared_k(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Ti with contextual product iRPE on keys (iRPE repo: 5.76M params, 73.7% top-1)."""
    return _create_irpe_deit("deit_tiny_patch16_224", "k", pretrained, **kwargs)


@register_model
def deit_small_patch16_224_ctx_product_50_shared_k(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-S with contextual product iRPE on keys (iRPE repo: 22.09M params, 80.9% top-1)."""
    return _create_irpe_deit("deit_small_patch16_224", "k", pretrained, **kwargs)


@register_model
def deit_small_patch16_224_ctx_product_50_shared_qk(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-S with contextual product iRPE on queries and keys (iRPE repo: 22.13M params, 81.0% top-1)."""
    return _create_irpe_deit("deit_small_patch16_224", "qk", pretrained, **kwargs)


@register_model
def deit_small_patch16_224_ctx_product_50_shared_qkv(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-S with contextual product iRPE on queries, keys and values (iRPE repo: 22.17M params, 81.2% top-1)."""
    return _create_irpe_deit("deit_small_patch16_224", "qkv", pretrained, **kwargs)


@register_model
def deit_base_patch16_224_ctx_product_50_shared_k(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-B with contextual product iRPE on keys (iRPE repo: 86.61M params, 82.3% top-1)."""
    return _create_irpe_deit("deit_base_patch16_224", "k", pretrained, **kwargs)


@register_model
def deit_base_patch16_224_ctx_product_50_shared_qkv(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-B with contextual product iRPE on queries, keys and values (iRPE repo: 86.68M params, 82.8% top-1)."""
    return _create_irpe_deit("deit_base_patch16_224", "qkv", pretrained, **kwargs)
