"""Cream building blocks: supernet FLOPs and export, the published architectures, the prioritized board,
meta-matching and its bilevel update, the exported path's BN recalibration."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from recipes.cream.board import (
    MetaMatchingNetwork,
    PrioritizedBoard,
    eval_logits,
    evaluate_path,
    kd_weight,
    meta_update,
    prioritized_loss,
    select_teacher,
    update_board,
)
from recipes.cream.export import recalibrate_bn
from students.supernet import (
    PUBLISHED,
    SKIP,
    ChoiceLayer,
    Supernet,
    SupernetConfig,
    build_path_model,
    export,
    normalize_path,
    path_flops,
    sample_path,
)

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def tiny_supernet() -> Supernet:
    torch.manual_seed(0)
    model = Supernet(SupernetConfig.tiny(), num_classes=NUM_CLASSES)
    # Non-trivial BN statistics, so export must carry buffers as well as weights.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- supernet


@pytest.mark.parametrize(
    ("config", "sizes", "num_classes"),
    [(SupernetConfig.tiny(), (32, 48), NUM_CLASSES), (SupernetConfig(), (224, 160), 1000)],
    ids=["tiny", "default"],
)
def test_path_flops_matches_flop_counter(config: SupernetConfig, sizes: tuple[int, int], num_classes: int) -> None:
    generator = torch.Generator().manual_seed(1)
    paths = [sample_path(config, generator) for _ in range(3)] + [(0,) * config.num_layers, (5,) * config.num_layers]
    paths.append(tuple(SKIP if i % 2 else 3 for i in range(config.num_layers)))  # every second layer skipped
    for path in paths:
        # On the meta device FlopCounterMode sees every op's shapes without computing anything.
        with torch.device("meta"):
            model = build_path_model(config, path, num_classes).eval()
            images = [torch.zeros(1, 3, size, size) for size in sizes]
        for size, x in zip(sizes, images, strict=True):
            with FlopCounterMode(display=False) as counter:
                model(x)
            measured = counter.get_total_flops()
            assert abs(path_flops(config, path, size, num_classes) - measured) <= 0.02 * measured


def test_path_forms_and_sampling() -> None:
    config = SupernetConfig.tiny()
    flat = (0, 1, 2, 3, 4, 5)
    assert normalize_path(config, [[0, 1], [2, 3], [4, 5]]) == flat
    assert normalize_path(config, list(flat)) == flat
    assert normalize_path(config, [[0], [2, 3], [4]]) == (0, SKIP, 2, 3, 4, SKIP)  # a short stage: the rest skipped
    for bad in [flat[:-1], (0, 0, 0, 0, 0, 6), (0, 0, SKIP, 0, 0, 0), [[0, 1], [], [4, 5]], [[0, 1, 2], [2], [4]]]:
        with pytest.raises(ValueError):
            normalize_path(config, bad)
    generator = torch.Generator().manual_seed(0)
    assert sample_path(config, generator, weights=torch.eye(6)[3]) == (3,) * 6
    per_layer = torch.eye(6)  # layer i can only pick choice i
    assert sample_path(config, generator, weights=per_layer) == flat
    paths = {sample_path(config, generator) for _ in range(20)}
    assert len(paths) > 1 and all(len(p) == config.num_layers for p in paths)
    # A seventh weight is the skip's: never drawn for a stage's first layer (here: only skips elsewhere).
    only_skip = torch.tensor([1.0, 0, 0, 0, 0, 0, 1e9])
    assert {sample_path(config, generator, weights=only_skip) for _ in range(5)} == {(0, SKIP) * 3}


def test_skipped_layers_leave_the_exported_model(tiny_supernet: Supernet) -> None:
    path = (3, SKIP, 1, 4, 5, SKIP)
    exported = export(tiny_supernet, path).eval()
    assert exported.config.stage_depths == (1, 2, 1) and exported.path == (3, 1, 4, 5)
    assert [len(stage) for stage in exported.blocks] == [1, 2, 1]
    x = _images(4)
    with torch.no_grad():
        # What the supernet computes with the skipped layers as identities, written out layer by layer.
        h = tiny_supernet.stem(x)
        for layer, choice in zip((lay for stage in tiny_supernet.blocks for lay in stage), path, strict=True):
            h = h if choice == SKIP else layer.ops[choice](h)
        torch.testing.assert_close(exported(x), tiny_supernet.head(h), rtol=0, atol=1e-6)
        torch.testing.assert_close(tiny_supernet(x, path), tiny_supernet.head(h), rtol=0, atol=0)


def test_export_matches_supernet_and_reloads(tiny_supernet: Supernet, tmp_path) -> None:
    config = tiny_supernet.config
    x = _images(8)
    for path in [tiny_supernet.sample_path(torch.Generator().manual_seed(s)) for s in range(2)]:
        exported = export(tiny_supernet, path).eval()
        assert not any(isinstance(m, ChoiceLayer) for m in exported.modules())
        assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in tiny_supernet.parameters())
        with torch.no_grad():
            expected = tiny_supernet(x, path)
            with FlopCounterMode(display=False) as counter:
                torch.testing.assert_close(exported(x), expected, rtol=0, atol=1e-6)
            assert counter.get_total_flops() == len(x) * path_flops(config, path, 32, NUM_CLASSES)

            save_file(exported.state_dict(), tmp_path / "path.safetensors")
            fresh = build_path_model(config, path, NUM_CLASSES)
            fresh.load_state_dict(load_file(tmp_path / "path.safetensors"))
            torch.testing.assert_close(fresh.eval()(x), expected, rtol=0, atol=1e-6)
        # The export owns copies: changing it leaves the supernet alone.
        with torch.no_grad():
            next(exported.parameters()).add_(1.0)
            torch.testing.assert_close(tiny_supernet(x, path), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the published architectures

# Cream's README: model, FLOPs column (millions of multiply-adds), and the input size the reference's retrain
# script sets for it.
README_MMACS = {"cream_14": (14, 64), "cream_43": (43, 96), "cream_114": (114, 160), "cream_287": (287, 224),
                "cream_481": (481, 224), "cream_604": (604, 224)}  # fmt: skip


@pytest.mark.parametrize("name", sorted(README_MMACS))
def test_published_architectures_have_the_readmes_multiply_adds(name: str) -> None:
    mmacs, img_size = README_MMACS[name]
    assert timm.models.get_pretrained_cfg(name).input_size == (3, img_size, img_size)
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        x = torch.zeros(1, 3, img_size, img_size)
    assert model.pretrained_cfg["input_size"] == (3, img_size, img_size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    measured = counter.get_total_flops() / 2 / 1e6  # multiply-adds, in millions
    assert abs(measured - mmacs) <= 0.05 * mmacs, (name, measured)
    assert PUBLISHED[name].mmacs == mmacs and model(x).shape == (1, 1000)


@pytest.mark.parametrize("name", ["cream_14", "cream_43", "cream_114", "cream_287"])
def test_small_published_architectures_are_paths_of_the_supernet(name: str) -> None:
    # Their stages are at most 4 deep: each is a path of the default supernet that skips the other layers.
    stages = PUBLISHED[name].stages
    path = tuple(c for stage in stages for c in (*stage, *[SKIP] * (4 - len(stage))))
    assert normalize_path(SupernetConfig(), stages) == path
    with torch.device("meta"):
        published, exported = timm.create_model(name), build_path_model(SupernetConfig(), path)
    assert exported.config == published.config and exported.path == published.path
    assert [(k, v.shape) for k, v in exported.state_dict().items()] == [
        (k, v.shape) for k, v in published.state_dict().items()
    ]


def test_published_architectures_load_their_own_weights_and_take_dropout(tmp_path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("cream_14", num_classes=10, drop_rate=0.2)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    other = timm.create_model("cream_14", num_classes=10)
    other.load_state_dict(load_file(tmp_path / "w.safetensors"))
    assert model.head.drop.p == 0.2 and other.head.drop.p == 0.0
    x = _images(2, size=64)
    torch.testing.assert_close(model.eval()(x), other.eval()(x))
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("cream_14", pretrained=True)


# ----------------------------------------------------------------------------- board


def _outputs(seed: int) -> torch.Tensor:
    return torch.randn(4, NUM_CLASSES, generator=torch.Generator().manual_seed(seed))


def _reference_admits(score: float, flops: int, worst: tuple[float, int] | None, gap: float) -> bool:
    """The reference's admission rule, written out: room on the board, or `gap` better, or better and cheaper."""
    if worst is None:
        return True
    return score > worst[0] + gap or (score > worst[0] and flops < worst[1])


