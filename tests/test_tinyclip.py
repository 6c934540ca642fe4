"""TinyCLIP building blocks: configs, affinity loss, manual inheritance, L0 masks and physical pruning."""

import io
import json
import logging
import math
import os
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from distill.evaluate import zero_shot_classifier
from recipes.tinyclip.affinity import affinity_loss, clip_contrastive_loss
from recipes.tinyclip.inheritance import inherit_weights, uniform_layer_indices
from recipes.tinyclip.masks import CLIPPruningMasks, HardConcreteMask, MaskedCLIP, SparsityLagrangian, prune
from students.clip_pruned import create_pruned_model
from students.tinyclip import TINYCLIP_CONFIGS, TINYCLIP_NOMINAL_SIZES, tower_param_counts

logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random init on every create_model

TEST = "TinyCLIP-test"


def clip_cfg(width: int = 32, layers: int = 2, head_width: int = 8, text_context: int = 16, embed_dim: int = 16):
    """A toy open_clip config: ViT and text towers of the same width and depth (vocab 1000 keeps it small)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": layers, "width": width, "patch_size": 8, "head_width": head_width},
        "text_cfg": {
            "context_length": text_context,
            "vocab_size": 1000,
            "width": width,
            "heads": width // head_width,
            "layers": layers,
        },
    }


def inputs(batch: int = 3, context: int = 16, vocab: int = 1000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(1, vocab, (batch, context), generator=g)


def features(model, images, texts):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


# -- configs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINYCLIP_NOMINAL_SIZES))
def test_tinyclip_config_tower_sizes(name):
    assert name in open_clip.list_models()
    with torch.device("meta"):
        model = open_clip.create_model(name, device="meta")
    for count, nominal in zip(tower_param_counts(model), TINYCLIP_NOMINAL_SIZES[name], strict=True):
        assert abs(count - nominal) <= max(0.1 * nominal, 500_000), (name, count, nominal)


# A fresh interpreter: open_clip alone does not know the config, `import students` (the package) registers it.
_REGISTRATION_PROBE = """
import open_clip
try:
    open_clip.create_model("TinyCLIP-ViT-39M-16-Text-19M")
except RuntimeError as error:
    print("before:", str(error).split(" Available:")[0])
