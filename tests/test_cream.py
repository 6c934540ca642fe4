"""Cream building blocks: supernet FLOPs and export, the prioritized board, meta-matching and its bilevel update."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from recipes.cream.board import (
    MetaMatchingNetwork,
    PrioritizedBoard,
    evaluate_path,
    kd_weight,
    meta_update,
    prioritized_loss,
    select_teacher,
    update_board,
)
from students.supernet import (
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
    with pytest.raises(ValueError):
        normalize_path(config, flat[:-1])
    with pytest.raises(ValueError):
        normalize_path(config, (0, 0, 0, 0, 0, 6))
    generator = torch.Generator().manual_seed(0)
    assert sample_path(config, generator, weights=torch.eye(6)[3]) == (3,) * 6
    per_layer = torch.eye(6)  # layer i can only pick choice i
    assert sample_path(config, generator, weights=per_layer) == flat
    paths = {sample_path(config, generator) for _ in range(20)}
    assert len(paths) > 1 and all(len(p) == config.num_layers for p in paths)


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


# ----------------------------------------------------------------------------- board


def _outputs(seed: int) -> torch.Tensor:
    return torch.randn(4, NUM_CLASSES, generator=torch.Generator().manual_seed(seed))


def test_board_admission_and_eviction() -> None:
    board = PrioritizedBoard(size=3)
    for i, score in enumerate([0.5, 0.7, 0.6]):
        assert board.update((i,), heldout_score=score, flops=100, outputs=_outputs(i))
    assert board.is_full and [e.heldout_score for e in board] == [0.7, 0.6, 0.5]

    assert not board.update((10,), heldout_score=0.4, flops=10, outputs=_outputs(10))  # worse: refused
    assert not board.update((11,), heldout_score=0.5, flops=100, outputs=_outputs(11))  # equal: refused
    assert board.update((12,), heldout_score=0.8, flops=100, outputs=_outputs(12))  # better: evicts worst
    assert [e.path for e in board] == [(12,), (1,), (2,)]

    # Equal score: fewer FLOPs wins, more FLOPs is refused.
    assert not board.update((13,), heldout_score=0.6, flops=150, outputs=_outputs(13))
    assert board.update((14,), heldout_score=0.6, flops=50, outputs=_outputs(14))
    assert [(e.path, e.flops) for e in board] == [((12,), 100), ((1,), 100), ((14,), 50)]

    # Offering a path already on the board replaces its entry instead of duplicating it.
    assert board.update((1,), heldout_score=0.65, flops=100, outputs=_outputs(1))
    assert [e.path for e in board] == [(12,), (1,), (14,)] and board[1].heldout_score == 0.65

    restored = PrioritizedBoard(size=1)
    restored.load_state_dict(board.state_dict())
    assert restored.size == 3 and [(e.path, e.heldout_score, e.flops) for e in restored] == [
        (e.path, e.heldout_score, e.flops) for e in board
    ]
    assert all(torch.equal(a.outputs, b.outputs) for a, b in zip(restored, board, strict=True))


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


def test_teacher_and_m_come_from_the_best_matching_entry() -> None:
    # Score = mean over the batch of (p_student[:, 0] - p_path[:, 0]): a path that puts little mass on
    # class 0 matches best. The best entry is in the middle of the board, neither first nor last.
    meta = MetaMatchingNetwork(NUM_CLASSES)
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
        student_meta = supernet(heldout_batch[0], student_path)
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