def test_board_admission_follows_the_reference_rule() -> None:
    board = PrioritizedBoard(size=3, margin=0.05)
    for i, score in enumerate([0.5, 0.7, 0.6]):
        assert board.update((i,), heldout_score=score, flops=100, outputs=_outputs(i))  # room: any score
    assert board.is_full and [e.heldout_score for e in board] == [0.7, 0.6, 0.5]

    assert not board.update((10,), heldout_score=0.54, flops=100, outputs=_outputs(10))  # 4 points: under the margin
    assert not board.update((11,), heldout_score=0.55, flops=150, outputs=_outputs(11))  # 5 points: not more than it
    assert not board.update((12,), heldout_score=0.5, flops=10, outputs=_outputs(12))  # cheaper, not better
    assert board.update((13,), heldout_score=0.51, flops=99, outputs=_outputs(13))  # better at all, and cheaper
    assert [e.path for e in board] == [(1,), (2,), (13,)]
    assert board.update((14,), heldout_score=0.57, flops=500, outputs=_outputs(14))  # 6 points better: any FLOPs
    assert [e.path for e in board] == [(1,), (2,), (14,)]

    # Every candidate against the rule written out, on a board that stays as it is (candidates are not kept).
    worst = (board.worst.heldout_score, board.worst.flops)
    for score in [0.5, 0.56, 0.6, 0.62, 0.625, 0.63, 0.7]:
        for flops in [100, 499, 500, 501]:
            assert board.would_admit(score, flops) == _reference_admits(score, flops, worst, 0.05), (score, flops)

    # Offering a path already on the board replaces its entry instead of duplicating it (it is measured anew).
    assert board.update((2,), heldout_score=0.65, flops=100, outputs=_outputs(2))
    assert [e.path for e in board] == [(1,), (2,), (14,)] and board[1].heldout_score == 0.65

    restored = PrioritizedBoard(size=1)
    restored.load_state_dict(board.state_dict())
    assert restored.size == 3 and restored.margin == 0.05
    assert [(e.path, e.heldout_score, e.flops) for e in restored] == [(e.path, e.heldout_score, e.flops) for e in board]
    assert all(torch.equal(a.outputs, b.outputs) for a, b in zip(restored, board, strict=True))


