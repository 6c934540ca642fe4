"""MiniViT: weight-multiplexed students (students.minivit), iRPE (students.irpe) and relation losses
(recipes.minivit.relations), each pinned against the reference's formulas written out here."""

import copy
import itertools
import math

import pytest
import safetensors
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from torch import nn

from recipes.minivit.relations import (
    RelationCapture,
    attention_relation_loss,
    hidden_relation_loss,
    reference_layer_pairs,
    transformer_blocks,
)
from students.irpe import ImageRPE, IRPEAttention, IRPEConfig, product_bucket_ids
from students.minivit import (
    AttentionHeadMix,
    DepthwiseConvTransform,
    MultiplexedSwinBlock,
    load_minivit,
    multiplex,
    save_minivit,
)


def shared_module_names(model: nn.Module) -> dict[str, list[str]]:
    """Map each shared module's first name to every name it appears under (modules used by >1 block only)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return {group[0]: group for group in names.values() if len(group) > 1}


def relation_losses(student: RelationCapture, teacher: RelationCapture, relation_heads: int):
    """(attention, hidden) relation losses averaged over the captures' layers, paired in order."""
    pairs = list(zip(student.layers, teacher.layers, strict=True))
    attention = [attention_relation_loss(student.qkv[s], teacher.qkv[t], relation_heads) for s, t in pairs]
    hidden = [hidden_relation_loss(student.tokens[s], teacher.tokens[t]) for s, t in pairs]
    return torch.stack(attention).mean(), torch.stack(hidden).mean()


# Parameter counts at 1000 classes. Paper: the MiniViT README (millions). Exact: what the reference's own model
# classes (Mini-DeiT mini_vision_transformer.VisionTransformer with iRPE, Mini-Swin SwinTransformerMiniViT with
# separate LayerNorms and both transformations) count for the same configurations.
MINI_PARAMS = {
    "mini_deit_tiny_patch16_224": (3, 3_090_304),
    "mini_deit_small_patch16_224": (11, 11_450_824),
    "mini_deit_base_patch16_224": (44, 44_098_408),
    "mini_deit_base_patch16_384": (44, 44_390_248),
    "mini_swin_tiny_patch4_window7_224": (12, 12_001_765),
    "mini_swin_small_patch4_window7_224": (26, 26_463_205),
    "mini_swin_base_patch4_window7_224": (46, 46_444_852),
}
# The iRPE repo's model zoo (DeiT-with-iRPE README, millions to two decimals).
IRPE_PARAMS_M = {
    "deit_tiny_patch16_224_ctx_product_50_shared_k": 5.76,
    "deit_small_patch16_224_ctx_product_50_shared_k": 22.09,
    "deit_small_patch16_224_ctx_product_50_shared_qk": 22.13,
    "deit_small_patch16_224_ctx_product_50_shared_qkv": 22.17,
    "deit_base_patch16_224_ctx_product_50_shared_k": 86.61,
    "deit_base_patch16_224_ctx_product_50_shared_qkv": 86.68,
}
DEIT_SHARE = [2]
SWIN_SHARE = [3, 2]  # a whole 3-block stage (shifted and unshifted blocks together), then a pair


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_deit(**kwargs) -> nn.Module:
    args = dict(img_size=32, patch_size=8, depth=4, embed_dim=48, num_heads=3, num_classes=10)
    return timm.create_model("deit_tiny_patch16_224", **{**args, **kwargs})


def tiny_swin(**kwargs) -> nn.Module:
    # 8x8 tokens in stage 0 (4x4 windows, shifted every other block), 4x4 in stage 1 (one window, no shift).
    args = dict(img_size=32, window_size=4, embed_dim=16, depths=(3, 2), num_heads=(2, 4), num_classes=10)
    args["drop_path_rate"] = 0.0  # timm's Swin default is 0.1: keep train-mode forwards deterministic
    return timm.create_model("swin_tiny_patch4_window7_224", **{**args, **kwargs})


TINY = {"deit": (tiny_deit, DEIT_SHARE), "swin": (tiny_swin, SWIN_SHARE)}


def stages(model: nn.Module) -> list[list[nn.Module]]:
    if hasattr(model, "layers"):
        return [list(stage.blocks) for stage in model.layers]
    return [list(model.blocks)]


def groups(model: nn.Module, share: list[int]) -> list[list[nn.Module]]:
    return [
        blocks[start : start + size]
        for blocks, size in zip(stages(model), share, strict=True)
        for start in range(0, len(blocks), size)
    ]


