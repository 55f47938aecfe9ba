"""Sparse-teacher (top-k + tail bucket) response losses against dense losses and an explicit float64 reference."""

import math

import pytest
import torch

from kdistill.errors import WiringError
from kdistill.losses import SparseDistribution, jsd, kd, kl, skew_kl, tvd
from kdistill.losses.sparse import bucket_log_probs, sparse_jsd, sparse_kd, sparse_kl, sparse_loss, sparse_skew_kl, \
    sparse_tvd


def logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


PAIRS = [
    (lambda s, t, T: sparse_kd(s, t, T), lambda s, t, T: kd(s, t, T)),
    (lambda s, t, T: sparse_kl(s, t, T), lambda s, t, T: kl(s, t, T)),
    (lambda s, t, T: sparse_kl(s, t, T, reverse=True), lambda s, t, T: kl(s, t, T, reverse=True)),
    (lambda s, t, T: sparse_jsd(s, t, 0.3, T), lambda s, t, T: jsd(s, t, 0.3, T)),
    (lambda s, t, T: sparse_skew_kl(s, t, 0.1, False, T), lambda s, t, T: skew_kl(s, t, 0.1, False, T)),
    (lambda s, t, T: sparse_tvd(s, t, T), lambda s, t, T: tvd(s, t, T)),
]


@pytest.mark.parametrize("pair", range(len(PAIRS)))
@pytest.mark.parametrize("shape", [(5, 11), (3, 4, 9)])
def test_sparse_equals_dense_when_k_is_the_vocabulary(pair, shape):
    sparse_fn, dense_fn = PAIRS[pair]
    temperature = 2.0
    s = logits(*shape, seed=1).requires_grad_(True)
    t = logits(*shape, seed=2)
    teacher = SparseDistribution.from_logits(t, shape[-1], temperature)
    assert torch.isneginf(teacher.log_tail).all()
    got, want = sparse_fn(s, teacher, temperature), dense_fn(s, t, temperature)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got, = torch.autograd.grad(got, s)
    g_want, = torch.autograd.grad(want, s)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-12)


def test_sparse_kd_matches_explicit_bucket_formula():
    """T^2 * sum_b P~_b log(P~_b / Q~_b) over the k top classes of the teacher and one tail bucket."""
    temperature, k = 1.5, 3
    s, t = logits(4, 8, seed=3), logits(4, 8, seed=4)
    got = sparse_kd(s, SparseDistribution.from_logits(t, k, temperature), temperature, reduction="none")
    for row in range(4):
        p = [math.exp(v / temperature) for v in t[row].tolist()]
        q = [math.exp(v / temperature) for v in s[row].tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        top = sorted(range(8), key=lambda c: -p[c])[:k]
        pb = [p[c] for c in top] + [1 - sum(p[c] for c in top)]
        qb = [q[c] for c in top] + [sum(q[c] for c in range(8) if c not in top)]
        want = temperature ** 2 * sum(a * math.log(a / b) for a, b in zip(pb, qb))
        assert abs(float(got[row]) - want) < 1e-10


def test_bucketed_kl_is_a_proper_divergence_bounded_by_dense_kl():
    s, t = logits(64, 50, seed=5), logits(64, 50, seed=6)
    for k in (1, 5, 20, 49):
        teacher = SparseDistribution.from_logits(t, k)
        per_row = sparse_kl(s, teacher, reduction="none")
        assert (per_row >= -1e-12).all()
        assert (per_row <= kl(s, t, reduction="none") + 1e-12).all()  # coarse-graining never increases KL
        assert float(sparse_kl(t, teacher)) < 1e-12  # zero when the student is the teacher
        buckets = bucket_log_probs(s, teacher.indices).exp().sum(-1)
        torch.testing.assert_close(buckets, torch.ones(64, dtype=torch.float64))


def test_tail_mass_is_exact_even_when_tiny():
    t = torch.tensor([[40.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # tail ~ 3 * e^-40: 1 - sum would round to 0
    teacher = SparseDistribution.from_logits(t, 1)
    assert abs(float(teacher.log_tail) - (math.log(3) - 40 - math.log1p(3 * math.exp(-40)))) < 1e-9


def test_masks_reductions_and_errors():
    s, t = logits(2, 5, 7, seed=7), logits(2, 5, 7, seed=8)
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(0)) > 0.4
    teacher = SparseDistribution.from_logits(t, 3, 4.0)
    per = sparse_kd(s, teacher, 4.0, reduction="none")
    torch.testing.assert_close(sparse_kd(s, teacher, 4.0, mask=mask), per[mask].mean())
    with pytest.raises(WiringError, match="temperature 4 but the loss uses temperature 2"):
        sparse_kd(s, teacher, 2.0)
    with pytest.raises(WiringError, match="full teacher distribution"):
        sparse_loss("dkd", s, teacher, {})
    with pytest.raises(WiringError, match="shape"):
        sparse_kd(s[:, :4], teacher, 4.0)