def test_equal_scores_rank_the_cheaper_path_first() -> None:
    board = PrioritizedBoard(size=3)
    for path, flops in [((0,), 300), ((1,), 100), ((2,), 200)]:
        board.update(path, heldout_score=0.5, flops=flops, outputs=_outputs(0))
    assert [e.path for e in board] == [(1,), (2,), (0,)] and board.best().path == (1,)


def test_board_flops_limit_and_best() -> None:
    board = PrioritizedBoard(size=4, flops_limit=200)
    assert not board.update((0,), heldout_score=0.99, flops=201, outputs=_outputs(0))
    assert board.update((1,), heldout_score=0.9, flops=200, outputs=_outputs(1))
    assert board.update((2,), heldout_score=0.8, flops=100, outputs=_outputs(2))
    assert len(board) == 2 and (0,) not in board
    assert board.best().path == (1,)
    assert board.best(flops_limit=150).path == (2,)
    assert board.best(flops_limit=50) is None


def test_prioritized_loss_mixes_kd_and_ce() -> None:
    student, teacher = _outputs(0), _outputs(1)
    labels = torch.tensor([0, 1, 2, 3])
    kd = -(teacher.softmax(-1) * student.log_softmax(-1)).sum(-1).mean()
    ce = F.cross_entropy(student, labels)
    for m in (0.0, 0.3, 1.0):
        torch.testing.assert_close(prioritized_loss(student, teacher, labels, m), (m * kd + (2 - m) * ce) / 2)


