"""MiniViT: weight-multiplexed students (students.minivit) and relation losses (recipes.minivit.relations)."""

import copy
import itertools
import math
from collections.abc import Iterator

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
    transformer_blocks,
)
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


PAPER_PARAMS_M = {
    "mini_deit_tiny_patch16_224": 3,
    "mini_deit_small_patch16_224": 11,
    "mini_deit_base_patch16_224": 44,
    "mini_swin_tiny_patch4_window7_224": 12,
    "mini_swin_small_patch4_window7_224": 26,
    "mini_swin_base_patch4_window7_224": 46,
}
DEIT_SHARE = [2]
SWIN_SHARE = [3, 2]  # a whole 3-block stage (shifted and unshifted blocks together), then a pair


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    # These models are tiny: a second OpenMP thread buys nothing, and on a loaded 2-core box it spins for seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    """Move the identity-initialised per-block transformations away from identity, differently per block."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AttentionHeadMix):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
            elif isinstance(module, DepthwiseConvTransform):
                module.conv.weight.normal_(std=0.05)
                module.norm.weight.add_(0.1 * torch.randn_like(module.norm.weight))


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --- multiplexed students ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "paper_m"), PAPER_PARAMS_M.items())
def test_registered_configs_match_paper_param_counts(name: str, paper_m: float) -> None:
    with torch.device("meta"):  # shapes only: counting needs no memory
        model = timm.create_model(name)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / (paper_m * 1e6) - 1) < 0.05, f"{name}: {params / 1e6:.2f}M vs paper {paper_m}M"


def test_create_model_passes_kwargs_to_timm() -> None:
    model = timm.create_model(
        "mini_deit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, embed_dim=48, num_heads=3, num_classes=10
    )
    assert model(images()).shape == (2, 10)
    assert model.patch_embed.num_patches == 64 and len(model.blocks) == 4
    assert model.minivit_share == (2,)

    swin = timm.create_model(
        "mini_swin_tiny_patch4_window7_224",
        img_size=32,
        window_size=4,
        embed_dim=16,
        depths=(3, 2),
        num_heads=(2, 4),
        num_classes=10,
        share=SWIN_SHARE,
    )
    assert swin(images()).shape == (2, 10)
    assert all(isinstance(block, MultiplexedSwinBlock) for stage in stages(swin) for block in stage)


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
    """A copy of a multiplexed model in which every block owns equal-valued copies of its shared modules."""
    model = copy.deepcopy(model)
    for block in transformer_blocks(model).values():
        for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            parent, name = path.rsplit(".", 1)
            setattr(block.get_submodule(parent), name, copy.deepcopy(block.get_submodule(path)))
    return model


@pytest.mark.parametrize("arch", TINY)
def test_shared_weight_gradient_is_sum_over_blocks(arch: str) -> None:
    make, share = TINY[arch]
    model = multiplex(make(), share)
    randomize_transformations(model)
    unshared = untie(model)
    assert not shared_module_names(unshared)

    x = images()
    out, out_unshared = model(x), unshared(x)
    torch.testing.assert_close(out, out_unshared)
    out.square().sum().backward()
    out_unshared.square().sum().backward()

    for group, group_unshared in zip(groups(model, share), groups(unshared, share), strict=True):
        for path in ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.bias"):
            summed = sum(block.get_parameter(path).grad for block in group_unshared)
            torch.testing.assert_close(group[0].get_parameter(path).grad, summed, rtol=1e-4, atol=1e-6)
            if len(group) > 1:  # and the sum is not just one block's share
                assert not torch.allclose(group[0].get_parameter(path).grad, group_unshared[0].get_parameter(path).grad)


