"""TinyCLIP building blocks: configs, affinity loss, manual inheritance, L0 masks and physical pruning."""

import io
import json
import logging
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
from recipes.tinyclip.masks import CLIPPruningMasks, SparsityLagrangian, prune
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


def test_inheritance_refuses_mismatched_head_width_and_resnet_towers():
    teacher = CLIP(**clip_cfg(width=32))
    with pytest.raises(ValueError, match="head width"):
        inherit_weights(teacher, CLIP(**clip_cfg(width=32, head_width=16)))
    resnet_cfg = clip_cfg(width=32)
    resnet_cfg["vision_cfg"] = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}
    resnet = CLIP(**resnet_cfg)
    with pytest.raises(ValueError, match="ViT"):
        inherit_weights(teacher, resnet)
    assert inherit_weights(teacher, resnet, towers=("text",)) == {"text": [0, 1]}


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


def test_pruned_parameter_count_is_what_the_masks_imply(masked):
    model, masks, _, _ = masked
    pruned = prune(model, masks, TEST)
    image, text = masks.towers["image"], masks.towers["text"]
    assert tower_param_counts(model) == (image.full_param_count(), text.full_param_count())
    assert tower_param_counts(pruned) == (image.pruned_param_count(), text.pruned_param_count())
    removed = sum(t.full_param_count(True) - t.pruned_param_count(True) for t in masks.towers.values())
    total = sum(p.numel() for p in model.parameters()) - removed
    assert sum(p.numel() for p in pruned.parameters()) == total
    assert 0.2 < masks.pruned_sparsity() < 0.9
    assert abs(1 - sum(tower_param_counts(pruned)) / sum(tower_param_counts(model)) - masks.pruned_sparsity()) < 1e-9


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
    masks = CLIPPruningMasks(model, init_drop=0.5)
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


@pytest.mark.parametrize(("init_drop", "target"), [(0.05, 0.5), (0.9, 0.2)])
def test_lagrangian_penalty_drives_expected_sparsity_to_the_target(init_drop, target):
    torch.manual_seed(0)
    masks = CLIPPruningMasks(CLIP(**clip_cfg()), init_drop=init_drop)

    # One ascent step on the multipliers from zero, then one descent step on the masks: closer to the target.
    lagrangian = SparsityLagrangian(target, ramp_steps=0)
    lagrangian(masks.expected_sparsity(), step=0).backward()
    with torch.no_grad():
        for p in lagrangian.parameters():
            p += p.grad  # gradient ascent
            p.grad = None
    gap = abs(masks.expected_sparsity().item() - target)
    masks.zero_grad()
    lagrangian(masks.expected_sparsity(), step=0).backward()
    with torch.no_grad():
        for p in masks.parameters():
            p -= 10.0 * p.grad
    assert abs(masks.expected_sparsity().item() - target) < gap

    # The min-max game with a ramped target reaches it (alone, without a task loss, it then oscillates).
    lagrangian = SparsityLagrangian(target, ramp_steps=10)
    assert lagrangian.target(0) == 0 and lagrangian.target(5) == pytest.approx(target / 2)
    mask_opt = torch.optim.Adam(masks.parameters(), lr=0.1)
    lambda_opt = torch.optim.AdamW(lagrangian.parameters(), lr=0.1, weight_decay=0.0, maximize=True)  # ascent
    gaps = []
    for step in range(50):
        sparsity = masks.expected_sparsity()
        gaps.append(abs(sparsity.item() - target))
        mask_opt.zero_grad()
        lambda_opt.zero_grad()
        lagrangian(sparsity, step).backward()
        mask_opt.step()
        lambda_opt.step()
    assert min(gaps) < 0.02
    assert lagrangian.lambda_2 > 0  # ascent: the quadratic multiplier only grows


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