# ----------------------------------------------------------------------------- the reference's three bugs


def test_board_stores_the_candidates_own_outputs(tiny_supernet: Supernet) -> None:
    heldout = (_images(8, seed=1), torch.arange(8) % NUM_CLASSES)
    teacher_path, student_path = (0,) * 6, (5,) * 6
    board = PrioritizedBoard(size=4)
    assert update_board(board, tiny_supernet, teacher_path, heldout, flops=1)
    assert update_board(board, tiny_supernet, student_path, heldout, flops=2)

    with torch.no_grad():
        own = tiny_supernet(heldout[0], student_path)
        teachers = tiny_supernet(heldout[0], teacher_path)
    entry = next(e for e in board if e.path == student_path)
    torch.testing.assert_close(entry.outputs, own)
    assert not torch.allclose(entry.outputs, teachers, atol=1e-3)
    assert entry.heldout_score == evaluate_path(tiny_supernet, student_path, *heldout)[0]


def test_board_scores_in_eval_mode_and_leaves_bn_statistics_alone(tiny_supernet: Supernet) -> None:
    supernet = copy.deepcopy(tiny_supernet).train()
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    heldout = (_images(8, seed=4), torch.arange(8) % NUM_CLASSES)
    board = PrioritizedBoard(size=2)
    assert update_board(board, supernet, (2,) * 6, heldout, flops=1)
    assert supernet.training and all(torch.equal(v, before[k]) for k, v in supernet.state_dict().items())
    with torch.no_grad():
        expected = copy.deepcopy(supernet).eval()(heldout[0], (2,) * 6)  # running statistics, not the batch's
    torch.testing.assert_close(board[0].outputs, expected, rtol=0, atol=0)


def test_teacher_and_m_come_from_the_best_matching_entry() -> None:
    # Score = mean over the batch of (p_student[:, 0] - p_path[:, 0]): a path that puts little mass on
    # class 0 matches best. The best entry is in the middle of the board, neither first nor last.
    meta = MetaMatchingNetwork(NUM_CLASSES, slice_size=None)
    with torch.no_grad():
        meta.net[-1].weight.zero_()
        meta.net[-1].weight[0, 0] = 1.0
    board = PrioritizedBoard(size=3)
    for path, score, class0_logit in [((0,), 0.9, 5.0), ((1,), 0.8, -5.0), ((2,), 0.7, 0.0)]:
        outputs = torch.zeros(4, NUM_CLASSES)
        outputs[:, 0] = class0_logit
        board.update(path, heldout_score=score, flops=1, outputs=outputs)
    student = torch.zeros(4, NUM_CLASSES)

    expected = [(student.softmax(-1)[:, 0] - e.outputs.softmax(-1)[:, 0]).mean() for e in board]
    teacher, score = select_teacher(meta, student, board)
    assert teacher.path == (1,) and teacher is board[1]
    torch.testing.assert_close(score, max(expected))
    torch.testing.assert_close(kd_weight(score), torch.sigmoid(-max(expected)))
    assert not torch.isclose(kd_weight(score), torch.sigmoid(-expected[-1]))  # the reference's value