def randomize_transformations(model: nn.Module) -> None:
    """Move the per-block transformations (and iRPE tables) to large random values, differently per block."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AttentionHeadMix):
                module.weight.add_(torch.eye(len(module.weight)) + 0.2 * torch.randn_like(module.weight))
                if module.bias is not None:
                    module.bias.normal_(std=0.3)
            elif isinstance(module, DepthwiseConvTransform):
                module.conv.weight.normal_(std=0.05)
                module.norm.weight.add_(0.1 * torch.randn_like(module.norm.weight))
            elif isinstance(module, ImageRPE):
                module.lookup_table_weight.normal_(std=0.5)


def images(batch: int = 2, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- registered models ---------------------------------------------------------------------------------------------


def count(name: str) -> int:
    with torch.device("meta"):  # shapes only: counting needs no memory
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "expected"), MINI_PARAMS.items())
def test_mini_models_have_the_references_parameter_counts(name: str, expected: tuple[int, int]) -> None:
    paper_m, reference = expected
    params = count(name)
    assert params == reference
    assert abs(params / (paper_m * 1e6) - 1) < 0.05, f"{name}: {params / 1e6:.2f}M vs paper {paper_m}M"


@pytest.mark.parametrize(("name", "published_m"), IRPE_PARAMS_M.items())
def test_irpe_deits_have_the_published_parameter_counts(name: str, published_m: float) -> None:
    assert round(count(name) / 1e6, 2) == published_m


def test_mini_deit_is_a_class_token_free_irpe_deit() -> None:
    model = timm.create_model(
        "mini_deit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, embed_dim=48, num_heads=3, num_classes=10
    )
    assert model(images()).shape == (2, 10)
    assert model.cls_token is None and model.num_prefix_tokens == 0 and model.pos_embed.shape == (1, 64, 48)
    assert len(model.blocks) == 4 and model.minivit_share == (2,)
    # LayerNorm on every token, then their average: the reference's head
    tokens = model.forward_features(images())
    torch.testing.assert_close(model.forward_head(tokens), model.head(tokens.mean(dim=1)))
    for i, block in enumerate(model.blocks):
        rpe = block.attn.rpe_k  # contextual product on keys, shared by the heads, ratio 1.9, no skip token
        assert (rpe.config.mode, rpe.config.shared_head, rpe.config.ratio, rpe.config.skip) == (
            "contextual",
            True,
            1.9,
            0,
        )
        assert rpe.lookup_table_weight.shape == (1, 16, 49) and not rpe.lookup_table_weight.any()
        assert block.attn.rpe_q is None and block.attn.rpe_v is None
        assert block.attn.logit_mix.bias is None  # Mini-DeiT's head mixes: 1x1 conv without bias
        assert block.attn.qkv is model.blocks[i - i % 2].attn.qkv
        assert block.attn.rpe_k is not model.blocks[i ^ 1].attn.rpe_k  # one encoding per block


def test_mini_swin_shares_the_bias_table_per_group_and_mixes_with_bias() -> None:
    model = multiplex(tiny_swin(), SWIN_SHARE)
    for group in groups(model, SWIN_SHARE):
        assert all(b.attn.relative_position_bias_table is group[0].attn.relative_position_bias_table for b in group)
        assert all(b.attn.logit_mix.bias is not None and b.attn.prob_mix.bias is not None for b in group)
    tables = {id(b.attn.relative_position_bias_table) for stage in stages(model) for b in stage}
    assert len(tables) == 2


def test_transform_init_reference_and_identity() -> None:
    torch.manual_seed(0)
    model = multiplex(tiny_swin(embed_dim=64, num_heads=(8, 16)), SWIN_SHARE)
    mixes = [m for m in model.modules() if isinstance(m, AttentionHeadMix)]
    weights = torch.cat([m.weight.flatten() for m in mixes])
    assert 0.015 < weights.std().item() < 0.025 and weights.mean().abs() < 0.005  # trunc_normal(std=0.02)
    assert all(not m.bias.any() for m in mixes)
    convs = [m.conv for m in model.modules() if isinstance(m, DepthwiseConvTransform)]
    bound = 1 / math.sqrt(49)  # PyTorch's default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for conv in convs:
        assert conv.weight.abs().max() <= bound and conv.weight.std() > 0.5 * bound / math.sqrt(3)
        assert conv.bias.abs().max() <= bound and conv.bias.any()

    model = multiplex(tiny_swin(), SWIN_SHARE, transform_init="identity")
    for m in model.modules():
        if isinstance(m, AttentionHeadMix):
            assert torch.equal(m.weight, torch.eye(len(m.weight))) and not m.bias.any()
        elif isinstance(m, DepthwiseConvTransform):
            assert not m.conv.weight.any() and not m.conv.bias.any()


def test_create_model_passes_kwargs_to_timm() -> None:
    swin = timm.create_model(
        "mini_swin_tiny_patch4_window7_224",
        img_size=32,
        window_size=4,
        embed_dim=16,
        depths=(3, 2),
        num_heads=(2, 4),
        num_classes=10,
        share=SWIN_SHARE,
        mask_unshifted=True,
    )
    assert swin(images()).shape == (2, 10)
    assert all(isinstance(block, MultiplexedSwinBlock) for stage in stages(swin) for block in stage)
    stage0, stage1 = stages(swin)  # the unshifted blocks of the shifting stage are masked; the 1-window stage not
    assert all(block.attn_mask is not None for block in stage0) and all(b.attn_mask is None for b in stage1)
    torch.testing.assert_close(stage0[0].attn_mask, stage0[1].attn_mask)
    deit = timm.create_model("mini_deit_tiny_patch16_224", rpe=False, transform_init="identity", **TINY_DEIT_KW)
    assert all(block.attn.rpe_k is None for block in deit.blocks)
    assert torch.equal(deit.blocks[0].attn.logit_mix.weight, torch.eye(3))


TINY_DEIT_KW = dict(img_size=32, patch_size=8, depth=4, embed_dim=48, num_heads=3, num_classes=10)


@pytest.mark.parametrize("arch", TINY)
def test_shared_weights_are_one_parameter(arch: str) -> None:
    make, share = TINY[arch]
    model = multiplex(make(), share)
    for group in groups(model, share):
        for block, path in itertools.product(group, ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")):
            assert block.get_submodule(path).weight is group[0].get_submodule(path).weight
        # per-block parts stay per block
        assert len({id(block.norm1.weight) for block in group}) == len(group)
        assert len({id(block.attn.logit_mix.weight) for block in group}) == len(group)
    first_blocks = [group[0] for group in groups(model, share)]
    assert len({id(block.attn.qkv.weight) for block in first_blocks}) == len(first_blocks)

    params = list(model.parameters())
    assert len(params) == len({id(p) for p in params})
    assert len(list(model.named_parameters(remove_duplicate=False))) > len(params)
    optimizer = torch.optim.AdamW(model.parameters())
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(params)
    assert len(shared_module_names(model)) == 4 * sum(len(group) > 1 for group in groups(model, share))


def untie(model: nn.Module) -> nn.Module:
    """A copy of a multiplexed model in which every block owns equal-valued copies of its shared weights."""
    model = copy.deepcopy(model)
    for block in transformer_blocks(model).values():
        for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            parent, name = path.rsplit(".", 1)
            setattr(block.get_submodule(parent), name, copy.deepcopy(block.get_submodule(path)))
        if hasattr(block.attn, "relative_position_bias_table"):
            block.attn.relative_position_bias_table = nn.Parameter(block.attn.relative_position_bias_table.clone())
    return model


@pytest.mark.parametrize("arch", TINY)
def test_shared_weight_gradient_is_sum_over_blocks(arch: str) -> None:
    make, share = TINY[arch]
    model = multiplex(make(), share, rpe=IRPEConfig() if arch == "deit" else None)
    randomize_transformations(model)
    unshared = untie(model)
    assert not shared_module_names(unshared)

    x = images()
    out, out_unshared = model(x), unshared(x)
    torch.testing.assert_close(out, out_unshared)
    out.square().sum().backward()
    out_unshared.square().sum().backward()

    paths = ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.bias"]
    if arch == "swin":
        paths.append("attn.relative_position_bias_table")
    for group, group_unshared in zip(groups(model, share), groups(unshared, share), strict=True):
        for path in paths:
            summed = sum(block.get_parameter(path).grad for block in group_unshared)
            torch.testing.assert_close(group[0].get_parameter(path).grad, summed, rtol=1e-4, atol=1e-6)
            if len(group) > 1:  # and the sum is not just one block's share
                assert not torch.allclose(group[0].get_parameter(path).grad, group_unshared[0].get_parameter(path).grad)


def test_identity_init_multiplex_of_equal_blocks_computes_the_original_deit() -> None:
    original = tiny_deit().eval()
    with torch.no_grad():  # make the shared weights equal within each group; norms and biases stay per block
        for group in groups(original, DEIT_SHARE):
            for block, path in itertools.product(group[1:], ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")):
                block.get_submodule(path).load_state_dict(group[0].get_submodule(path).state_dict())
    mini = multiplex(copy.deepcopy(original), DEIT_SHARE, rpe=IRPEConfig(), transform_init="identity")
    x = images()
    with torch.no_grad():  # identity mixes and zero iRPE tables: the original function
        torch.testing.assert_close(mini(x), original(x), rtol=1e-4, atol=1e-5)
        reference_init = multiplex(copy.deepcopy(original), DEIT_SHARE)
        assert not torch.allclose(reference_init(x), original(x), atol=1e-3)  # the reference's init is not identity
    randomize_transformations(mini)
    with torch.no_grad():
        assert not torch.allclose(mini(x), original(x), atol=1e-3)


# --- the Swin block against the reference's order of operations -------------------------------------------------


def reference_swin_block(block: nn.Module, x: torch.Tensor, shift: int, mask_shift: int) -> torch.Tensor:
    """The reference's Mini-Swin block (swin_transformer_minivit.SwinTransformerBlock.forward_feature) written out
    with `block`'s weights, on (B, H, W, C) maps: the map rolled by `shift`, the mask of the layout rolled by
    `mask_shift` (the reference masks unshifted repeats too: shift 0, mask_shift window // 2)."""
    B, H, W, C = x.shape
    attn, ws, heads = block.attn, block.window_size[0], block.attn.num_heads
    n, d = ws * ws, C // heads

    def linear(t: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        return t @ layer.weight.T + (layer.bias if layer.bias is not None else 0)

    def norm(t: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + layer.eps) * layer.weight + layer.bias

    def head_linear(maps: torch.Tensor, mix: nn.Module) -> torch.Tensor:  # nn.Linear(heads, heads) on the head axis
        return linear(maps.permute(0, 2, 3, 1), mix).permute(0, 3, 1, 2)

    h = norm(x, block.norm1)
    if shift:
        h = torch.roll(h, (-shift, -shift), (1, 2))
    windows = h.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, C)
    q, k, v = linear(windows, attn.qkv).view(-1, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    bias = torch.empty(heads, n, n)
    for i, j in itertools.product(range(n), repeat=2):  # relative position (dy, dx) of token i from token j
        dy, dx = i // ws - j // ws, i % ws - j % ws
        bias[:, i, j] = attn.relative_position_bias_table[(dy + ws - 1) * (2 * ws - 1) + dx + ws - 1]
    logits = head_linear(q * d**-0.5 @ k.transpose(-1, -2) + bias, attn.logit_mix)
    if mask_shift:  # regions of the rolled map: tokens of different regions must not attend to each other
        edges = [0] * (H - ws) + [1] * (ws - mask_shift) + [2] * mask_shift
        region = torch.tensor([3 * r + c for r in edges for c in edges], dtype=torch.float).view(1, H, W, 1)
        region = region.view(1, H // ws, ws, W // ws, ws, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, n)
        mask = (region[:, :, None] != region[:, None, :]).float() * -100.0
        logits = (logits.view(B, -1, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
    probs = head_linear(logits.softmax(-1), attn.prob_mix)
    out = linear((probs @ v).transpose(1, 2).reshape(-1, n, C), attn.proj)
    out = out.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    x = x + out
    transform = block.mlp_transform  # x = LN(x); x = x + DWConv(x)
    x = norm(x, transform.norm)
    conv = F.conv2d(x.permute(0, 3, 1, 2), transform.conv.weight, transform.conv.bias, padding=3, groups=C)
    x = x + conv.permute(0, 2, 3, 1)
    hidden = F.gelu(linear(norm(x, block.norm2), block.mlp.fc1))
    return x + linear(hidden, block.mlp.fc2)


def test_swin_blocks_compute_the_references_order_on_the_same_weights() -> None:
    torch.manual_seed(0)
    model = multiplex(tiny_swin(), SWIN_SHARE).eval()
    randomize_transformations(model)
    x = torch.randn(2, 8, 8, 16)
    stage = model.layers[0].blocks
    with torch.no_grad():
        for block, shift in ((stage[0], 0), (stage[1], 2), (stage[2], 0)):
            assert block.shift_size == (shift, shift)
            torch.testing.assert_close(block(x), reference_swin_block(block, x, shift, shift), rtol=1e-4, atol=1e-5)
        # mask_unshifted: the reference's quirk, its mask on the unshifted repeats too
        stage[0].set_mask_unshifted(True)
        torch.testing.assert_close(stage[0](x), reference_swin_block(stage[0], x, 0, 2), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(stage[0](x), reference_swin_block(stage[0], x, 0, 0), atol=1e-3)
        stage[0].set_mask_unshifted(False)
        # the check has teeth: the previous placement x + DWConv(LN(x)) gives another function
        transform = stage[0].mlp_transform
        h = x + stage[0].drop_path1(stage[0]._attn(stage[0].norm1(x)))
        old = h + transform.conv(transform.norm(h).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        assert not torch.allclose(transform(h), old, atol=1e-2)


def test_shared_bias_table_is_resized_once_with_the_window() -> None:
    model = multiplex(tiny_swin(img_size=48, window_size=4), SWIN_SHARE)
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    model.set_input_size(img_size=(48, 48), window_size=6)
    blocks = model.layers[0].blocks
    assert all(b.attn.relative_position_bias_table is table for b in blocks) and table.shape == (121, 2)
    assert model(images(size=48)).shape == (2, 10)


# --- save, load, init ----------------------------------------------------------------------------------------------


def test_init_from_keeps_each_groups_first_block(tmp_path) -> None:
    trained = tiny_deit()
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_()
    torch.save(trained.state_dict(), tmp_path / "trained.pth")
    for source in (trained, trained.state_dict(), str(tmp_path / "trained.pth")):
        mini = multiplex(tiny_deit(), DEIT_SHARE, init_from=source)
        for index in range(4):
            first = trained.blocks[index - index % 2]
            assert torch.equal(mini.blocks[index].attn.qkv.weight, first.attn.qkv.weight)
            assert torch.equal(mini.blocks[index].mlp.fc2.weight, first.mlp.fc2.weight)
            assert torch.equal(mini.blocks[index].norm1.weight, trained.blocks[index].norm1.weight)
        assert torch.equal(mini.head.weight, trained.head.weight)


def test_finetune_from_resamples_the_position_embedding_bicubic() -> None:
    small = timm.create_model("mini_deit_tiny_patch16_224", **TINY_DEIT_KW)  # 4 x 4 patches
    randomize_transformations(small)
    big = timm.create_model(
        "mini_deit_tiny_patch16_224", **{**TINY_DEIT_KW, "img_size": 48, "num_classes": 7}, finetune_from=small
    )
    grid = small.pos_embed.detach().reshape(1, 4, 4, 48).permute(0, 3, 1, 2)  # DeiT's --finetune, written out
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(big.pos_embed.detach(), expected.reshape(1, 36, 48))
    assert torch.equal(big.blocks[3].attn.rpe_k.lookup_table_weight, small.blocks[3].attn.rpe_k.lookup_table_weight)
    assert torch.equal(big.blocks[1].attn.prob_mix.weight, small.blocks[1].attn.prob_mix.weight)
    assert big.head.weight.shape == (7, 48) and big.blocks[1].attn.qkv is big.blocks[0].attn.qkv
    assert big(images(size=48)).shape == (2, 7)


def test_multiplex_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="one group size per stage"):
        multiplex(tiny_swin(), [2])
    with pytest.raises(TypeError, match="already multiplexed"):
        multiplex(multiplex(tiny_deit(), 2), 2)
    with pytest.raises(TypeError, match="iRPE"):
        multiplex(tiny_swin(), SWIN_SHARE, rpe=IRPEConfig())
    with pytest.raises(ValueError, match="transform_init"):
        multiplex(tiny_deit(), 2, transform_init="zero")
    with pytest.raises(ValueError, match="from scratch"):
        timm.create_model("mini_deit_tiny_patch16_224", pretrained=True)


@pytest.mark.parametrize("arch", TINY)
def test_checkpoint_roundtrip(arch: str, tmp_path) -> None:
    make, share = TINY[arch]
    model = multiplex(make(), share).eval()
    randomize_transformations(model)
    path = tmp_path / "mini.safetensors"
    save_minivit(model, path)
    with safetensors.safe_open(path, "pt") as stored:  # each shared tensor is stored once
        assert len(stored.keys()) < len(model.state_dict())

    fresh = multiplex(make(), share).eval()
    load_minivit(fresh, path)
    x = images()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert not shared_module_names(fresh).keys() ^ shared_module_names(model).keys()
    assert all(fresh_block.attn.qkv is group[0].attn.qkv for group in groups(fresh, share) for fresh_block in group)

    plain = multiplex(make(), share).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    with pytest.raises(RuntimeError):  # why save_minivit exists
        safetensors.torch.save_file(model.state_dict(), tmp_path / "raw.safetensors")


@pytest.mark.parametrize(
    ("name", "batch"), [("mini_deit_tiny_patch16_224", 2), ("mini_swin_tiny_patch4_window7_224", 1)]
)
def test_full_size_forward_and_backward_at_224(name: str, batch: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    out = model(torch.randn(batch, 3, 224, 224))
    assert out.shape == (batch, 10) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "mix" in n or "mlp_transform" in n)


# --- iRPE ----------------------------------------------------------------------------------------------------------


def piecewise(d: int, ratio: float) -> int:
    """iRPE's piecewise index (the paper's Eq. 18 with alpha = ratio, beta = 2 ratio, gamma = 8 ratio), scalar."""
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    if abs(d) <= alpha:
        return d
    far = round(alpha + math.log(abs(d) / alpha) / math.log(gamma / alpha) * (beta - alpha))
    return int(math.copysign(min(far, int(beta)), d))


def test_piecewise_index_at_the_references_ratio() -> None:
    # ratio 1.9: exact up to 1, then 1.9 (1 + ln(d / 1.9) / ln 8) rounded (2 at d = 2, 3; 3 from d = 4), at most 3
    assert [piecewise(d, 1.9) for d in range(8)] == [0, 1, 2, 2, 3, 3, 3, 3]
    assert [piecewise(-d, 1.9) for d in range(8)] == [0, -1, -2, -2, -3, -3, -3, -3]
    assert IRPEConfig().num_buckets == 49 and IRPEConfig(skip=1).num_buckets == 50


@pytest.mark.parametrize(("height", "width", "skip", "ratio"), [(5, 5, 0, 1.9), (3, 7, 1, 1.9), (6, 6, 0, 1.0)])
def test_product_buckets_follow_the_relative_position_of_each_pair(height, width, skip, ratio) -> None:
    ids = product_bucket_ids(height, width, ratio, skip)
    b = int(2 * ratio)
    size = height * width
    assert ids.shape == (skip + size, skip + size)
    for i, j in itertools.product(range(size), repeat=2):
        dr, dc = i // width - j // width, i % width - j % width
        assert ids[skip + i, skip + j] == (piecewise(dr, ratio) + b) * (2 * b + 1) + piecewise(dc, ratio) + b
    if skip:
        assert (ids[:skip] == (2 * b + 1) ** 2).all() and (ids[:, :skip] == (2 * b + 1) ** 2).all()


def loop_buckets(side: int, skip: int, ratio: float = 1.9) -> dict[tuple[int, int], int]:
    b, extra = int(2 * ratio), (2 * int(2 * ratio) + 1) ** 2
    out = {}
    for i, j in itertools.product(range(skip + side * side), repeat=2):
        if i < skip or j < skip:
            out[i, j] = extra
            continue
        p, q = i - skip, j - skip
        dr, dc = p // side - q // side, p % side - q % side
        out[i, j] = (piecewise(dr, ratio) + b) * (2 * b + 1) + piecewise(dc, ratio) + b
    return out


@pytest.mark.parametrize(("skip", "shared"), [(0, True), (1, False)])
def test_irpe_contextual_product_terms_equal_a_loop_over_pairs(skip: int, shared: bool) -> None:
    torch.manual_seed(0)
    heads, dim, side = 2, 4, 5
    n = skip + side * side
    buckets = loop_buckets(side, skip)
    x = torch.randn(2, heads, n, dim)
    attn = torch.randn(2, heads, n, n).softmax(-1)
    for on in "kqv":
        rpe = ImageRPE(IRPEConfig(skip=skip, shared_head=shared, on=on), dim, heads, on)
        with torch.no_grad():
            rpe.lookup_table_weight.normal_()
        table = rpe.lookup_table_weight.detach()
        out = rpe(attn if on == "v" else x)
        expected = torch.zeros_like(out)
        for h, (i, j) in itertools.product(range(heads), buckets):
            r = table[0 if shared else h]
            if on in "kq":  # keys: logit[i, j] += q_i . r[bucket(i, j)]; queries: the attention transposes it
                expected[:, h, i, j] = x[:, h, i] @ r[:, buckets[i, j]]
            else:  # out_i += sum_j attn[i, j] r[bucket(i, j)]
                expected[:, h, i] += attn[:, h, i, j, None] * r[buckets[i, j]]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_irpe_attention_adds_the_key_term_to_the_scaled_logits() -> None:
    torch.manual_seed(0)
    plain = tiny_deit(depth=1).eval()
    attn = IRPEAttention.from_timm(copy.deepcopy(plain.blocks[0].attn), IRPEConfig(skip=1, on="k"))
    with torch.no_grad():
        attn.rpe_k.lookup_table_weight.normal_()
    x = torch.randn(2, 17, 48)
    qkv = attn.qkv(x).view(2, 17, 3, 3, 16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] / 4, qkv[1], qkv[2]  # head_dim 16: scale 1/4
    buckets = loop_buckets(4, 1)
    rel = torch.zeros(2, 3, 17, 17)
    for i, j in buckets:
        rel[:, :, i, j] = q[:, :, i] @ attn.rpe_k.lookup_table_weight[0, :, buckets[i, j]]
    probs = (q @ k.transpose(-1, -2) + rel).softmax(-1)
    expected = attn.proj((probs @ v).transpose(1, 2).reshape(2, 17, 48))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
        attn.rpe_k.lookup_table_weight.zero_()  # zero tables: timm's attention on the same weights
        torch.testing.assert_close(attn(x), plain.blocks[0].attn(x), rtol=1e-5, atol=1e-6)


def test_irpe_deit_registers_and_trains() -> None:
    model = timm.create_model("deit_small_patch16_224_ctx_product_50_shared_qkv", **TINY_DEIT_KW)
    assert all(block.attn.rpe_q.config.skip == 1 for block in model.blocks)
    model(images()).sum().backward()
    assert model.blocks[0].attn.rpe_v.lookup_table_weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="square grid"):
        model.blocks[0].attn.rpe_k(torch.randn(1, 3, 20, 16))


# --- relation losses -----------------------------------------------------------------------------------------------


def reference_attention_relation(student: torch.Tensor, teacher: torch.Tensor, ar: int) -> torch.Tensor:
    """Mini-Swin main.py's cal_relation_loss for one layer: for the nine (i, j) in {Q, K, V}^2, the soft
    cross-entropy (batch, relation heads and tokens averaged) of softmax(S_i S_j^T / sqrt(C / Ar)) against the
    teacher's, summed and divided by 9."""
    total = 0.0
    for i, j in itertools.product(range(3), repeat=2):
        rel = []
        for x in (student, teacher):
            B, N, C = x[i].shape
            xi = x[i].view(B, N, ar, C // ar).transpose(1, 2) / (C / ar) ** 0.5
            xj = x[j].view(B, N, ar, C // ar).permute(0, 2, 3, 1)
            rel.append(xi @ xj)
        total = total + torch.sum(-rel[1].softmax(-1) * rel[0].log_softmax(-1), dim=-1).mean()
    return total / 9


def teacher_relation_entropy(teacher: torch.Tensor, ar: int) -> torch.Tensor:
    total = 0.0
    for i, j in itertools.product(range(3), repeat=2):
        B, N, C = teacher[i].shape
        xi = teacher[i].view(B, N, ar, C // ar).transpose(1, 2) / (C / ar) ** 0.5
        p = (xi @ teacher[j].view(B, N, ar, C // ar).permute(0, 2, 3, 1)).softmax(-1)
        total = total - (p * p.log()).sum(-1).mean()
    return total / 9


@pytest.mark.parametrize("relation_heads", [1, 4])
def test_attention_relation_is_the_references_soft_ce_minus_a_constant(relation_heads: int) -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 2, 5, 8, generator=gen, requires_grad=True)
    teacher = torch.randn(3, 2, 5, 12, generator=gen)
    ours = attention_relation_loss(student, teacher, relation_heads)
    reference = reference_attention_relation(student, teacher, relation_heads)
    # ours is KL = soft CE - the teacher's entropy: the same gradient, zero when the relations are equal
    torch.testing.assert_close(ours + teacher_relation_entropy(teacher, relation_heads), reference)
    (grad_ours,) = torch.autograd.grad(ours, student)
    (grad_reference,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(attention_relation_loss(tuple(student), tuple(teacher), relation_heads), ours)


def test_hidden_relation_is_49_times_the_gram_mse() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 12, generator=gen)
    squares = []
    for b, i, j in itertools.product(range(2), range(5), range(5)):
        s = torch.dot(student[b, i], student[b, j]) / (student[b, i].norm() * student[b, j].norm())
        t = torch.dot(teacher[b, i], teacher[b, j]) / (teacher[b, i].norm() * teacher[b, j].norm())
        squares.append((s - t) ** 2)
    expected = 49 * torch.stack(squares).mean()  # Mini-Swin main.py: mean((S - T)^2) * 49
    torch.testing.assert_close(hidden_relation_loss(student, teacher), expected)
    torch.testing.assert_close(hidden_relation_loss(student, teacher, scale=1.0), expected / 49)


def meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def test_reference_layer_pairs_are_the_readmes() -> None:
    narrow = {"embed_dim": 4, "num_heads": (1, 1, 1, 1)}  # the pairs depend on the depths only
    swin_b = meta("swin_base_patch4_window7_224", **narrow)
    # Mini-Swin README: --student_layer_list 11_9_7_5_3_1 --teacher_layer_list 23_21_15_9_3_1 (Mini-Swin-T) and
    # 23_21_15_9_3_1 on both sides (Mini-Swin-S/B); the reference zips them in forward order
    tiny = reference_layer_pairs(meta("mini_swin_tiny_patch4_window7_224", **narrow), swin_b)
    assert tiny == [[1, 1], [3, 3], [5, 9], [7, 15], [9, 21], [11, 23]]
    small = reference_layer_pairs(meta("mini_swin_small_patch4_window7_224", **narrow), swin_b)
    assert small == [[b, b] for b in (1, 3, 9, 15, 21, 23)]
    deit = meta("mini_deit_tiny_patch16_224", embed_dim=4, num_heads=1)
    assert reference_layer_pairs(deit, meta("deit_base_patch16_224", embed_dim=4, num_heads=1)) == [
        [3, 3],
        [7, 7],
        [11, 11],
    ]
    with pytest.raises(ValueError, match="stage to stage"):
        reference_layer_pairs(deit, swin_b)


@pytest.mark.parametrize("arch", ["deit", "swin", "mini_deit", "mini_swin"])
def test_relation_losses_zero_for_same_model_positive_otherwise(arch: str) -> None:
    make, share = TINY[arch.removeprefix("mini_")]
    model = make().eval()
    if arch.startswith("mini_"):
        model = multiplex(model, share)
        randomize_transformations(model)
    same, other = copy.deepcopy(model), make().eval()
    if arch.startswith("mini_"):
        other = multiplex(other, share)
    layers = [1, -1]
    x = images()
    with torch.no_grad(), RelationCapture(model, layers) as s, RelationCapture(same, layers) as t:
        model(x)
        same(x)
        attention, hidden = relation_losses(s, t, relation_heads=2)
    assert attention.item() == 0.0 and hidden.item() == 0.0
    with torch.no_grad(), RelationCapture(other, layers) as o:
        other(x)
        attention, hidden = relation_losses(s, o, relation_heads=2)
    assert attention.item() > 0 and hidden.item() > 0


def test_capture_shapes_and_unequal_head_counts() -> None:
    student = timm.create_model("mini_deit_tiny_patch16_224", **{**TINY_DEIT_KW, "embed_dim": 32, "num_heads": 2})
    teacher = tiny_deit(class_token=False, global_pool="avg", fc_norm=False).eval()  # 3 heads of 16 vs 2 of 16
    x = images(batch=3)
    with RelationCapture(student, [-1]) as s, RelationCapture(teacher, ["blocks.3"]) as t:
        student(x)
        with torch.no_grad():
            teacher(x)
    assert s.qkv["blocks.3"].shape == (3, 3, 16, 32) and t.qkv["blocks.3"].shape == (3, 3, 16, 48)
    assert s.tokens["blocks.3"].shape == (3, 16, 32)
    attention = attention_relation_loss(s.qkv["blocks.3"], t.qkv["blocks.3"], relation_heads=4)
    hidden = hidden_relation_loss(s.tokens["blocks.3"], t.tokens["blocks.3"])
    assert attention.item() > 0 and hidden.item() > 0
    (attention + hidden).backward()
    assert student.blocks[3].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="does not divide"):
        attention_relation_loss(s.qkv["blocks.3"], t.qkv["blocks.3"], relation_heads=3)

    # Swin: one row per window; the capture follows the block, not the shared qkv it calls
    swin = multiplex(tiny_swin(), SWIN_SHARE)
    with RelationCapture(swin, [0, 1]) as c:
        swin(x)
    assert c.qkv["layers.0.blocks.0"].shape == (3, 3 * 4, 16, 16)
    assert c.tokens["layers.0.blocks.1"].shape == (3, 64, 16)
    assert not torch.equal(c.qkv["layers.0.blocks.0"], c.qkv["layers.0.blocks.1"])


def test_distilling_a_multiplexed_student_lowers_all_three_losses() -> None:
    torch.manual_seed(0)
    teacher = tiny_deit(class_token=False, global_pool="avg", fc_norm=False).eval()
    with torch.no_grad():  # sharpen the random teacher so its relations and predictions are far from uniform
        for block in teacher.blocks:
            block.attn.qkv.weight.normal_(std=0.2)
        teacher.head.weight.normal_(std=0.5)
    student = timm.create_model("mini_deit_tiny_patch16_224", **{**TINY_DEIT_KW, "embed_dim": 32, "num_heads": 2})
    x = images(batch=8)
    layers = [1, 3]  # the last block of each shared pair
    with torch.no_grad(), RelationCapture(teacher, layers) as teacher_capture:
        teacher_probs = teacher(x).softmax(dim=-1)

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    history = []
    with RelationCapture(student, layers) as student_capture:
        for _ in range(21):
            soft_ce = torch.sum(-teacher_probs * F.log_softmax(student(x), dim=-1), dim=-1).mean()
            attention, hidden = relation_losses(student_capture, teacher_capture, relation_heads=1)
            history.append((soft_ce.item(), attention.item(), hidden.item()))
            loss = soft_ce + attention + 0.1 * hidden
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    (ce0, attn0, hidden0), (ce1, attn1, hidden1) = history[0], history[-1]
    # the reference's init starts the head mixes near zero, so the prediction term moves slowest
    assert ce1 < 0.9 * ce0 and attn1 < 0.5 * attn0 and hidden1 < 0.5 * hidden0, history
