"""The TinyViT loss: soft-target cross-entropy at temperature T against a live or a stored teacher."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_helpers import make_method

from distill.losses import soft_target_cross_entropy, soft_target_kd
from logit_store.sparse import rebuild_log_probs, rebuild_probs, sparsify


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_target_kd_is_t2_scaled_cross_entropy(temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10) * 3
    p = F.softmax(teacher / temperature, -1)
    expected = -(p * F.log_softmax(student / temperature, -1)).sum(-1).mean() * temperature**2
    torch.testing.assert_close(soft_target_kd(student, teacher, temperature), expected)


def test_kd_gradient_vanishes_when_student_matches_teacher():
    teacher = torch.randn(4, 10) * 2
    student = teacher.clone().requires_grad_()
    soft_target_kd(student, teacher, 2.0).backward()
    assert student.grad.abs().max() < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_stored_log_probs_give_the_store_rebuild_at_any_temperature(temperature):
    """A StoreTeacher returns rebuilt log-probs at T = 1; the loss's softmax(./T) must equal the rebuild at T."""
    torch.manual_seed(1)
    sp = sparsify(torch.randn(6, 20) * 4, k=5)
    args = (sp.values, sp.indices, sp.tail_lse, 20)
    log_probs = rebuild_log_probs(*args, temperature=1.0)
    torch.testing.assert_close(
        F.softmax(log_probs / temperature, -1), rebuild_probs(*args, temperature=temperature), atol=1e-5, rtol=1e-4
    )


class _Teacher:
    def __init__(self, logits):
        self.value, self.calls = logits, []

    def logits(self, images, epoch=None, ids=None):
        self.calls.append((epoch, ids.tolist()))
        return self.value


def test_tinyvit_method_asks_the_teacher_by_epoch_and_ids_and_weights_the_label_term():
    torch.manual_seed(2)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    batch = {
        "image": torch.randn(4, 3, 2, 2),
        "id": torch.tensor([5, 1, 7, 2]),
        "epoch": torch.full((4,), 3),
        "label": torch.tensor([0, 1, 2, 3]),
        "partner_label": torch.tensor([0, 1, 2, 3]),
        "lam": torch.ones(4),
    }
    teacher = _Teacher(torch.randn(4, 10))
    plain = make_method("tinyvit").loss(student, batch, teacher)
    assert set(plain) == {"loss", "kd"} and teacher.calls == [(3, [5, 1, 7, 2])]
    mixed = make_method("tinyvit", {"temperature": 2.0, "label_weight": 0.5}).loss(student, batch, teacher)
    logits = student(batch["image"])
    label = soft_target_cross_entropy(logits, F.one_hot(batch["label"], 10).float())
    torch.testing.assert_close(mixed["label"], label)
    torch.testing.assert_close(mixed["loss"], soft_target_kd(logits, teacher.value, 2.0) + 0.5 * label)


def test_label_loss_sums_the_labelled_rows_over_the_batch():
    from distill.losses import label_loss

    torch.manual_seed(3)
    logits = torch.randn(5, 4, requires_grad=True)
    batch = {
        "label": torch.tensor([2, -1, 0, 3, 1]),
        "partner_label": torch.tensor([2, -1, 1, -1, 1]),  # row 3 mixed with an unlabelled partner
        "lam": torch.tensor([1.0, 1.0, 0.7, 0.6, 1.0]),
    }
    loss = label_loss(logits, batch, 4, smoothing=0.1)
    rows = [0, 2, 4]  # known labels (row 1 unlabelled, row 3's partner unlabelled)
    targets = torch.tensor([[0, 0, 1, 0], [0.7, 0.3, 0, 0], [0, 1, 0, 0]]) * 0.9 + 0.1 / 4
    expected = -(targets * F.log_softmax(logits[rows], -1)).sum(-1).sum() / 5  # over the whole batch of 5
    torch.testing.assert_close(loss, expected)
    none = label_loss(logits, {k: v.clone().fill_(-1) if k != "lam" else v for k, v in batch.items()}, 4)
    none.backward()
    assert none.item() == 0.0 and logits.grad.abs().sum() == 0