def test_meta_network_reads_the_first_images_concatenated_as_the_reference() -> None:
    # The reference's meta layer: Linear(C * SLICE, 1) on the softmax differences of SLICE = 4 images, one row
    # after the other, so each image position has its own weights; images past the slice are not read.
    meta = MetaMatchingNetwork(NUM_CLASSES, slice_size=4)
    weight = torch.randn(1, 4 * NUM_CLASSES, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        meta.net[-1].weight.copy_(weight)
        meta.net[-1].bias.fill_(0.25)
    student, path = _outputs(1).repeat(2, 1), _outputs(2).repeat(2, 1)  # 8 images
    diff = student.softmax(-1) - path.softmax(-1)
    expected = sum(weight[0, i * NUM_CLASSES : (i + 1) * NUM_CLASSES] @ diff[i] for i in range(4)) + 0.25
    torch.testing.assert_close(meta(student, path), expected)
    torch.testing.assert_close(meta(student[:4], path[:4]), expected)
    swapped = [1, 0, 2, 3]
    assert not torch.isclose(meta(student[swapped], path[swapped]), expected)  # position-dependent
    with pytest.raises(ValueError, match="reads 4"):
        meta(student[:3], path[:3])


class _MemorizingModel(nn.Module):
    """Predicts the class written in pixel (0, 0, 0): right on the training batch, wrong on held-out data."""

    def forward(self, x: torch.Tensor, path: object) -> torch.Tensor:
        return F.one_hot(x[:, 0, 0, 0].long(), NUM_CLASSES).float()


def test_admission_uses_the_heldout_score() -> None:
    labels = torch.arange(8) % NUM_CLASSES
    train_images, heldout_images = torch.zeros(8, 3, 4, 4), torch.zeros(8, 3, 4, 4)
    train_images[:, 0, 0, 0] = labels.float()  # memorized
    heldout_images[:, 0, 0, 0] = ((labels + 1) % NUM_CLASSES).float()  # not generalized
    model = _MemorizingModel()

    board = PrioritizedBoard(size=2)
    for i in range(2):
        board.update((i,), heldout_score=0.5, flops=1, outputs=_outputs(i))
    train_acc, _ = evaluate_path(model, (9,), train_images, labels)
    assert train_acc == 1.0 and board.would_admit(train_acc, 1)  # the reference would admit it
    assert not update_board(board, model, (9,), (heldout_images, labels), flops=1)
    assert (9,) not in board


# ----------------------------------------------------------------------------- bilevel meta update


def _heldout_loss_after_sgd_step(supernet, m, teacher_path, path, train_batch, heldout_batch, lr) -> torch.Tensor:
    """The bilevel objective written out plainly for a given KD weight m: copy the student, take a
    real SGD step on the prioritized loss, return the held-out CE."""
    student = copy.deepcopy(supernet)
    with torch.no_grad():
        teacher_logits = student(train_batch[0], teacher_path)
    logits = student(train_batch[0], path)
    kd = -(teacher_logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
    loss = (m * kd + (2 - m) * F.cross_entropy(logits, train_batch[1])) / 2
    params = list(student.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p -= lr * g
        return F.cross_entropy(student(heldout_batch[0], path), heldout_batch[1])


def test_meta_update_follows_the_hypergradient(tiny_supernet: Supernet) -> None:
    torch.manual_seed(0)
    supernet = copy.deepcopy(tiny_supernet).double().train()
    meta = MetaMatchingNetwork(NUM_CLASSES).double()
    with torch.no_grad():  # away from the zero init, so the entries' scores differ clearly
        meta.net[-1].weight.normal_(0, 3.0)
    train_batch = (_images(8, size=16, seed=2).double(), torch.arange(8) % NUM_CLASSES)
    heldout_batch = (_images(8, size=16, seed=3).double(), (torch.arange(8) + 3) % NUM_CLASSES)
    board = PrioritizedBoard(size=3)
    for path in [(0,) * 6, (5,) * 6, (2, 3, 2, 3, 2, 3)]:
        update_board(board, supernet, path, heldout_batch, flops=1)
    student_path, lr, meta_lr = (1, 4, 1, 4, 1, 4), 0.5, 0.1

    # Independent hypergradient. The meta network acts only through m = sigmoid(-best score), so
    # dL/dtheta = dL/dm * dm/dtheta: dL/dm by central differences of the plainly written objective,
    # dm/dtheta by autograd through the meta network alone.
    def objective(m: torch.Tensor | float, teacher_path: tuple[int, ...]) -> torch.Tensor:
        return _heldout_loss_after_sgd_step(supernet, m, teacher_path, student_path, train_batch, heldout_batch, lr)

    with torch.no_grad():
        student_meta = supernet.eval()(heldout_batch[0], student_path)  # eval mode, as the board's outputs
        supernet.train()
    scores = torch.stack([meta(student_meta, e.outputs) for e in board])
    teacher = board[int(scores.argmax())]
    m = torch.sigmoid(-scores.max())
    dm_dtheta = torch.autograd.grad(m, list(meta.parameters()))
    eps = 1e-4
    dloss_dm = (objective(m.item() + eps, teacher.path) - objective(m.item() - eps, teacher.path)) / (2 * eps)
    expected_grads = [dloss_dm * g for g in dm_dtheta]
    loss_before = objective(m.item(), teacher.path).item()
    before = [p.detach().clone() for p in meta.parameters()]
    state_before = {k: v.clone() for k, v in supernet.state_dict().items()}

    result = meta_update(
        meta,
        supernet,
        student_path,
        train_batch,
        heldout_batch,
        board,
        heldout_batch[0],
        lr=lr,
        meta_optimizer=torch.optim.SGD(meta.parameters(), lr=meta_lr),
    )

    assert result.teacher is teacher
    assert result.kd_weight == pytest.approx(m.item(), rel=1e-12)
    assert result.heldout_loss == pytest.approx(loss_before, rel=1e-9)
    assert abs(dloss_dm) > 1e-6 and any(g.abs().max() > 1e-6 for g in expected_grads)
    for p, p0, g in zip(meta.parameters(), before, expected_grads, strict=True):
        torch.testing.assert_close(p.detach() - p0, -meta_lr * g, rtol=1e-5, atol=1e-10)
    # ...and that step lowers the held-out loss after the virtual step (the teacher stays the same).
    with torch.no_grad():
        new_scores = torch.stack([meta(student_meta, e.outputs) for e in board])
    assert board[int(new_scores.argmax())] is teacher
    assert objective(torch.sigmoid(-new_scores.max()).item(), teacher.path).item() < loss_before

    # The supernet itself is untouched: no weight, BN statistic or gradient changed.
    for key, value in supernet.state_dict().items():
        assert torch.equal(value, state_before[key]), key
    assert all(p.grad is None for p in supernet.parameters())


# ----------------------------------------------------------------------------- export


def test_recalibration_sets_bn_statistics_to_the_batches_average(tiny_supernet: Supernet) -> None:
    model = export(tiny_supernet, (1, 2, 3, 4, 5, 0)).train()
    batches = [_images(6, seed=10 + i) for i in range(3)]
    # Independently: the first BN sees the stem conv's outputs; its statistics over all 18 images.
    with torch.no_grad():
        first_conv = model.stem[0].conv(torch.cat(batches))
    bn = model.stem[0].bn
    momentum = bn.momentum
    assert recalibrate_bn(model.eval(), iter(batches)) == 18
    assert not model.training and bn.momentum == momentum
    torch.testing.assert_close(bn.running_mean, first_conv.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    # Each batch's unbiased variance, averaged over the batches (BN's cumulative average), not the pooled one.
    per_batch = [first_conv[i * 6 : (i + 1) * 6].var(dim=(0, 2, 3), unbiased=True) for i in range(3)]
    torch.testing.assert_close(bn.running_var, torch.stack(per_batch).mean(0), rtol=1e-5, atol=1e-6)
    # The supernet's own statistics are untouched, and held-out scoring (eval mode) does not move them.
    before = {k: v.clone() for k, v in tiny_supernet.state_dict().items()}
    eval_logits(tiny_supernet.train(), _images(4), (0,) * 6)
    assert tiny_supernet.training
    assert all(torch.equal(v, before[k]) for k, v in tiny_supernet.state_dict().items())
    tiny_supernet.eval()
