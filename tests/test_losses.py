"""The TinyViT loss: soft-target cross-entropy at temperature T against a live or a stored teacher."""

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


def test_label_loss_counts_the_labelled_rows_only():
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
    expected = -(targets * F.log_softmax(logits[rows], -1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    none = label_loss(logits, {k: v.clone().fill_(-1) if k != "lam" else v for k, v in batch.items()}, 4)
    none.backward()
    assert none.item() == 0.0 and logits.grad.abs().sum() == 0