import students
model = open_clip.create_model("TinyCLIP-ViT-39M-16-Text-19M")
print("after:", type(model).__name__, model.visual.conv1.kernel_size, model.visual.transformer.width)
"""


def test_importing_students_registers_the_configs_with_open_clip():
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", _REGISTRATION_PROBE], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    before = "before: Model config for 'TinyCLIP-ViT-39M-16-Text-19M' not found in built-ins."
    after = f"after: CLIP (16, 16) {TINYCLIP_CONFIGS['TinyCLIP-ViT-39M-16-Text-19M']['vision_cfg']['width']}"
    assert out.stdout.splitlines() == [before, after]


def test_test_config_runs_with_open_clip_tokenizer():
    model = open_clip.create_model(TEST).eval()
    tokenizer = open_clip.get_tokenizer(TEST)
    tokens = tokenizer(["a photo of a cat", "a dog"])
    assert tokens.shape == (2, TINYCLIP_CONFIGS[TEST]["text_cfg"]["context_length"])
    image_features, text_features = features(model, torch.randn(2, 3, 32, 32), tokens)
    assert image_features.shape == text_features.shape == (2, 16)


# -- affinity loss ---------------------------------------------------------------------------------------------


def test_affinity_loss_is_zero_for_identical_features_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    # Scaling does not matter (features are normalised); the minimum is exactly the teacher's entropy term.
    assert affinity_loss(2 * img, 3 * txt, img, txt).abs() < 1e-5
    other = affinity_loss(torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g), img, txt)
    assert other > 0.1


def test_affinity_loss_is_soft_cross_entropy_minus_teacher_entropy():
    g = torch.Generator().manual_seed(1)
    s_img, s_txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    t_img, t_txt = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g)

    def soft_ce_minus_entropy(student_logits, teacher_logits):
        p = teacher_logits.softmax(-1)
        ce = -(p * student_logits.log_softmax(-1)).sum(-1).mean()
        entropy = -(p * teacher_logits.log_softmax(-1)).sum(-1).mean()
        return ce - entropy

    n = F.normalize
    expected = 0.5 * soft_ce_minus_entropy(50 * n(s_img) @ n(s_txt).T, 50 * n(t_img) @ n(t_txt).T)
    expected += 0.5 * soft_ce_minus_entropy(50 * n(s_txt) @ n(s_img).T, 50 * n(t_txt) @ n(t_img).T)
    torch.testing.assert_close(affinity_loss(s_img, s_txt, t_img, t_txt), expected)

    s_img.requires_grad_(True)
    t_img.requires_grad_(True)
    affinity_loss(s_img, s_txt, t_img, t_txt).backward()
    assert s_img.grad.abs().sum() > 0 and t_img.grad is None  # the teacher is a target only


def test_contrastive_loss_of_aligned_pairs_is_near_zero():
    # Perfectly aligned pairs at a large scale: contrastive loss near zero.
    eye = torch.eye(5, 8)
    assert clip_contrastive_loss(eye, eye, 100.0) < 1e-6


_DISTRIBUTED_WORKER = """
import json, sys, torch, torch.distributed as dist
from recipes.tinyclip.affinity import affinity_loss
rank, init_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
g = torch.Generator().manual_seed(0)
s_img, s_txt, t_img, t_txt = (torch.randn(8, 6, generator=g) for _ in range(4))
local = slice(4 * rank, 4 * rank + 4)
results = []
for with_grad in (False, True):
    s = s_img[local].clone().requires_grad_(True)
    loss = affinity_loss(s, s_txt[local], t_img[local], t_txt[local], gather_with_grad=with_grad)
    loss.backward()
    results.append([loss.item(), s.grad.tolist()])
json.dump(results, open(out, "w"))
dist.destroy_process_group()
"""


def test_affinity_loss_under_torch_distributed(tmp_path):
    """Two gloo ranks with half the batch each: the mean of their losses is the full-batch loss."""
    g = torch.Generator().manual_seed(0)
    s_img, s_txt, t_img, t_txt = (torch.randn(8, 6, generator=g) for _ in range(4))
    s_img.requires_grad_(True)
    full = affinity_loss(s_img, s_txt, t_img, t_txt)
    full.backward()

    # Plain subprocesses importing only torch and recipes.tinyclip.affinity: spawning workers from this module would
    # re-import open_clip and timm in each of them.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DISTRIBUTED_WORKER, str(r), str(tmp_path / "init"), str(outs[r])], env=env
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    results = [json.loads(out.read_text()) for out in outs]
    for variant in (0, 1):
        assert abs((results[0][variant][0] + results[1][variant][0]) / 2 - full.item()) < 1e-5
    # Gathering with gradient: the ranks' gradients, halved, are the full-batch gradient of the mean loss.
    grad = torch.tensor(results[0][1][1] + results[1][1][1]) / 2
    torch.testing.assert_close(grad, s_img.grad, atol=1e-5, rtol=1e-4)
    # Without it, each rank misses the terms where its features are columns of the other rank's rows.
    assert not torch.allclose(torch.tensor(results[0][0][1] + results[1][0][1]) / 2, s_img.grad, atol=1e-5)


# -- manual inheritance ----------------------------------------------------------------------------------------


def test_uniform_layer_indices():
    assert uniform_layer_indices(12, 6) == [0, 2, 4, 6, 8, 10]
    assert uniform_layer_indices(12, 3) == [0, 4, 8]
    assert uniform_layer_indices(12, 10) == list(range(10))
    with pytest.raises(ValueError):
        uniform_layer_indices(3, 4)


def test_inherited_layers_at_full_width_match_the_teacher():
    torch.manual_seed(0)
    teacher = CLIP(**clip_cfg(layers=4)).eval()
    student = CLIP(**clip_cfg(layers=2)).eval()
    kept = inherit_weights(teacher, student)
    assert kept == {"image": [0, 2], "text": [0, 2]}

    # The teacher with only the kept layers is exactly the student.
    reference = deepcopy(teacher)
    reference.visual.transformer.resblocks = torch.nn.ModuleList(
        teacher.visual.transformer.resblocks[i] for i in [0, 2]
    )
    reference.transformer.resblocks = torch.nn.ModuleList(teacher.transformer.resblocks[i] for i in [0, 2])
    images, texts = inputs()
    for got, want in zip(features(student, images, texts), features(reference, images, texts), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _head_outputs(attn: torch.nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Per-head attention outputs concatenated ([N, L, heads * head_dim]), i.e. before the output projection."""
    width = attn.out_proj.in_features
    out, _ = F.multi_head_attention_forward(
        x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), attn.embed_dim, attn.num_heads,
        attn.in_proj_weight, attn.in_proj_bias, None, None, False, 0.0,
        torch.eye(width), torch.zeros(width), need_weights=False,
    )  # fmt: skip
    return out.transpose(0, 1)


