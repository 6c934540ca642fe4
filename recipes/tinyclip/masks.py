"""Automatic weight inheritance for open_clip CLIP models: hard-concrete (L0) masks, a Lagrangian sparsity
penalty, and physical pruning (TinyCLIP, after CoFi / Louizos et al.).

Masks, per masked tower (ViT image tower, transformer text tower):

- ``hidden``: one mask over the residual width, shared by all layers of the tower;
- ``heads[i]``: one entry per attention head of layer i;
- ``mlp[i]``: one entry per MLP hidden unit of layer i.

They are attached without touching open_clip's code (``CLIPPruningMasks.attach``): each residual block is
swapped for a wrapper that adopts the block's own submodules (so the state_dict keys do not change) and runs
the block with masks, and forward hooks make the tower-level LayerNorms mask-aware. A hidden mask z acts on
every *read* of the residual stream: each LayerNorm takes its statistics over the dims with z > 0 only and
multiplies its output by z. Writes into dropped dims are then never read, which is what makes pruning exact:
``prune`` removes dropped dims, heads and units and folds the surviving fractional mask values into the
LayerNorm affine parameters (hidden), the attention output projection (heads) and the MLP output projection
(units), so the pruned model computes what the masked model computes in eval mode.

The pruned model is a ``students.clip_pruned`` model (``create_pruned_model`` rebuilds it from its
``pruned_cfg``). Progressive stages (e.g. 1.0 -> 0.75 -> 0.5) repeat attach, train, prune on the pruned
model (a recipe's `then`: see ``recipes.tinyclip``).

What follows the reference (microsoft/Cream, TinyCLIP/src/open_clip/l0module.py and training/train.py): the
hard-concrete distribution (T = 2/3, stretch (-0.1, 1.1)), log_alpha starting at 10 and clamped to
[ln 0.01, ln 100] after every step, the final-mask rule (``HardConcreteMask.deterministic``), the one-sided
Lagrangian with both multipliers starting at 10 (``SparsityLagrangian``), the sparsity counted over the blocks'
attention and MLP layers of both towers together (``TowerMasks.prunable_count``), and the masks' own AdamW
(``MaskedCLIP.mask_optimizer``). ``MaskedCLIP`` packs a model with attached masks, its Lagrangian and the ramp's
step counter into one module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from functools import partial
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNormFp32, LayerScale
from torch import nn

from students.clip_pruned import (
    TOWERS,
    TowerParts,
    attention_shape,
    create_pruned_model,
    multihead_self_attention,
    owner_param,
    tower_parts,
)

# --------------------------------------------------------------------------------------------------------------
# Hard-concrete masks

EPSILON = 1e-6  # keeps uniform draws and probabilities off 0 and 1
SOFT_MASK_FACTOR = 0.8  # eval-time soft mask sigmoid(log_alpha / T * 0.8), the reference's constant
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))  # the reference clamps log_alpha here after every step


class HardConcreteMask(nn.Module):
    """Hard-concrete gates (Louizos et al., 2018) as TinyCLIP (after CoFi) trains and finalises them.

    Training draws a sample, ``clamp(sigmoid((log(u / (1 - u)) + log_alpha) / T) * (r - l) + l, 0, 1)``, whose
    reparameterisation gives log_alpha its gradient. Eval uses the *final-mask rule*: the soft mask
    ``sigmoid(log_alpha / T * 0.8)`` with its ``round(expected number of zeros)`` smallest entries set to 0 (ties
    broken by index), so that what is pruned is what the training expected: the count of zeros equals
    ``round(size - sum P(z != 0))``. Entries at exactly 0 are pruned; the others keep their soft value, which
    pruning folds into the weights. log_alpha starts at ``init_log_alpha`` (10: every gate open) and is kept in
    ``LOG_ALPHA_RANGE`` by ``constrain`` after each optimizer step.
    """

    def __init__(
        self,
        size: int,
        init_log_alpha: float = 10.0,
        temperature: float = 2 / 3,
        limits: tuple[float, float] = (-0.1, 1.1),
    ):
        super().__init__()
        self.temperature = temperature
        self.limits = limits
        self.log_alpha = nn.Parameter(torch.full((size,), float(init_log_alpha)))

    @property
    def size(self) -> int:
        return self.log_alpha.numel()

    def _stretch(self, s: torch.Tensor) -> torch.Tensor:
        low, high = self.limits
        return (s * (high - low) + low).clamp(0.0, 1.0)

    def sample(self) -> torch.Tensor:
        u = torch.rand_like(self.log_alpha).clamp(EPSILON, 1 - EPSILON)
        return self._stretch(torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.temperature))

    def soft(self) -> torch.Tensor:
        """The values the kept entries take at eval (0.8: Wang et al. 2020's constant, as in the reference)."""
        return torch.sigmoid(self.log_alpha / self.temperature * SOFT_MASK_FACTOR)

    def expected_zeros(self) -> int:
        """round(size - expected L0 norm): how many entries the final-mask rule sets to 0."""
        return round(self.size - float(self.prob_nonzero().detach().sum()))

    def deterministic(self) -> torch.Tensor:
        """The final mask (see the class docstring)."""
        soft = self.soft()
        zeros = self.expected_zeros()
        if zeros <= 0:
            return soft
        smallest = torch.sort(soft.detach(), stable=True).indices[:zeros]
        return soft.index_fill(0, smallest, 0.0)

    def prob_nonzero(self) -> torch.Tensor:
        """P(z != 0) per entry, clamped to [eps, 1 - eps] as in the reference; its sum is the expected L0 norm."""
        low, high = self.limits
        p = torch.sigmoid(self.log_alpha - self.temperature * math.log(-low / high))
        return p.clamp(EPSILON, 1 - EPSILON)

    def expected_l0(self) -> torch.Tensor:
        return self.prob_nonzero().sum()

    @torch.no_grad()
    def constrain(self) -> None:
        """Clamp log_alpha into LOG_ALPHA_RANGE (after every optimizer step, as the reference does)."""
        self.log_alpha.clamp_(*LOG_ALPHA_RANGE)

    def forward(self, stochastic: bool | None = None) -> torch.Tensor:
        stochastic = self.training if stochastic is None else stochastic
        return self.sample() if stochastic else self.deterministic()


@dataclass
class MaskValues:
    """Mask values of one tower for one forward pass."""

    hidden: torch.Tensor
    hidden_keep: torch.Tensor  # indices of the hidden dims with a nonzero mask
    heads: list[torch.Tensor]
    mlp: list[torch.Tensor]


class TowerMasks(nn.Module):
    """Hidden, per-layer head and per-layer MLP-unit masks of one tower, with its parameter-count formula."""

    def __init__(self, parts: TowerParts, **mask_kwargs: Any):
        super().__init__()
        self.tower = parts.name
        self.width = parts.width
        heads, head_dims, mlp = [], [], []
        for block in parts.blocks:
            h, d = attention_shape(block.attn)
            heads.append(h)
            head_dims.append(d)
            mlp.append(block.mlp.c_fc.out_features)
        self.head_dims = head_dims
        self.hidden = HardConcreteMask(parts.width, **mask_kwargs)
        self.heads = nn.ModuleList(HardConcreteMask(h, **mask_kwargs) for h in heads)
        self.mlp = nn.ModuleList(HardConcreteMask(m, **mask_kwargs) for m in mlp)

        # Parameter count as a function of (kept width w, kept heads h_i, kept units m_i):
        #   w * per_width + w * vocab (token embedding) + fixed
        #   + sum_i [ w * per_layer_width + 4 d_i h_i w + 3 d_i h_i + 2 m_i w + m_i ]
        self.vocab = 0
        self.per_width = 0
        for name, dim, _ in parts.width_params:
            p = owner_param(parts, name)
            if name == "token_embedding.weight":
                self.vocab = p.shape[0]  # kept apart: tower sizes (the TinyCLIP names) leave the vocabulary table out
            else:
                self.per_width += p.numel() // p.shape[dim]
        self.fixed = sum(owner_param(parts, name).numel() for name in parts.fixed_params)
        # ln_1, ln_2 (2 each), out_proj and c_proj biases, and the layer scales when present
        self.per_layer_width = [6 + 2 * isinstance(b.ls_1, LayerScale) for b in parts.blocks]
        self._current: MaskValues | None = None

        full = self.full_param_count(include_token_embedding=True)
        actual = sum(owner_param(parts, n).numel() for n, _, _ in parts.width_params)
        actual += sum(owner_param(parts, n).numel() for n in parts.fixed_params)
        actual += sum(p.numel() for p in parts.blocks.parameters())
        if full != actual:  # the formula must describe the tower exactly, or the sparsity would be wrong
            raise ValueError(f"{parts.name} tower has parameters outside the pruning rules ({actual} != {full})")

    def __getstate__(self) -> dict[str, Any]:
        # The last pass's mask values belong to its autograd graph: copies (EMA, pickling) start without them.
        return self.__dict__ | {"_current": None}

    # -- mask values -------------------------------------------------------------------------------------------

    def resample(self, stochastic: bool) -> MaskValues:
        """Draw (train) or compute (eval) the masks used by the next forward pass of the tower."""
        hidden = self.hidden(stochastic)
        self._current = MaskValues(
            hidden=hidden,
            hidden_keep=hidden.detach().nonzero()[:, 0],
            heads=[m(stochastic) for m in self.heads],
            mlp=[m(stochastic) for m in self.mlp],
        )
        return self._current

    def current(self) -> MaskValues:
        if self._current is None:
            return self.resample(stochastic=False)
        return self._current

    @torch.no_grad()
    def deterministic(self) -> MaskValues:
        return self.resample(stochastic=False)

    # -- parameter counts ----------------------------------------------------------------------------------------

    def param_count(
        self,
        width: torch.Tensor | float,
        heads: Sequence[torch.Tensor | float],
        mlp: Sequence[torch.Tensor | float],
        include_token_embedding: bool = False,
    ) -> torch.Tensor | float:
        total = width * (self.per_width + (self.vocab if include_token_embedding else 0)) + self.fixed
        for h, d, m, plw in zip(heads, self.head_dims, mlp, self.per_layer_width, strict=True):
            total = total + width * plw + 4 * d * h * width + 3 * d * h + 2 * m * width + m
        return total

    def full_param_count(self, include_token_embedding: bool = False) -> int:
        return int(
            self.param_count(
                self.width, [m.size for m in self.heads], [m.size for m in self.mlp], include_token_embedding
            )
        )

    @torch.no_grad()
    def pruned_param_count(self, include_token_embedding: bool = False) -> int:
        """Parameters this tower has after ``prune`` with the current deterministic masks."""
        return int(self.param_count(*self._kept(), include_token_embedding))

    # -- what the sparsity counts: the blocks' attention and MLP layers --------------------------------------------

    def prunable_count(
        self, width: torch.Tensor | float, heads: Sequence[torch.Tensor | float], mlp: Sequence[torch.Tensor | float]
    ) -> torch.Tensor | float:
        """Weights and biases of the blocks' attention (q/k/v and output projections) and MLP layers.

        The denominator of the sparsity, as in the reference (which leaves out the patch embedding, the
        positional and token embeddings, the projections and the norms). Per layer, with d the head width:
        qkv 3dhw + 3dh, output projection dhw + w, MLP mw + m + mw + w.
        """
        total: torch.Tensor | float = 0.0
        for h, d, m in zip(heads, self.head_dims, mlp, strict=True):
            total = total + 4 * d * h * width + 3 * d * h + 2 * m * width + m + 2 * width
        return total

    def full_prunable_count(self) -> int:
        return int(self.prunable_count(self.width, [m.size for m in self.heads], [m.size for m in self.mlp]))

    def expected_prunable_count(self) -> torch.Tensor:
        """Its expectation under the masks: they are independent, so E[h * w] = E[h] * E[w]."""
        return self.prunable_count(
            self.hidden.expected_l0(), [m.expected_l0() for m in self.heads], [m.expected_l0() for m in self.mlp]
        )

    @torch.no_grad()
    def pruned_prunable_count(self) -> int:
        """Its value after ``prune`` with the current deterministic masks."""
        return int(self.prunable_count(*self._kept()))

    def _kept(self) -> tuple[int, list[int], list[int]]:
        """(kept width, kept heads per layer, kept MLP units per layer) of the deterministic masks."""
        v = self.deterministic()
        return len(v.hidden_keep), [int((z > 0).sum()) for z in v.heads], [int((z > 0).sum()) for z in v.mlp]


class CLIPPruningMasks(nn.Module):
    """L0 masks over the towers of an open_clip CLIP model (built from the model's current shapes)."""

    def __init__(self, model: nn.Module, towers: Sequence[str] = TOWERS, **mask_kwargs: Any):
        super().__init__()
        self.towers = nn.ModuleDict({t: TowerMasks(tower_parts(model, t), **mask_kwargs) for t in towers})
        device = next(model.parameters()).device
        self.to(device)

    def expected_sparsity(self) -> torch.Tensor:
        """1 - expected kept / full parameters of the blocks' attention and MLP layers, all masked towers together
        (the reference's denominator; see ``TowerMasks.prunable_count``)."""
        full = sum(t.full_prunable_count() for t in self.towers.values())
        expected = sum(t.expected_prunable_count() for t in self.towers.values())
        return 1 - expected / full

    @torch.no_grad()
    def pruned_sparsity(self) -> float:
        """The sparsity ``prune`` would give now (deterministic masks), counted like ``expected_sparsity``."""
        full = sum(t.full_prunable_count() for t in self.towers.values())
        return 1 - sum(t.pruned_prunable_count() for t in self.towers.values()) / full

    def constrain(self) -> None:
        """Clamp every log_alpha into its range (after each optimizer step)."""
        for module in self.modules():
            if isinstance(module, HardConcreteMask):
                module.constrain()

    def attach(self, model: nn.Module) -> MaskHandle:
        """Make ``model`` run with these masks; ``handle.remove()`` restores it. State-dict keys do not change.

        Masks are sampled once per tower forward pass while both the model and the masks are in train mode,
        and deterministic otherwise.
        """
        handle = MaskHandle()
        for name, masks in self.towers.items():
            parts = tower_parts(model, name)
            if parts.width != masks.width or len(parts.blocks) != len(masks.heads):
                raise ValueError(f"{name} tower does not have the shape these masks were built for")
            if any(isinstance(block, _MaskedBlock) for block in parts.blocks):
                raise ValueError(f"the {name} tower already has masks attached")
            for i, block in enumerate(list(parts.blocks)):
                parts.blocks[i] = _MaskedBlock(block, masks, i)
                handle.on_remove(partial(parts.blocks.__setitem__, i, block))
            # The first module of a tower's forward pass draws that pass's masks.
            entry = parts.owner.ln_pre if name == "image" else parts.blocks[0]
            handle.hooks.append(entry.register_forward_pre_hook(partial(_resample_hook, masks)))
            for norm in parts.norms:
                hook = getattr(parts.owner, norm).register_forward_hook(partial(_masked_norm_hook, masks))
                handle.hooks.append(hook)
        return handle


class MaskHandle:
    """Undoes ``CLIPPruningMasks.attach``."""

    def __init__(self) -> None:
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._undo: list[Callable[[], None]] = []

    def on_remove(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for fn in reversed(self._undo):
            fn()
        self.hooks, self._undo = [], []


def masked_layer_norm(norm: nn.Module, x: torch.Tensor, masks: MaskValues) -> torch.Tensor:
    """LayerNorm over the kept hidden dims only, output scaled by the hidden mask (zero on dropped dims).

    Written as the pruned model computes it (LayerNorm of the kept dims with z folded into the affine), so that
    pruning reproduces it exactly.
    """
    if not isinstance(norm, nn.LayerNorm):  # e.g. no ln_pre: nothing to mask here
        return norm(x)
    keep, z = masks.hidden_keep, masks.hidden
    z_kept = z.index_select(0, keep)
    weight = norm.weight.index_select(0, keep) * z_kept
    bias = norm.bias.index_select(0, keep) * z_kept
    dtype = torch.float32 if isinstance(norm, LayerNormFp32) else x.dtype
    if len(keep) == x.shape[-1]:
        return F.layer_norm(x.to(dtype), (len(keep),), weight, bias, norm.eps).to(x.dtype)
    y = F.layer_norm(x.index_select(-1, keep).to(dtype), (len(keep),), weight, bias, norm.eps).to(x.dtype)
    return x.new_zeros(x.shape).index_copy(-1, keep, y)


def _resample_hook(masks: TowerMasks, module: nn.Module, args: tuple[Any, ...]) -> None:
    masks.resample(stochastic=module.training and masks.training)


def _masked_norm_hook(
    masks: TowerMasks, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
) -> torch.Tensor:
    # Recomputes the norm from its input (cheap next to the blocks) rather than replacing the module.
    return masked_layer_norm(module, args[0], masks.current())


class _MaskedBlock(nn.Module):
    """Runs an open_clip residual attention block with the tower's masks.

    It adopts the block's submodules as its own children, so parameter names are those of the block; the masks
    are reached through a bound method, not a submodule, so they stay out of the model's state_dict.
    """

    def __init__(self, block: nn.Module, masks: TowerMasks, layer: int):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.layer = layer
        self.masks = masks.current
        self.batch_first = getattr(block.attn, "batch_first", True)
        self.train(block.training)  # a new module starts in train mode; it must follow the model's

    def get_weight_dtype(self) -> torch.dtype:
        return self.mlp.c_fc.weight.dtype

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if k_x is not None or v_x is not None:
            raise NotImplementedError("masked blocks are self-attention only")
        masks = self.masks()
        x = q_x if self.batch_first else q_x.transpose(0, 1)
        h = masked_layer_norm(self.ln_1, x, masks)
        heads, _ = attention_shape(self.attn)
        attn = multihead_self_attention(
            h,
            self.attn.in_proj_weight,
            self.attn.in_proj_bias,
            heads,
            self.attn.out_proj,
            attn_mask,
            masks.heads[self.layer],
        )
        x = x + self.ls_1(attn)
        h = masked_layer_norm(self.ln_2, x, masks)
        x = x + self.ls_2(self.mlp.c_proj(self.mlp.gelu(self.mlp.c_fc(h)) * masks.mlp[self.layer]))
        return x if self.batch_first else x.transpose(0, 1)


# --------------------------------------------------------------------------------------------------------------
# Sparsity target and Lagrangian penalty


class SparsityLagrangian(nn.Module):
    """The reference's one-sided penalty ``lambda_1 max(t - s, 0) + lambda_2 max(t - s, 0)^2``.

    s is the expected sparsity, t the target, ramped linearly from ``start_sparsity`` to ``target_sparsity`` over
    ``ramp_steps`` optimizer steps and then held. Once the masks are at least as sparse as the target there is
    no penalty (and no gradient): only a shortfall is penalised. The masks descend on it; the multipliers
    (both starting at ``init_lambda``, 10 in the reference) *ascend*, with an optimizer that maximises, so that
    they grow while the masks fall short of the target.
    """

    def __init__(self, target_sparsity: float, ramp_steps: int, start_sparsity: float = 0.0, init_lambda: float = 10.0):
        super().__init__()
        self.target_sparsity = target_sparsity
        self.start_sparsity = start_sparsity
        self.ramp_steps = ramp_steps
        self.lambda_1 = nn.Parameter(torch.tensor(float(init_lambda)))
        self.lambda_2 = nn.Parameter(torch.tensor(float(init_lambda)))

    def target(self, step: int | torch.Tensor) -> float | torch.Tensor:
        """The target at ``step`` (an int, or a tensor: then the answer is a tensor, with no host sync)."""
        if self.ramp_steps <= 0:
            frac: float | torch.Tensor = 1.0
        elif isinstance(step, torch.Tensor):
            frac = (step.float() / self.ramp_steps).clamp(max=1.0)
        else:
            frac = min(1.0, step / self.ramp_steps)
        return self.start_sparsity + frac * (self.target_sparsity - self.start_sparsity)

    def forward(self, expected_sparsity: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
        shortfall = (self.target(step) - expected_sparsity).clamp(min=0.0)
        return self.lambda_1 * shortfall + self.lambda_2 * shortfall * shortfall


# --------------------------------------------------------------------------------------------------------------
# Physical pruning


def _model_cfg(model: nn.Module, model_cfg: str | dict[str, Any] | None) -> dict[str, Any]:
    if model_cfg is None:
        model_cfg = getattr(model, "pruned_cfg", None)
        if model_cfg is None:
            raise ValueError("pass the open_clip config (name or dict) of the model being pruned")
    if isinstance(model_cfg, str):
        cfg = open_clip.get_model_config(model_cfg)
        if cfg is None:
            raise ValueError(f"unknown open_clip model config {model_cfg!r}")
        return cfg
    return deepcopy(model_cfg)


def _take(
    state: dict[str, torch.Tensor], key: str, dim: int, index: torch.Tensor, scale: torch.Tensor | None = None
) -> None:
    """Keep `index` along `dim` of state[key], optionally multiplying the kept slices by `scale`."""
    t = state[key].index_select(dim, index)
    if scale is not None:
        shape = [1] * t.ndim
        shape[dim] = -1
        t = t * scale.view(shape)
    state[key] = t


def _qkv_rows(heads: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a packed [q; k; v] projection that belong to `heads`."""
    per_head = (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()
    return torch.cat([per_head + i * num_heads * head_dim for i in range(3)])


@torch.no_grad()
def prune(model: nn.Module, masks: CLIPPruningMasks, model_cfg: str | dict[str, Any] | None = None) -> nn.Module:
    """Remove what the deterministic masks drop; return a new, smaller open_clip model.

    ``model_cfg`` is the open_clip config (name or dict) ``model`` was built from; a model returned by ``prune``
    carries its own (``model.pruned_cfg``). The result computes what ``model`` with ``masks`` attached computes in
    eval mode, has ``masks.pruned_param_count`` parameters in each masked tower, and has ``pruned_cfg`` set.
    """
    cfg = _model_cfg(model, model_cfg)
    cfg.setdefault("layer_shapes", {})
    state = dict(model.state_dict())
    for tower, tower_masks in masks.towers.items():
        parts = tower_parts(model, tower)
        values = tower_masks.deterministic()
        keep = values.hidden_keep
        if len(keep) == 0:
            raise ValueError(f"the {tower} tower's hidden mask drops every dim")
        z_hidden = values.hidden[keep]

        for name, dim, fold in parts.width_params:
            _take(state, parts.prefix + name, dim, keep, z_hidden if fold else None)

        shape: dict[str, list[int]] = {"heads": [], "head_dim": [], "mlp": []}
        block_prefix = f"{parts.prefix}transformer.resblocks."
        for i, block in enumerate(parts.blocks):
            p = f"{block_prefix}{i}."
            num_heads, head_dim = attention_shape(block.attn)
            heads = values.heads[i].nonzero()[:, 0]
            units = values.mlp[i].nonzero()[:, 0]
            rows = _qkv_rows(heads, num_heads, head_dim)
            _take(state, p + "attn.in_proj_weight", 0, rows)
            _take(state, p + "attn.in_proj_weight", 1, keep)
            _take(state, p + "attn.in_proj_bias", 0, rows)
            _take(state, p + "attn.out_proj.weight", 0, keep)
            head_cols = (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()
            _take(state, p + "attn.out_proj.weight", 1, head_cols, values.heads[i][heads].repeat_interleave(head_dim))
            _take(state, p + "attn.out_proj.bias", 0, keep)
            for norm in ("ln_1", "ln_2"):
                _take(state, p + f"{norm}.weight", 0, keep, z_hidden)
                _take(state, p + f"{norm}.bias", 0, keep, z_hidden)
            for ls in ("ls_1.gamma", "ls_2.gamma"):
                if p + ls in state:
                    _take(state, p + ls, 0, keep)
            _take(state, p + "mlp.c_fc.weight", 0, units)
            _take(state, p + "mlp.c_fc.weight", 1, keep)
            _take(state, p + "mlp.c_fc.bias", 0, units)
            _take(state, p + "mlp.c_proj.weight", 0, keep)
            _take(state, p + "mlp.c_proj.weight", 1, units, values.mlp[i][units])
            _take(state, p + "mlp.c_proj.bias", 0, keep)
            shape["heads"].append(len(heads))
            shape["head_dim"].append(head_dim)
            shape["mlp"].append(len(units))

        cfg["vision_cfg" if tower == "image" else "text_cfg"]["width"] = len(keep)
        cfg["layer_shapes"][tower] = shape

    device = next(model.parameters()).device
    pruned = create_pruned_model(cfg, device=device)
    pruned.load_state_dict(state)
    pruned.to(next(model.parameters()).dtype)
    pruned.train(model.training)
    pruned.pruned_cfg = cfg
    return pruned


# --------------------------------------------------------------------------------------------------------------
# One module for a trainer


class MaskedCLIP(nn.Module):
    """An open_clip CLIP model with masks attached, and its sparsity Lagrangian, as one module.

    The model, the masks, the Lagrangian and the step counter of the target's ramp (a buffer) all sit in this
    module, so that data parallelism averages the masks' gradients and a checkpoint and a resume cover them.
    ``forward(image=, text=)`` returns the CLIP outputs (image features, text features, logit scale[, bias])
    followed by a dict: ``penalty`` (add it to the loss), ``expected_sparsity`` and ``target_sparsity``.
    ``encode_image``, ``encode_text``, ``visual`` and ``context_length`` reach the CLIP model, which runs with
    deterministic masks in eval mode. ``model_cfg`` is the open_clip config (name or dict) of ``model``, as
    ``prune`` takes it.

    The masks and multipliers are not trained by the optimizer of ``model``'s weights: ``mask_optimizer`` builds
    theirs, and whoever steps it calls ``after_mask_step`` (clamp log_alpha, advance the ramp).
    """

    def __init__(
        self,
        model: nn.Module,
        masks: CLIPPruningMasks,
        lagrangian: SparsityLagrangian,
        model_cfg: str | dict[str, Any] | None = None,
    ):
        super().__init__()
        self.model = model
        self.masks = masks
        self.lagrangian = lagrangian.to(next(model.parameters()).device)
        self.model_cfg = model_cfg if model_cfg is not None else getattr(model, "pruned_cfg", None)
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=self.lagrangian.lambda_1.device))
        self.handle = masks.attach(model)

    def forward(
        self, image: torch.Tensor | None = None, text: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | dict[str, torch.Tensor], ...]:
        out = self.model(image=image, text=text)
        if isinstance(out, dict):
            raise TypeError("MaskedCLIP needs a CLIP model built with output_dict=False")
        expected = self.masks.expected_sparsity()
        target = torch.as_tensor(self.lagrangian.target(self.step), device=expected.device)
        penalty = self.lagrangian(expected, self.step)
        return (*out, {"penalty": penalty, "expected_sparsity": expected, "target_sparsity": target})

    def mask_optimizer(self, mask_lr: float, lagrangian_lr: float) -> torch.optim.Optimizer:
        """The reference's optimizer of the masks and multipliers: AdamW without weight decay, log_alpha at
        ``mask_lr`` (descent), the multipliers at ``lagrangian_lr`` by ascent (the reference's negative rate)."""
        return torch.optim.AdamW(
            [
                {"params": list(self.masks.parameters()), "lr": mask_lr},
                {"params": list(self.lagrangian.parameters()), "lr": lagrangian_lr, "maximize": True},
            ],
            weight_decay=0.0,
        )

    @torch.no_grad()
    def after_mask_step(self) -> None:
        """After each step of the mask optimizer: log_alpha back into its range, one more step of the ramp."""
        self.masks.constrain()
        self.step += 1

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(image, normalize=normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(text, normalize=normalize)

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def context_length(self) -> int:
        return self.model.context_length

    def pruned(self) -> nn.Module:
        """The physically pruned model (``prune`` with the current deterministic masks)."""
        return prune(self.model, self.masks, self.model_cfg)
