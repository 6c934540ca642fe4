"""Manual weight inheritance (TinyCLIP): initialise a smaller open_clip CLIP from a larger one.

For each inherited tower (ViT or ModifiedResNet image tower, transformer text tower) the student keeps teacher
blocks at a uniform stride in every stack of blocks (0, step, 2 step, ... with step = teacher depth // student
depth: the transformer's one stack, or each of a ResNet's four stages) and, from every kept tensor, the leading
slice: the first residual dims or channels, the first attention heads, the first MLP units, the first text
positions and output (embedding) dims. The packed q/k/v projection is cut per head (q, k and v each keep their
leading heads); a ResNet's attention pool keeps its leading heads through the leading rows of q, k and v.

Rule for heads: a head is inherited whole, so the student's head width must equal the teacher's; anything else
raises. With it, an inherited block is exact: at the teacher's width it computes what the teacher's block
computes with its MLP units and heads beyond the student's removed (identical outputs when the student keeps
them all); a ResNet student computes what the teacher computes with every channel beyond the student's zeroed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from timm.layers import resample_abs_pos_embed
from torch import nn

from students.tinyclip import text_prefix, text_tower

# A block of a stack: a transformer's residual blocks, or a ResNet stage's bottlenecks.
_BLOCK_KEY = re.compile(r"^(?P<stack>.*transformer\.resblocks\.|visual\.layer\d+\.)(?P<layer>\d+)\.(?P<rest>.+)$")
_IMAGE_TOWERS = (VisionTransformer, ModifiedResNet)


def uniform_layer_indices(teacher_depth: int, student_depth: int) -> list[int]:
    """Teacher layers 0, step, 2 step, ... (student_depth of them), step = teacher_depth // student_depth."""
    if not 0 < student_depth <= teacher_depth:
        raise ValueError(f"cannot inherit {student_depth} layers from {teacher_depth}")
    step = teacher_depth // student_depth
    return [i * step for i in range(student_depth)]