def test_inherited_heads_and_units_compute_the_teachers_slice():
    torch.manual_seed(0)
    teacher = CLIP(**clip_cfg(width=32, layers=3)).eval()  # 4 heads of width 8, 128 MLP units
    student = CLIP(**clip_cfg(width=16, layers=3, text_context=8, embed_dim=12)).eval()  # 2 heads of width 8, 64 units
    inherit_weights(teacher, student)
    x_student = torch.randn(2, 5, 16)
    x_teacher = F.pad(x_student, (0, 16))  # the teacher's input on the student's dims: dropped dims are zero
    for tower in ("visual.transformer", "transformer"):
        for i in range(3):
            t_block, s_block = teacher.get_submodule(tower).resblocks[i], student.get_submodule(tower).resblocks[i]
            # Attention: the kept heads give the teacher's per-head outputs for those heads.
            torch.testing.assert_close(
                _head_outputs(s_block.attn, x_student), _head_outputs(t_block.attn, x_teacher)[..., :16]
            )
            # ... and the output projection reads only them.
            t_heads = _head_outputs(t_block.attn, x_teacher)
            t_heads[..., 16:] = 0
            want = t_block.attn.out_proj(t_heads)[..., :16]
            got = s_block.attn(x_student, x_student, x_student, need_weights=False)[0]
            torch.testing.assert_close(got, want)
            # MLP: the leading units.
            hidden = t_block.mlp.gelu(t_block.mlp.c_fc(x_teacher))
            hidden[..., 64:] = 0
            torch.testing.assert_close(s_block.mlp(x_student), t_block.mlp.c_proj(hidden)[..., :16])
    # Embeddings are leading slices: text positions, width and output dims.
    torch.testing.assert_close(student.positional_embedding, teacher.positional_embedding[:8, :16])
    torch.testing.assert_close(student.visual.proj, teacher.visual.proj[:16, :12])


def resnet_cfg(width: int, layers: list[int], embed_dim: int = 16, head_width: int = 8) -> dict:
    """A toy CLIP with a ModifiedResNet image tower (64 px: a 2x2 grid before the attention pool)."""
    return clip_cfg(embed_dim=embed_dim) | {
        "vision_cfg": {"image_size": 64, "layers": layers, "width": width, "head_width": head_width}
    }


def test_inheritance_refuses_mismatched_head_width_and_tower_kinds():
    teacher = CLIP(**clip_cfg(width=32))
    with pytest.raises(ValueError, match="head width"):
        inherit_weights(teacher, CLIP(**clip_cfg(width=32, head_width=16)))
    resnet = CLIP(**resnet_cfg(8, [1, 1, 1, 1]))
    with pytest.raises(ValueError, match="image towers differ in kind"):
        inherit_weights(teacher, resnet)
    assert inherit_weights(teacher, resnet, towers=("text",)) == {"text": [0, 1]}
    with pytest.raises(ValueError, match=r"attnpool: heads are inherited whole"):
        inherit_weights(CLIP(**resnet_cfg(16, [1, 1, 1, 1])), CLIP(**resnet_cfg(8, [1, 1, 1, 1], head_width=16)))


