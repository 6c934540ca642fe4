"""The README's claims about what the store's rebuild is (docs/methods/tinyvit.md, "The store: what is exact"):
at T = 1 it is the TinyViT reference's rebuild of what was stored; at T != 1 its tail is an approximation."""

from __future__ import annotations

import torch

from logit_store.sparse import rebuild_probs, sparsify

C, K = 100, 5


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(64, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


def test_at_t1_the_rebuild_is_the_references_rebuild_of_the_stored_record() -> None:
    logits = _logits()
    sp = sparsify(logits, K)
    values, tail = sp.values.double(), sp.tail_lse.double()
    rebuilt = rebuild_probs(sp.values.float(), sp.indices, sp.tail_lse.float(), C).double()
    # The reference: the kept probabilities as stored, and every other class (1 - their sum) / (C - k).
    total = torch.logsumexp(torch.cat([values, tail[:, None]], dim=1), dim=1, keepdim=True)
    kept = (values - total).exp()
    expected = ((1 - kept.sum(1, keepdim=True)) / (C - K)).expand(-1, C).scatter(1, sp.indices, kept)
    torch.testing.assert_close(rebuilt, expected, rtol=1e-5, atol=1e-7)
    # ...and those stored probabilities are the teacher's, up to storage rounding.
    true = logits.softmax(1).gather(1, sp.indices)
    assert ((kept - true).abs() / true).max() < 0.05


def test_away_from_t1_the_tail_is_approximate() -> None:
    logits = _logits(1)
    sp = sparsify(logits, K)
    for t in (2.0, 4.0):
        p = (logits / t).softmax(1)
        rebuilt = rebuild_probs(sp.values.float(), sp.indices, sp.tail_lse.float(), C, temperature=t).double()
        kept_true, kept_rebuilt = p.gather(1, sp.indices).sum(1), rebuilt.gather(1, sp.indices).sum(1)
        # One shared tail logit, softened, gives the classes left out more than the teacher's softened tail:
        # the kept mass comes out lower than the teacher's.
        assert (kept_rebuilt < kept_true - 1e-3).float().mean() > 0.9