@pytest.mark.parametrize("arch", TINY)
def test_fresh_multiplex_of_equal_blocks_computes_the_original(arch: str) -> None:
    make, share = TINY[arch]
    original = make().eval()
    with torch.no_grad():  # make the shared weights equal within each group; norms and biases stay per block
        for group in groups(original, share):
            for block, path in itertools.product(group[1:], ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")):
                block.get_submodule(path).load_state_dict(group[0].get_submodule(path).state_dict())
    mini = multiplex(copy.deepcopy(original), share)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(mini(x), original(x), rtol=1e-4, atol=1e-5)
    # the check has teeth: non-identity transformations change the output
    randomize_transformations(mini)
    with torch.no_grad():
        assert not torch.allclose(mini(x), original(x), atol=1e-3)


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


def test_multiplex_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="one group size per stage"):
        multiplex(tiny_swin(), [2])
    with pytest.raises(TypeError, match="already multiplexed"):
        multiplex(multiplex(tiny_deit(), 2), 2)


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


# --- relation losses -----------------------------------------------------------------------------------------------


def test_attention_relation_loss_matches_its_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 2, 5, 8, generator=gen), torch.randn(3, 2, 5, 12, generator=gen)
    heads = 2
    expected = []
    for i, j, h in itertools.product(range(3), range(3), range(heads)):
        s_i, s_j = (student[k][..., h * 4 : (h + 1) * 4] for k in (i, j))
        t_i, t_j = (teacher[k][..., h * 6 : (h + 1) * 6] for k in (i, j))
        p_t = (t_i @ t_j.transpose(-1, -2) / math.sqrt(6)).softmax(-1)
        log_p_s = (s_i @ s_j.transpose(-1, -2) / math.sqrt(4)).log_softmax(-1)
        soft_ce = -(p_t * log_p_s).sum(-1)
        entropy = -(p_t * p_t.log()).sum(-1)
        expected.append((soft_ce - entropy).mean())
    torch.testing.assert_close(attention_relation_loss(student, teacher, heads), torch.stack(expected).mean())
    torch.testing.assert_close(
        attention_relation_loss(tuple(student), tuple(teacher), heads), torch.stack(expected).mean()
    )


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
    student = timm.create_model(
        "mini_deit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2, num_classes=10
    )
    teacher = tiny_deit().eval()  # 3 heads of 16 vs the student's 2 heads of 16
    x = images(batch=3)
    with RelationCapture(student, [-1]) as s, RelationCapture(teacher, ["blocks.3"]) as t:
        student(x)
        with torch.no_grad():
            teacher(x)
    assert s.qkv["blocks.3"].shape == (3, 3, 17, 32) and t.qkv["blocks.3"].shape == (3, 3, 17, 48)
    assert s.tokens["blocks.3"].shape == (3, 17, 32)
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
    teacher = tiny_deit().eval()
    with torch.no_grad():  # sharpen the random teacher so its relations and predictions are far from uniform
        for block in teacher.blocks:
            block.attn.qkv.weight.normal_(std=0.2)
        teacher.head.weight.normal_(std=0.5)
    student = timm.create_model(
        "mini_deit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2, num_classes=10
    )
    x = images(batch=8)
    layers = [1, 3]  # the last block of each shared pair
    with torch.no_grad(), RelationCapture(teacher, layers) as teacher_capture:
        teacher_probs = teacher(x).softmax(dim=-1)

    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    history = []
    with RelationCapture(student, layers) as student_capture:
        for _ in range(21):
            soft_ce = torch.sum(-teacher_probs * F.log_softmax(student(x), dim=-1), dim=-1).mean()
            attention, hidden = relation_losses(student_capture, teacher_capture, relation_heads=4)
            history.append((soft_ce.item(), attention.item(), hidden.item()))
            # hidden at 1.0 rather than MiniViT's 0.1, so that 20 steps move it clearly
            loss = soft_ce + attention + hidden
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    (ce0, attn0, hidden0), (ce1, attn1, hidden1) = history[0], history[-1]
    assert ce1 < 0.8 * ce0 and attn1 < 0.97 * attn0 and hidden1 < 0.5 * hidden0, history