def test_resnet_inheritance_computes_the_teachers_leading_channels():
    """A ResNet student computes what its teacher computes with every channel beyond the student's zeroed: the
    teacher's batch norms give 0 on those channels (scale and shift 0), and the attention pool reads none of them
    (positional embedding and output-projection columns 0 there)."""
    torch.manual_seed(0)
    teacher = CLIP(**resnet_cfg(16, [1, 1, 1, 1])).eval()
    g = torch.Generator().manual_seed(1)
    for norm in (m for m in teacher.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        n = norm.num_features  # random statistics and affine: open_clip starts bn3 at 0, which would hide bugs
        norm.weight.data, norm.bias.data = torch.rand(n, generator=g) + 0.5, 0.1 * torch.randn(n, generator=g)
        norm.running_mean, norm.running_var = 0.1 * torch.randn(n, generator=g), torch.rand(n, generator=g) + 0.5
    student = CLIP(**resnet_cfg(8, [1, 1, 1, 1], embed_dim=12)).eval()
    assert inherit_weights(teacher, student, towers=("image",)) == {f"image.layer{i}": [0] for i in range(1, 5)}

    zeroed = deepcopy(teacher)
    for name, norm in zeroed.visual.named_modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            kept = student.visual.get_submodule(name).num_features
            norm.weight.data[kept:], norm.bias.data[kept:] = 0, 0
    width = student.visual.attnpool.q_proj.in_features  # 8 * 32 of 16 * 32 channels
    zeroed.visual.attnpool.positional_embedding.data[:, width:] = 0
    zeroed.visual.attnpool.c_proj.weight.data[:, width:] = 0
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(student.visual(images), zeroed.visual(images)[:, :12])
        assert not torch.allclose(teacher.visual(images)[:, :12], student.visual(images), atol=1e-3)


def test_resnet_inheritance_keeps_blocks_at_a_uniform_stride_per_stage():
    teacher, student = CLIP(**resnet_cfg(16, [2, 4, 2, 2])), CLIP(**resnet_cfg(8, [1, 2, 1, 1]))
    kept = inherit_weights(teacher, student)
    assert kept == {"image.layer1": [0], "image.layer2": [0, 2], "image.layer3": [0], "image.layer4": [0],
                    "text": [0, 1]}  # fmt: skip
    s, t = student.state_dict(), teacher.state_dict()
    # Stage 2 has 8 * 2 planes in the student, 16 * 2 in the teacher; its block 1 is the teacher's block 2.
    torch.testing.assert_close(s["visual.layer2.1.conv2.weight"], t["visual.layer2.2.conv2.weight"][:16, :16])
    torch.testing.assert_close(
        s["visual.layer2.0.downsample.0.weight"], t["visual.layer2.0.downsample.0.weight"][:64, :32]
    )
    torch.testing.assert_close(s["visual.attnpool.q_proj.weight"], t["visual.attnpool.q_proj.weight"][:256, :256])


@pytest.mark.parametrize(
    ("name", "text_layers"), [("TinyCLIP-ResNet-19M-Text-19M", 6), ("TinyCLIP-ResNet-30M-Text-29M", 9)]
)
def test_tinyclip_resnet_configs_inherit_from_rn50(name, text_layers):
    with torch.device("meta"):
        teacher, student = open_clip.create_model("RN50", device="meta"), open_clip.create_model(name, device="meta")
    kept = inherit_weights(teacher, student)
    assert kept["image.layer3"] == list(range(6)) and kept["text"] == uniform_layer_indices(12, text_layers)


# -- automatic inheritance: masks and pruning ------------------------------------------------------------------


@pytest.fixture(scope="module")
def masked():
    """TinyCLIP-test with random masks: fractional values, dropped dims, a layer with no heads, one with no units."""
    torch.manual_seed(0)
    model = open_clip.create_model(TEST).eval()
    masks = CLIPPruningMasks(model)
    with torch.no_grad():
        for p in masks.parameters():
            p.normal_(0.0, 3.0)
        masks.towers["image"].heads[1].log_alpha.fill_(-10.0)
        masks.towers["text"].mlp[0].log_alpha.fill_(-10.0)
    handle = masks.attach(model)
    images, texts = inputs(vocab=49408)
    yield model, masks, features(model, images, texts), (images, texts)
    handle.remove()


def test_pruned_model_computes_what_the_masked_model_computes(masked):
    model, masks, (masked_img, masked_txt), (images, texts) = masked
    pruned = prune(model, masks, TEST)
    assert pruned.pruned_cfg["layer_shapes"]["image"]["heads"][1] == 0
    assert pruned.pruned_cfg["layer_shapes"]["text"]["mlp"][0] == 0
    pruned_img, pruned_txt = features(pruned, images, texts)
    torch.testing.assert_close(pruned_img, masked_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pruned_txt, masked_txt, atol=1e-5, rtol=1e-4)


def block_attention_and_mlp_params(model) -> int:
    """Parameters of the residual blocks' attention and MLP layers, both towers: the sparsity's denominator."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if "resblocks." in name and (".attn." in name or ".mlp." in name)
    )


def test_pruned_parameter_count_is_what_the_masks_imply(masked):
    model, masks, _, _ = masked
    pruned = prune(model, masks, TEST)
    image, text = masks.towers["image"], masks.towers["text"]
    assert tower_param_counts(model) == (image.full_param_count(), text.full_param_count())
    assert tower_param_counts(pruned) == (image.pruned_param_count(), text.pruned_param_count())
    removed = sum(t.full_param_count(True) - t.pruned_param_count(True) for t in masks.towers.values())
    total = sum(p.numel() for p in model.parameters()) - removed
    assert sum(p.numel() for p in pruned.parameters()) == total
    # The sparsity counts the blocks' attention and MLP layers only (not embeddings, projections, norms).
    full, kept = block_attention_and_mlp_params(model), block_attention_and_mlp_params(pruned)
    assert sum(t.full_prunable_count() for t in masks.towers.values()) == full
    assert masks.pruned_sparsity() == pytest.approx(1 - kept / full, abs=1e-12)
    assert 0.2 < masks.pruned_sparsity() < 0.9
    # The final-mask rule realises the expected sparsity, up to the rounding of each mask's count of zeros.
    with torch.no_grad():
        assert masks.pruned_sparsity() == pytest.approx(float(masks.expected_sparsity()), abs=0.03)


def test_pruned_model_saves_and_reloads(masked):
    model, masks, _, (images, texts) = masked
    pruned = prune(model, masks, TEST)
    buffer = io.BytesIO()
    torch.save({"cfg": json.dumps(pruned.pruned_cfg), "state_dict": pruned.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    reloaded = create_pruned_model(json.loads(saved["cfg"])).eval()
    reloaded.load_state_dict(saved["state_dict"])  # strict
    for got, want in zip(features(reloaded, images, texts), features(pruned, images, texts), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_progressive_pruning_stage(masked):
    """A second stage attaches new masks to the pruned model and prunes it again, using its own config."""
    model, masks, _, (images, texts) = masked
    stage_1 = prune(model, masks, TEST)
    stage_2_masks = CLIPPruningMasks(stage_1)
    with torch.no_grad():
        for p in stage_2_masks.parameters():
            p.normal_(1.0, 3.0)
    handle = stage_2_masks.attach(stage_1)
    want = features(stage_1, images, texts)
    stage_2 = prune(stage_1, stage_2_masks)
    handle.remove()
    for got, expected in zip(features(stage_2, images, texts), want, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert sum(tower_param_counts(stage_2)) < sum(tower_param_counts(stage_1)) < sum(tower_param_counts(model))


def test_masks_sample_in_train_mode_and_are_deterministic_in_eval():
    torch.manual_seed(0)
    model = CLIP(**clip_cfg())
    masks = CLIPPruningMasks(model, init_log_alpha=0.0)
    handle = masks.attach(model)
    images, texts = inputs()
    model.train()
    first, second = model.encode_image(images), model.encode_image(images)
    assert not torch.allclose(first, second)
    (first.sum() + model.encode_text(texts).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in masks.parameters())
    model.eval()
    torch.testing.assert_close(model.encode_image(images), model.encode_image(images), rtol=0, atol=0)
    handle.remove()
    with pytest.raises(ValueError, match="VisionTransformer"):
        resnet_cfg = clip_cfg()
        resnet_cfg["vision_cfg"] = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}
        CLIPPruningMasks(CLIP(**resnet_cfg))


def test_final_mask_rule_zeroes_round_expected_zeros_of_the_smallest_entries():
    """The reference's rule, computed here from the hard-concrete formulas: P(z != 0) = sigmoid(log_alpha -
    T ln(-l / r)) with T = 2/3, l = -0.1, r = 1.1; round(size - sum P) entries with the smallest log_alpha are 0;
    the others keep sigmoid(log_alpha / T * 0.8)."""
    mask = HardConcreteMask(5)
    with torch.no_grad():
        mask.log_alpha.copy_(torch.tensor([2.0, -3.0, 0.0, 4.6, -1.0]))
    # P(z != 0) = [0.973, 0.197, 0.832, 0.998, 0.645]: 1.355 zeros expected, so 1 is set: the -3.0 entry.
    assert mask.deterministic().tolist() == pytest.approx([sigmoid(2.4), 0.0, 0.5, sigmoid(5.52), sigmoid(-1.2)])

    g = torch.Generator().manual_seed(0)
    log_alpha = 2 * torch.randn(3072, generator=g)
    mask = HardConcreteMask(3072)
    with torch.no_grad():
        mask.log_alpha.copy_(log_alpha)
    p_nonzero = [sigmoid(a + (2 / 3) * math.log(1.1 / 0.1)) for a in log_alpha.tolist()]
    zeros = round(3072 - sum(p_nonzero))
    assert zeros == 842  # the count FIDELITY.md reports for the reference on N(0, 2) masks
    final = mask.deterministic()
    smallest = set(sorted(range(3072), key=lambda i: log_alpha[i].item())[:zeros])
    assert {i for i, v in enumerate(final.tolist()) if v == 0} == smallest
    kept = [i for i in range(3072) if i not in smallest]
    torch.testing.assert_close(final[kept], torch.sigmoid(1.2 * log_alpha[kept]))
    # The rule it replaces (prune what the Louizos estimate clamps to exactly 0) prunes 350: the undershoot.
    assert int(((torch.sigmoid(log_alpha) * 1.2 - 0.1).clamp(0, 1) == 0).sum()) == 350


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_lagrangian_is_one_sided_with_multipliers_at_ten():
    lagrangian = SparsityLagrangian(0.5, ramp_steps=10, start_sparsity=0.1)
    assert (lagrangian.lambda_1.item(), lagrangian.lambda_2.item()) == (10.0, 10.0)
    assert [lagrangian.target(s) for s in (0, 5, 10, 20)] == pytest.approx([0.1, 0.3, 0.5, 0.5])

    # Short of the target (0.3 < 0.5): 10 * 0.2 + 10 * 0.2^2; d/ds = -(10 + 2 * 10 * 0.2); d/dlambda = 0.2, 0.04.
    expected = torch.tensor(0.3, requires_grad=True)
    penalty = lagrangian(expected, step=10)
    penalty.backward()
    assert penalty.item() == pytest.approx(2.4)
    assert expected.grad.item() == pytest.approx(-14.0)
    assert (lagrangian.lambda_1.grad.item(), lagrangian.lambda_2.grad.item()) == pytest.approx((0.2, 0.04))

    # Sparser than the target: no penalty, no gradient (the two-sided form would pull back toward 0.5).
    lagrangian.zero_grad()
    expected = torch.tensor(0.7, requires_grad=True)
    penalty = lagrangian(expected, step=10)
    penalty.backward()
    assert penalty.item() == 0.0 and expected.grad.item() == 0.0
    assert lagrangian.lambda_1.grad.item() == 0.0 and lagrangian.lambda_2.grad.item() == 0.0


def test_mask_optimizer_descends_on_log_alpha_ascends_on_the_multipliers_and_clamps():
    """The reference's AdamW: rate 0.02 for both, ascent for the multipliers, log_alpha clamped to [ln .01, ln 100]
    after each step. Adam's first step moves each parameter by its rate times the sign of its gradient."""
    torch.manual_seed(0)
    model = CLIP(**clip_cfg())
    masks = CLIPPruningMasks(model)
    assert all((p == 10.0).all() for p in masks.parameters())
    masked = MaskedCLIP(model, masks, SparsityLagrangian(0.5, ramp_steps=0))
    optimizer = masked.mask_optimizer(0.02, 0.02)
    images, texts = inputs()
    for step in range(2):
        masked(image=images, text=texts)[-1]["penalty"].backward()  # short of 0.5: a penalty to reduce
        optimizer.step()
        optimizer.zero_grad()
        masked.after_mask_step()
        lambdas = (masked.lagrangian.lambda_1.item(), masked.lagrangian.lambda_2.item())
        assert lambdas == pytest.approx((10.0 + 0.02 * (step + 1),) * 2, abs=1e-4)  # ascent
        log_alpha = torch.cat([p.detach() for p in masks.parameters()])
        if step == 0:  # 10 - 0.02, clamped to ln 100
            torch.testing.assert_close(log_alpha, torch.full_like(log_alpha, math.log(100)))
        else:  # one more descent step below it, at most the rate
            assert ((log_alpha < math.log(100)) & (log_alpha > math.log(100) - 0.021)).all()
    assert masked.step.item() == 2