def _leading(t: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    if len(t.shape) != len(shape) or any(s > ts for s, ts in zip(shape, t.shape, strict=True)):
        raise ValueError(f"{key}: student shape {tuple(shape)} does not fit in teacher shape {tuple(t.shape)}")
    return t[tuple(slice(0, s) for s in shape)]


def _qkv_leading_heads(t: torch.Tensor, student_shape: torch.Size, heads: int, head_dim: int) -> torch.Tensor:
    """Leading heads of each of q, k, v in a packed [3 * heads * head_dim, ...] projection (weight or bias)."""
    per_part = t.view(3, -1, head_dim, *t.shape[1:])[:, :heads]
    per_part = per_part[(slice(None),) * 3 + tuple(slice(0, s) for s in student_shape[1:])]
    return per_part.reshape(student_shape)


def _heads(model: nn.Module, block_key: str) -> tuple[int, int]:
    """(heads, head_dim) of the attention module of the block `block_key` ("...resblocks.3.") names."""
    attn = model.get_submodule(block_key + "attn")
    inner = attn.in_proj_weight.shape[0] // 3
    return attn.num_heads, inner // attn.num_heads


def _depths(keys: Iterable[str]) -> dict[str, int]:
    """Blocks per stack ("...resblocks.", "visual.layer2.", ...), in the order the stacks first appear."""
    depths: dict[str, int] = {}
    for key in keys:
        if match := _BLOCK_KEY.match(key):
            depths[match["stack"]] = max(depths.get(match["stack"], 0), int(match["layer"]) + 1)
    return depths


def _tower_keys(model: nn.Module, tower: str, keys: Sequence[str]) -> list[str]:
    if tower == "image":
        if not isinstance(model.visual, _IMAGE_TOWERS):
            raise ValueError(
                f"manual inheritance covers ViT and ModifiedResNet image towers, not {type(model.visual).__name__}; "
                "inherit the text tower only (towers=('text',))"
            )
        return [k for k in keys if k.startswith("visual.")]
    if tower != "text":
        raise ValueError(f"unknown tower {tower!r}")
    if not hasattr(text_tower(model), "token_embedding"):
        raise ValueError("manual inheritance covers open_clip transformer text towers")
    prefix = text_prefix(model)
    if prefix:
        return [k for k in keys if k.startswith(prefix)]
    return [k for k in keys if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")]


def _stack_layers(
    tower: str, t_keys: Iterable[str], s_keys: Iterable[str], chosen: Sequence[int] | None
) -> dict[str, list[int]]:
    """The teacher block kept for each student block, per stack (uniform stride unless `chosen`)."""
    t_depths, s_depths = _depths(t_keys), _depths(s_keys)
    if set(t_depths) != set(s_depths):
        raise ValueError(f"{tower}: the student's stacks of blocks {list(s_depths)} are not the teacher's")
    if chosen is not None and len(s_depths) != 1:
        raise ValueError(f"{tower}: explicit layer indices need a tower with one stack of blocks")
    layers = {}
    for stack, s_depth in s_depths.items():
        kept = list(chosen) if chosen is not None else uniform_layer_indices(t_depths[stack], s_depth)
        if len(kept) != s_depth or not all(0 <= i < t_depths[stack] for i in kept):
            raise ValueError(f"{tower}: need {s_depth} teacher layer indices in [0, {t_depths[stack]}), got {kept}")
        layers[stack] = kept
    return layers


def _check_image_kinds(teacher: nn.Module, student: nn.Module) -> None:
    """Same kind of image tower; for ResNets, attention-pool heads of one width and the same image grid."""
    t_visual, s_visual = teacher.visual, student.visual
    if type(t_visual) is not type(s_visual):
        raise ValueError(f"image towers differ in kind: {type(t_visual).__name__} -> {type(s_visual).__name__}")
    if isinstance(s_visual, ModifiedResNet):
        t_pool, s_pool = t_visual.attnpool, s_visual.attnpool
        t_width, s_width = (
            t_pool.q_proj.out_features // t_pool.num_heads,
            s_pool.q_proj.out_features // s_pool.num_heads,
        )
        if t_width != s_width:
            raise ValueError(
                f"visual.attnpool: heads are inherited whole, so the student head width ({s_width}) must equal "
                f"the teacher's ({t_width})"
            )
        if t_pool.positional_embedding.shape[0] != s_pool.positional_embedding.shape[0]:
            raise ValueError("visual.attnpool: the image grids differ; ResNet towers inherit at the teacher's size")


@torch.no_grad()
def inherit_weights(
    teacher: nn.Module,
    student: nn.Module,
    towers: Sequence[str] = ("image", "text"),
    image_layers: Sequence[int] | None = None,
    text_layers: Sequence[int] | None = None,
    logit_scale: bool = True,
) -> dict[str, list[int]]:
    """Copy teacher weights into ``student`` (in place); returns the teacher block kept for each student block:
    per tower ("image", "text"), or per ResNet stage ("image.layer1" ... "image.layer4").

    ``image_layers`` / ``text_layers`` override the uniform-stride choice (towers with one stack of blocks).
    Both models are open_clip ``CLIP`` or ``CustomTextCLIP`` whose image towers are of one kind (ViT or
    ModifiedResNet); student widths, channels, heads, MLP widths, depths, context length and embedding dim may be
    smaller than the teacher's; patch and kernel sizes and the vocabulary must match; a ViT's different image
    grid resamples the positional embedding (a ResNet's must match).
    """
    t_state, s_state = teacher.state_dict(), student.state_dict()
    chosen = {"image": image_layers, "text": text_layers}
    kept: dict[str, list[int]] = {}
    inherited: dict[str, torch.Tensor] = {}  # copied only once everything is checked: no half-inherited student
    for tower in towers:
        s_keys = _tower_keys(student, tower, list(s_state))
        t_keys = set(_tower_keys(teacher, tower, list(t_state)))
        if tower == "image":
            _check_image_kinds(teacher, student)
        layers = _stack_layers(tower, t_keys, s_keys, chosen[tower])
        kept |= {tower if len(layers) == 1 else f"{tower}.{stack.split('.')[-2]}": v for stack, v in layers.items()}

        for key in s_keys:
            student_t = s_state[key]
            match = _BLOCK_KEY.match(key)
            t_key = key
            if match:
                t_key = f"{match['stack']}{layers[match['stack']][int(match['layer'])]}.{match['rest']}"
            if t_key not in t_keys:
                raise ValueError(f"teacher has no {t_key} for student {key}")
            t = t_state[t_key]
            if match and match["rest"].startswith("attn."):
                _, t_dim = _heads(teacher, t_key[: -len(match["rest"])])
                s_heads, s_dim = _heads(student, key[: -len(match["rest"])])
                if t_dim != s_dim:
                    raise ValueError(
                        f"{key}: heads are inherited whole, so the student head width ({s_dim}) must equal the "
                        f"teacher's ({t_dim}); choose student heads = student width / {t_dim}"
                    )
                if match["rest"] in ("attn.in_proj_weight", "attn.in_proj_bias"):
                    inherited[key] = _qkv_leading_heads(t, student_t.shape, s_heads, s_dim)
                    continue
            if t.ndim == 4 and t.shape[2:] != student_t.shape[2:]:  # a patch embedding's or a ResNet's conv
                raise ValueError(f"{key}: kernel sizes differ ({tuple(t.shape[2:])} vs {tuple(student_t.shape[2:])})")
            if key.endswith("token_embedding.weight") and t.shape[0] != student_t.shape[0]:
                raise ValueError("vocabularies differ; token embeddings cannot be inherited")
            if key == "visual.positional_embedding" and t.shape[0] != student_t.shape[0]:
                # Another image grid: resample the 2D table; the class-token row is kept as is.
                t_grid, s_grid = teacher.visual.grid_size, student.visual.grid_size
                t = resample_abs_pos_embed(t[None], list(s_grid), list(t_grid), num_prefix_tokens=1)[0]
            inherited[key] = _leading(t, student_t.shape, key)

    for key, t in inherited.items():
        s_state[key].copy_(t)
    if logit_scale:
        for key in ("logit_scale", "logit_bias"):
            if key in s_state and key in t_state and s_state[key].shape == t_state[key].shape:
                s_state[key].copy_(t_state[key])
    return kept
