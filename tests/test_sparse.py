"""Sparsify to top-k and rebuild at any temperature."""

import math

import numpy as np
import pytest
import torch

from logit_store import StoreInputError
from logit_store.sparse import rebuild_log_probs, rebuild_probs, sparsify
from logit_store.statistics import topk_mass


def tinyvit_rebuild(probs_topk: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """TinyViT's rule, written from its description: fill with the even tail, scatter top-k probs."""
    tail = (1 - probs_topk.sum(dim=1, keepdim=True)) / (num_classes - probs_topk.shape[1])
    return tail.expand(-1, num_classes).clone().scatter_(1, indices, probs_topk)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 100, generator=g) * 2
    x[torch.arange(64), torch.arange(64)] += 8
    return x


STEP = 2.0**-11  # the format's code step (docs/STORE_FORMAT.md)


def test_topk_sorted_and_exact(logits):
    sp = sparsify(logits, 10)
    assert sp.values.dtype == torch.float32 and sp.tail_lse.dtype == torch.float32
    assert (sp.values[:, :-1] >= sp.values[:, 1:]).all() and (sp.values[:, 0] == 0).all()
    ref_v, ref_i = logits.double().topk(10, dim=1)
    below = ref_v - ref_v[:, :1]  # the logits relative to the top one, rounded to whole steps
    torch.testing.assert_close(sp.values.double(), (below / STEP).round() * STEP, atol=0, rtol=0)
    assert (sp.values.double() - below).abs().max() <= STEP / 2
    assert torch.equal(sp.indices, ref_i)
    rest = logits.double().scatter(1, ref_i, float("-inf")).logsumexp(dim=1) - ref_v[:, 0]
    torch.testing.assert_close(sp.tail_lse.double(), (rest / STEP).round() * STEP, atol=1e-9, rtol=0)


def test_far_logits_are_clamped_32_nats_below_the_top_and_the_tail_16():
    x = torch.tensor([[50.0, 49.0, 10.0, -5.0, -6.0]])
    sp = sparsify(x, 3)
    assert sp.values[0].tolist() == [0.0, -1.0, -65535 * STEP]
    assert sp.tail_lse[0].item() == -32767 * STEP  # log(e^-55 + e^-56) is below the tail's clamp
    assert sparsify(x, 5).tail_lse[0].item() == -65504.0  # k = C: no tail


def test_rebuild_at_t1_equals_tinyvit(logits):
    sp = sparsify(logits, 10)
    ours = rebuild_probs(sp.values, sp.indices, sp.tail_lse, 100)
    # The kept probabilities are exact softmax values of the stored logits.
    z = torch.cat([sp.values.float(), sp.tail_lse.float()[:, None]], dim=1).softmax(dim=1)
    ref = tinyvit_rebuild(z[:, :10], sp.indices, 100)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.sum(dim=1), torch.ones(64))


def test_rebuild_temperature(logits):
    sp = sparsify(logits, 100)  # k = C: nothing left out, so any T is exact
    for t in (0.5, 1.0, 4.0):
        torch.testing.assert_close(
            rebuild_probs(sp.values, sp.indices, sp.tail_lse, 100, t),
            (sp.values.float().gather(1, sp.indices.argsort(1)) / t).softmax(1),
            atol=1e-6,
            rtol=1e-5,
        )
    sp = sparsify(logits, 10)
    hot = rebuild_log_probs(sp.values, sp.indices, sp.tail_lse, 100, temperature=4.0).exp()
    cold = rebuild_probs(sp.values, sp.indices, sp.tail_lse, 100)
    assert (hot.max(dim=1).values < cold.max(dim=1).values).all()  # a higher T flattens


def test_statistics(logits):
    sp = sparsify(logits, 10)
    assert sp.kl.shape == (64, 3)
    full = logits.softmax(dim=1)
    kept = full.gather(1, sp.indices).sum(dim=1)
    mass = topk_mass(sp.values.numpy(), sp.tail_lse.numpy())
    np.testing.assert_allclose(mass, kept.numpy(), rtol=1e-3)
    for column, t in enumerate((1.0, 2.0, 4.0)):
        # Rebuild at T written out: the kept logits, and each other class at tail - log(C - k).
        z = torch.full((64, 100), 0.0, dtype=torch.float64)
        z[:] = (sp.tail_lse.double() - math.log(90))[:, None]
        z.scatter_(1, sp.indices, sp.values.double())
        q = (z / t).softmax(dim=1)
        p = (logits.double() / t).softmax(dim=1)
        ref_kl = (p * (p.log() - q.log())).sum(dim=1)
        torch.testing.assert_close(sp.kl[:, column].double(), ref_kl, atol=1e-4, rtol=1e-3)
    assert sparsify(logits, 100).kl.max() < 1e-5
    assert sparsify(logits, 2).kl.mean() > sp.kl.mean()  # keeping less loses more
    assert math.isclose(
        float(topk_mass(sparsify(logits, 100).values.numpy(), sparsify(logits, 100).tail_lse.numpy()).min()), 1.0
    )


def test_bad_logits(logits):
    bad = logits.clone()
    bad[5, 3] = float("nan")
    with pytest.raises(StoreInputError, match=r"NaN or inf \(batch row 5\)"):
        sparsify(bad, 5)
    with pytest.raises(StoreInputError, match=r"k=101 must be in \[1, 100\]"):
        sparsify(logits, 101)
    with pytest.raises(StoreInputError, match="must be \\[batch, classes\\]"):
        sparsify(logits[0], 5)


def test_large_logits_keep_their_precision(logits):
    """Only differences to the top logit are kept, so a shift of 1e5 (beyond float16) changes nothing."""
    near, far = sparsify(logits, 10), sparsify(logits.double() + 1e5, 10)
    assert torch.equal(near.indices, far.indices)
    assert (near.values - far.values).abs().max() <= STEP