# ---- logit losses against their papers' formulas, written out in numpy ---------------------------------------


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def nkd_reference(s, t, target, T, gamma):
    rows = []
    for si, ti, y in zip(s, t, target, strict=True):
        q, p = _softmax(si), _softmax(ti)
        rest = [j for j in range(len(si)) if j != y]
        q_rest, p_rest = _softmax(si[rest] / T), _softmax(ti[rest] / T)
        rows.append((-p[y] * np.log(q[y]), -gamma * T**2 * (p_rest * np.log(q_rest)).sum()))
    return np.mean([a for a, _ in rows]) + np.mean([b for _, b in rows])


def dkd_reference(s, t, target, T, alpha, beta):
    total = []
    for si, ti, y in zip(s, t, target, strict=True):
        q, p = _softmax(si / T), _softmax(ti / T)
        pb, qb = np.array([p[y], 1 - p[y]]), np.array([q[y], 1 - q[y]])
        rest = [j for j in range(len(si)) if j != y]
        pr, qr = _softmax(ti[rest] / T), _softmax(si[rest] / T)
        total.append(alpha * (pb * np.log(pb / qb)).sum() + beta * (pr * np.log(pr / qr)).sum())
    return np.mean(total) * T**2


def dist_reference(s, t, T, beta, gamma):
    q = np.stack([_softmax(x / T) for x in s])
    p = np.stack([_softmax(x / T) for x in t])
    inter = np.mean([1 - np.corrcoef(q[i], p[i])[0, 1] for i in range(len(q))])
    intra = np.mean([1 - np.corrcoef(q[:, c], p[:, c])[0, 1] for c in range(q.shape[1])])
    return T**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_logit_losses_are_their_papers_formulas(T):
    from distill.losses import dist_loss, dkd_loss, nkd_loss

    g = torch.Generator().manual_seed(4)
    s, t = (
        torch.randn(6, 7, generator=g, dtype=torch.float64) * 2,
        torch.randn(6, 7, generator=g, dtype=torch.float64) * 3,
    )
    target = torch.tensor([0, 3, 6, 2, 2, 5])
    sn, tn, yn = s.numpy(), t.numpy(), target.numpy()
    assert nkd_loss(s, t, target, T, 1.5).item() == pytest.approx(nkd_reference(sn, tn, yn, T, 1.5), rel=1e-5)
    assert dkd_loss(s, t, target, T, 0.5, 8.0).item() == pytest.approx(dkd_reference(sn, tn, yn, T, 0.5, 8.0), rel=1e-5)
    assert dist_loss(s, t, T, 1.0, 2.0).item() == pytest.approx(dist_reference(sn, tn, T, 1.0, 2.0), rel=1e-5)


@pytest.mark.parametrize("kd", ["hinton", "nkd", "dkd", "dist"])
def test_each_kd_loss_from_a_store_equals_the_live_teachers_up_to_the_top_k_cut(tmp_path, kd):
    """With every class kept (k = C) the store's rebuild is the teacher's distribution up to its storage
    precision; the method's loss from the store then equals its loss from the live logits."""
    from logit_store import Manifest, create_store, record_seeds
    from logit_store.sparse import sparsify
    from teachers.store_teacher import StoreTeacher

    g = torch.Generator().manual_seed(5)
    n, classes = 16, 10
    live = torch.randn(n, classes, generator=g) * 3 + 4
    store = create_store(tmp_path / "s.zarr", Manifest(num_samples=n, num_classes=classes, k=classes, epochs=1))
    ids = np.arange(n)
    with store.writer(0) as writer:
        writer.write(ids, sparsify(live, classes).to_records(classes, record_seeds(0, 0, ids)))
    stored = StoreTeacher(store)
    batch = {"image": torch.randn(n, 3, 2, 2, generator=g), "id": torch.arange(n), "epoch": torch.zeros(n, dtype=torch.long),
             "label": torch.tensor([1, -1] * 8), "partner_label": torch.tensor([1, -1] * 8), "lam": torch.ones(n)}  # fmt: skip
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, classes))
    method = make_method("tinyvit", {"kd": kd, "temperature": 2.0})
    from_store = method.loss(student, batch, stored)["kd"]
    from_live = method.loss(student, batch, _Teacher(live))["kd"]
    assert from_store.item() == pytest.approx(from_live.item(), rel=2e-3, abs=1e-5)