def test_masks_reach_a_target_against_a_pull_toward_density():
    """One-sided penalty and ramp: the masks go down to the target and stay near it when another loss pulls them
    back up (alone, the one-sided penalty would leave them anywhere past the target)."""
    torch.manual_seed(0)
    masks = CLIPPruningMasks(CLIP(**clip_cfg()))
    lagrangian = SparsityLagrangian(0.4, ramp_steps=20)
    optimizer = torch.optim.AdamW(
        [{"params": masks.parameters(), "lr": 0.1}, {"params": lagrangian.parameters(), "lr": 0.1, "maximize": True}],
        weight_decay=0.0,
    )
    trace = []
    for step in range(200):
        sparsity = masks.expected_sparsity()
        trace.append(sparsity.item())
        (lagrangian(sparsity, step) + sparsity).backward()  # + s: a task loss preferring dense masks
        optimizer.step()
        optimizer.zero_grad()
        masks.constrain()
    assert trace[0] < 0.01 and max(trace) > 0.4 and abs(sum(trace[-20:]) / 20 - 0.4) < 0.03


# -- zero-shot helpers -----------------------------------------------------------------------------------------


def test_zero_shot_classifier():
    torch.manual_seed(0)
    model = open_clip.create_model(TEST).eval()
    tokenizer = open_clip.get_tokenizer(TEST)
    templates = ["a photo of a {}.", lambda c: f"a drawing of a {c}."]
    classifier = zero_shot_classifier(model, tokenizer, ["cat", "dog", "car"], templates)
    assert classifier.shape == (16, 3)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(3))
    with torch.no_grad():
        prompts = model.encode_text(tokenizer(["a photo of a dog.", "a drawing of a dog."]), normalize=True)
    dog = F.normalize(prompts.mean(0), dim=0)  # the mean of the normalised prompt embeddings, normalised
    torch.testing.assert_close(classifier[:, 1], dog)
