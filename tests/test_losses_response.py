"""Response (logit) losses against first-principles float64 references written with Python loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdistill.errors import WiringError
from kdistill.losses import CRDLoss, call_term, get_loss, loss_names, ce, dist, dkd, jsd, kd, kl, skew_kl, tvd


# ---------------------------------------------------------------------------------------------------------------
# references (plain Python floats)
# ---------------------------------------------------------------------------------------------------------------


def rand(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def rows(x: torch.Tensor) -> list[list[float]]:
    return x.reshape(-1, x.shape[-1]).tolist()


def softmax_ref(z: list[float], temperature: float = 1.0) -> list[float]:
    m = max(z)
    e = [math.exp((v - m) / temperature) for v in z]
    s = sum(e)
    return [v / s for v in e]


def kl_ref(p: list[float], q: list[float]) -> float:
    total = 0.0
    for pi, qi in zip(p, q):
        if pi > 0:
            total += pi * math.log(pi / qi)
    return total


def per_row(fn, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    vals = [fn(a, b) for a, b in zip(rows(s), rows(t))]
    return torch.tensor(vals, dtype=torch.float64).reshape(s.shape[:-1])


def kd_ref(a, b, temperature):
    return temperature**2 * kl_ref(softmax_ref(b, temperature), softmax_ref(a, temperature))


def jsd_ref(a, b, beta, temperature=1.0):
    p, q = softmax_ref(b, temperature), softmax_ref(a, temperature)
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    return beta * kl_ref(p, m) + (1 - beta) * kl_ref(q, m)


def skew_ref(a, b, alpha, reverse, temperature=1.0):
    p, q = softmax_ref(b, temperature), softmax_ref(a, temperature)
    first, second = (q, p) if reverse else (p, q)
    mix = [alpha * f + (1 - alpha) * s for f, s in zip(first, second)]
    return kl_ref(first, mix)


def tvd_ref(a, b, temperature=1.0):
    p, q = softmax_ref(b, temperature), softmax_ref(a, temperature)
    return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))


def dkd_ref(a, b, label, alpha, beta, temperature):
    p_s, p_t = softmax_ref(a, temperature), softmax_ref(b, temperature)
    bin_s = [p_s[label], 1.0 - p_s[label]]
    bin_t = [p_t[label], 1.0 - p_t[label]]
    # non-target distribution: softmax restricted to the other classes
    rest_s = softmax_ref([v for c, v in enumerate(a) if c != label], temperature)
    rest_t = softmax_ref([v for c, v in enumerate(b) if c != label], temperature)
    t2 = temperature**2
    return alpha * t2 * kl_ref(bin_t, bin_s) + beta * t2 * kl_ref(rest_t, rest_s)


def pearson_ref(u: list[float], v: list[float]) -> float:
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    cov = sum((x - mu) * (y - mv) for x, y in zip(u, v))
    su = math.sqrt(sum((x - mu) ** 2 for x in u))
    sv = math.sqrt(sum((y - mv) ** 2 for y in v))
    return cov / (su * sv)


def dist_ref(s_rows, t_rows, beta, gamma, temperature):
    ys = [softmax_ref(r, temperature) for r in s_rows]
    yt = [softmax_ref(r, temperature) for r in t_rows]
    n, c = len(ys), len(ys[0])
    inter = 1 - sum(pearson_ref(ys[i], yt[i]) for i in range(n)) / n
    intra = 1 - sum(pearson_ref([ys[i][j] for i in range(n)], [yt[i][j] for i in range(n)]) for j in range(c)) / c
    return temperature**2 * (beta * inter + gamma * intra)


def ce_ref(a, label):
    return -math.log(softmax_ref(a)[label])


# ---------------------------------------------------------------------------------------------------------------
# values against references
# ---------------------------------------------------------------------------------------------------------------

ATOL = 1e-10


@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_kd_matches_reference_and_pytorch_idiom(temperature):
    s, t = rand(4, 7, seed=1), rand(4, 7, seed=2)
    ref = per_row(lambda a, b: kd_ref(a, b, temperature), s, t)
    got = kd(s, t, temperature=temperature, reduction="none")
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-9)
    torch.testing.assert_close(kd(s, t, temperature), ref.mean(), atol=ATOL, rtol=1e-9)
    idiom = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean")
    torch.testing.assert_close(kd(s, t, temperature), idiom * temperature * temperature, atol=ATOL, rtol=1e-9)
    # float32 path too
    idiom32 = F.kl_div(
        F.log_softmax(s.float() / temperature, -1), F.softmax(t.float() / temperature, -1), reduction="batchmean"
    ) * (temperature**2)
    torch.testing.assert_close(kd(s.float(), t.float(), temperature), idiom32, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_matches_reference(reverse, temperature):
    s, t = rand(2, 3, 6, seed=3), rand(2, 3, 6, seed=4)

    def ref(a, b):
        p, q = softmax_ref(b, temperature), softmax_ref(a, temperature)
        return kl_ref(q, p) if reverse else kl_ref(p, q)

    expected = per_row(ref, s, t)
    got = kl(s, t, temperature=temperature, reverse=reverse, reduction="none")
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-9)
    torch.testing.assert_close(kl(s, t, temperature, reverse), expected.mean(), atol=ATOL, rtol=1e-9)
    # kd is T^2 * forward kl
    if not reverse:
        torch.testing.assert_close(kd(s, t, temperature), temperature**2 * kl(s, t, temperature))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_reference(beta):
    s, t = rand(5, 6, seed=5), rand(5, 6, seed=6)
    expected = per_row(lambda a, b: jsd_ref(a, b, beta, 1.5), s, t)
    torch.testing.assert_close(jsd(s, t, beta=beta, temperature=1.5, reduction="none"), expected, atol=ATOL, rtol=1e-9)


def test_jsd_half_is_symmetric_and_bounded_by_log2():
    s, t = rand(5, 6, seed=7, scale=6.0), rand(5, 6, seed=8, scale=6.0)
    a = jsd(s, t, beta=0.5, reduction="none")
    torch.testing.assert_close(a, jsd(t, s, beta=0.5, reduction="none"))
    assert bool((a <= math.log(2) + 1e-12).all())


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t = rand(3, 4, 9, seed=9), rand(3, 4, 9, seed=10)
    mask = rand(3, 4, seed=11) > 0
    torch.testing.assert_close(jsd(s, t, beta=0.0, mask=mask), kl(s, t, mask=mask), rtol=0, atol=0)
    torch.testing.assert_close(jsd(s, t, beta=1.0, mask=mask), kl(s, t, reverse=True, mask=mask), rtol=0, atol=0)
    torch.testing.assert_close(
        jsd(s, t, beta=0.0, temperature=2.0, reduction="none"), kl(s, t, 2.0, reduction="none"), rtol=0, atol=0
    )
    # the naive formula would give 0 at the endpoints; ours does not
    assert float(jsd(s, t, beta=0.0)) > 0.01 and float(jsd(s, t, beta=1.0)) > 0.01


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_skew_kl_matches_reference(alpha, reverse):
    s, t = rand(4, 8, seed=12), rand(4, 8, seed=13)
    expected = per_row(lambda a, b: skew_ref(a, b, alpha, reverse, 2.0), s, t)
    got = skew_kl(s, t, alpha=alpha, reverse=reverse, temperature=2.0, reduction="none")
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-9)
    if alpha == 0.0:
        torch.testing.assert_close(got, kl(s, t, 2.0, reverse=reverse, reduction="none"))


def test_skew_kl_bounded_by_log_inverse_alpha_for_extreme_logits():
    s = torch.tensor([[60.0, -60.0, 0.0]])
    t = torch.tensor([[-60.0, 60.0, 0.0]])
    for reverse in (False, True):
        v = skew_kl(s, t, alpha=0.1, reverse=reverse)
        assert torch.isfinite(v) and float(v) <= math.log(10) + 1e-5


def test_tvd_matches_reference():
    s, t = rand(2, 3, 5, seed=14), rand(2, 3, 5, seed=15)
    expected = per_row(lambda a, b: tvd_ref(a, b, 3.0), s, t)
    torch.testing.assert_close(tvd(s, t, temperature=3.0, reduction="none"), expected, atol=ATOL, rtol=1e-9)
    assert bool((tvd(s * 50, t * 50, reduction="none") <= 1.0 + 1e-12).all())


@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (1.0, 0.0, 2.0)])
def test_dkd_matches_explicit_binary_and_non_target_distributions(alpha, beta, temperature):
    s, t = rand(6, 5, seed=16), rand(6, 5, seed=17)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    expected = torch.tensor(
        [dkd_ref(a, b, int(y), alpha, beta, temperature) for a, b, y in zip(rows(s), rows(t), labels)],
        dtype=torch.float64,
    )
    got = dkd(s, t, labels, alpha=alpha, beta=beta, temperature=temperature, reduction="none")
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(dkd(s, t, labels, alpha, beta, temperature), expected.mean(), atol=1e-9, rtol=1e-9)


def test_dkd_paper_trick_subtracting_1000_gives_same_nckd():
    # the paper excludes the target from the NCKD softmax by subtracting 1000 from its logit
    s, t = rand(4, 6, seed=18).float(), rand(4, 6, seed=19).float()
    labels = torch.tensor([1, 0, 5, 3])
    gt = F.one_hot(labels, 6).bool()
    temperature = 4.0
    log_s = F.log_softmax(s / temperature - 1000.0 * gt, dim=1)
    p_t = F.softmax(t / temperature - 1000.0 * gt, dim=1)
    nckd_paper = F.kl_div(log_s, p_t, reduction="sum") * temperature**2 / 4
    nckd_ours = dkd(s, t, labels, alpha=0.0, beta=1.0, temperature=temperature)
    torch.testing.assert_close(nckd_ours, nckd_paper, atol=1e-5, rtol=1e-5)


def test_dkd_3d_mask_and_ignore_index():
    s, t = rand(2, 4, 5, seed=20), rand(2, 4, 5, seed=21)
    labels = torch.tensor([[0, 1, 2, -100], [4, 3, 2, 1]])
    mask = torch.tensor([[True, True, True, True], [True, False, True, True]])
    got = dkd(s, t, labels, mask=mask, reduction="none")
    assert got.shape == (2, 4)
    assert got[0, 3] == 0 and got[1, 1] == 0
    valid = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (1, 3)]
    ref = [dkd_ref(s[i, j].tolist(), t[i, j].tolist(), int(labels[i, j]), 1.0, 8.0, 4.0) for i, j in valid]
    torch.testing.assert_close(dkd(s, t, labels, mask=mask), torch.tensor(sum(ref) / len(ref), dtype=torch.float64))
    summed = dkd(s, t, labels, mask=mask, reduction="sum")
    torch.testing.assert_close(summed, torch.tensor(sum(ref), dtype=torch.float64))


@pytest.mark.parametrize("beta,gamma,temperature", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_pearson_reference(beta, gamma, temperature):
    s, t = rand(6, 5, seed=22), rand(6, 5, seed=23)
    expected = dist_ref(rows(s), rows(t), beta, gamma, temperature)
    got = dist(s, t, beta=beta, gamma=gamma, temperature=temperature)
    assert abs(float(got) - expected) < 1e-6 * max(1.0, expected)  # eps=1e-8 in the Pearson denominator
    assert float(dist(s, t, reduction="sum")) == float(dist(s, t))


def test_dist_3d_flattens_valid_positions():
    s, t = rand(2, 3, 5, seed=24), rand(2, 3, 5, seed=25)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    expected = dist(s[mask], t[mask])
    torch.testing.assert_close(dist(s, t, mask=mask), expected)
    torch.testing.assert_close(dist(s, t), dist(s.reshape(6, 5), t.reshape(6, 5)))
    with pytest.raises(WiringError, match="none"):
        dist(s, t, reduction="none")


def test_dist_degenerate_batches():
    s, t = rand(1, 5, seed=26, scale=1.0).requires_grad_(), rand(1, 5, seed=27)
    v = dist(s, t)  # one row: intra term is 0 by convention
    v_value = float(v.detach())
    expected = 1 - pearson_ref(softmax_ref(rows(s.detach())[0]), softmax_ref(rows(t)[0]))
    assert abs(v_value - expected) < 1e-6
    v.backward()
    assert torch.isfinite(s.grad).all()
    none_valid = torch.zeros(1, dtype=torch.bool)
    assert float(dist(s, t, mask=none_valid).detach()) == 0.0


def test_ce_matches_reference_and_ignore_index():
    s = rand(2, 3, 4, seed=28)
    labels = torch.tensor([[0, 3, -100], [1, -100, 2]])
    got = ce(s, labels, reduction="none")
    assert got.shape == (2, 3) and got[0, 2] == 0 and got[1, 1] == 0
    valid = [(0, 0), (0, 1), (1, 0), (1, 2)]
    ref = [ce_ref(s[i, j].tolist(), int(labels[i, j])) for i, j in valid]
    torch.testing.assert_close(ce(s, labels), torch.tensor(sum(ref) / 4, dtype=torch.float64))
    torch.testing.assert_close(ce(s, labels), F.cross_entropy(s.reshape(-1, 4), labels.reshape(-1)))
    # registry form ce(student, teacher, labels): teacher ignored
    torch.testing.assert_close(ce(s, rand(2, 3, 4, seed=29), labels), ce(s, labels))


def test_ce_all_ignored_is_zero_with_grad():
    s = rand(3, 5, seed=30).float().requires_grad_()
    labels = torch.full((3,), -100)
    v = ce(s, labels)
    assert float(v.detach()) == 0.0 and v.requires_grad
    v.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert torch.isnan(F.cross_entropy(s.detach(), labels))  # what we avoid


# ---------------------------------------------------------------------------------------------------------------
# invariants
# ---------------------------------------------------------------------------------------------------------------

PAIR_LOSSES = {
    "kd": lambda s, t, **kw: kd(s, t, **kw),
    "kl": lambda s, t, **kw: kl(s, t, **kw),
    "kl_reverse": lambda s, t, **kw: kl(s, t, reverse=True, **kw),
    "jsd": lambda s, t, **kw: jsd(s, t, beta=0.3, **kw),
    "skew_kl": lambda s, t, **kw: skew_kl(s, t, **kw),
    "skew_rkl": lambda s, t, **kw: skew_kl(s, t, reverse=True, **kw),
    "tvd": lambda s, t, **kw: tvd(s, t, **kw),
    "dkd": lambda s, t, **kw: dkd(s, t, torch.arange(s.shape[0]) % s.shape[-1], **kw),
}


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_nonnegative_zero_on_identical_and_shift_invariant(name):
    fn = PAIR_LOSSES[name]
    s, t = rand(5, 6, seed=31), rand(5, 6, seed=32)
    per = fn(s, t, reduction="none")
    assert bool((per >= 0).all())
    assert float(fn(t, t).abs()) < 1e-12
    shift_s = rand(5, 1, seed=33) * 10
    shift_t = rand(5, 1, seed=34) * 10
    torch.testing.assert_close(fn(s + shift_s, t + shift_t, reduction="none"), per, atol=1e-10, rtol=1e-9)


def test_dist_zero_on_identical_and_in_range():
    s, t = rand(6, 5, seed=35), rand(6, 5, seed=36)
    assert abs(float(dist(t, t))) < 1e-6
    v = float(dist(s, t))
    assert 0 <= v <= 4  # each 1 - mean(rho) lies in [0, 2]


@pytest.mark.parametrize("name", list(PAIR_LOSSES) + ["dist", "ce"])
def test_finite_gradients_including_extreme_logits(name):
    fn = PAIR_LOSSES.get(name) or {
        "dist": lambda s, t, **kw: dist(s, t, **kw),
        "ce": lambda s, t, **kw: ce(s, torch.arange(s.shape[0]) % s.shape[-1], **kw),
    }[name]
    for scale in (1.0, 1e3):
        s = (rand(4, 6, seed=37) * scale).float().requires_grad_()
        t = (rand(4, 6, seed=38) * scale).float().requires_grad_()
        v = fn(s, t)
        v.backward()
        assert torch.isfinite(v), (name, scale)
        assert torch.isfinite(s.grad).all(), (name, scale)
        assert t.grad is None if name == "ce" else torch.isfinite(t.grad).all(), (name, scale)


@pytest.mark.parametrize("name", ["kd", "kl", "kl_reverse", "jsd", "skew_kl", "skew_rkl", "tvd"])
def test_teacher_minus_inf_logits_are_handled(name):
    # e.g. padded vocabulary entries masked with -inf in both models
    fn = PAIR_LOSSES[name]
    s = rand(3, 6, seed=39).float()
    t = rand(3, 6, seed=40).float()
    s[:, -2:] = float("-inf")
    t[:, -2:] = float("-inf")
    s.requires_grad_()
    v = fn(s, t)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(s.grad).all()
    torch.testing.assert_close(v, fn(s.detach()[:, :-2], t[:, :-2]))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    temperature=st.floats(0.25, 8.0),
    weight=st.floats(0.01, 0.99),
)
def test_property_divergences_nonnegative_and_forward_kl_reference(seed, temperature, weight):
    s, t = rand(3, 5, seed=seed, scale=3.0), rand(3, 5, seed=seed + 1, scale=3.0)
    for v in (
        kl(s, t, temperature, reduction="none"),
        jsd(s, t, beta=weight, temperature=temperature, reduction="none"),
        skew_kl(s, t, alpha=weight, temperature=temperature, reduction="none"),
        tvd(s, t, temperature, reduction="none"),
    ):
        assert bool((v >= -1e-12).all())
    expected = per_row(lambda a, b: kd_ref(a, b, temperature), s, t)
    torch.testing.assert_close(kd(s, t, temperature, reduction="none"), expected, atol=1e-9, rtol=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# mask / reduction / dtype semantics
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kd", "kl", "jsd", "skew_kl", "tvd"])
def test_mask_and_reduction_on_3d(name):
    fn = PAIR_LOSSES[name]
    s, t = rand(2, 4, 6, seed=41), rand(2, 4, 6, seed=42)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    full = fn(s, t, reduction="none")
    assert full.shape == (2, 4)
    masked = fn(s, t, mask=mask, reduction="none")
    assert masked.shape == (2, 4)
    torch.testing.assert_close(masked, torch.where(mask, full, torch.zeros_like(full)))
    torch.testing.assert_close(fn(s, t, mask=mask), full[mask].mean())
    torch.testing.assert_close(fn(s, t, mask=mask, reduction="sum"), full[mask].sum())
    torch.testing.assert_close(fn(s, t), full.mean())
    # garbage (NaN) at masked positions never reaches the result
    s_bad = s.clone()
    s_bad[~mask] = float("nan")
    torch.testing.assert_close(fn(s_bad, t, mask=mask), full[mask].mean())
    # changing masked positions changes nothing
    t_other = t.clone()
    t_other[~mask] = rand(int((~mask).sum()), 6, seed=43)
    torch.testing.assert_close(fn(s, t_other, mask=mask), fn(s, t, mask=mask))


def test_two_d_mean_is_batch_mean_and_all_masked_is_zero_with_grad():
    s, t = rand(4, 5, seed=44).float().requires_grad_(), rand(4, 5, seed=45).float()
    torch.testing.assert_close(kl(s, t), kl(s, t, reduction="sum") / 4)
    v = kl(s, t, mask=torch.zeros(4, dtype=torch.bool))
    assert float(v.detach()) == 0.0
    v.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_and_returned_in_float32(dtype):
    s, t = rand(3, 2, 7, seed=46).to(dtype), rand(3, 2, 7, seed=47).to(dtype)
    labels = torch.zeros(3, 2, dtype=torch.long)
    for v in (kd(s, t), kl(s, t), jsd(s, t), skew_kl(s, t), tvd(s, t), dkd(s, t, labels), dist(s, t), ce(s, labels)):
        assert v.dtype == torch.float32
    torch.testing.assert_close(kd(s, t), kd(s.float(), t.float()))


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kd", "kl", "jsd", "skew_kl", "tvd", "dkd"])
def test_shape_mismatch_raises_readable_wiring_error(name):
    fn = PAIR_LOSSES[name]
    with pytest.raises(WiringError) as err:
        fn(torch.randn(4, 10), torch.randn(4, 12))
    msg = str(err.value)
    assert "(4, 10)" in msg and "(4, 12)" in msg and "class counts differ" in msg and "\n" not in msg
    with pytest.raises(WiringError, match=r"\(2, 3, 5\).*\(2, 4, 5\)"):
        fn(torch.randn(2, 3, 5), torch.randn(2, 4, 5))


def test_other_bad_inputs_raise_wiring_error():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    cases = [
        (lambda: kl(torch.randn(5), torch.randn(5)), "(B, C)"),
        (lambda: kl(s, t, mask=torch.ones(4)), "bool"),
        (lambda: kl(s, t, mask=torch.ones(5, dtype=torch.bool)), "mask shape (5,)"),
        (lambda: kl(s, t, reduction="avg"), "reduction"),
        (lambda: kd(s, t, temperature=0.0), "temperature"),
        (lambda: kd(s, t, temperature=float("nan")), "temperature"),
        (lambda: jsd(s, t, beta=1.5), "beta"),
        (lambda: skew_kl(s, t, alpha=-0.1), "alpha"),
        (lambda: dkd(s, t, torch.tensor([0, 1, 2, 5])), "out of range"),
        (lambda: dkd(s, t, torch.tensor([0, 1, 2])), "labels shape (3,)"),
        (lambda: dkd(s, t, torch.zeros(4)), "integer"),
        (lambda: dkd(torch.randn(4, 1), torch.randn(4, 1), torch.zeros(4, dtype=torch.long)), "2 classes"),
        (lambda: ce(s, torch.tensor([0, 1, 2, 7])), "out of range"),
        (lambda: kl(torch.zeros(4, 5, dtype=torch.long), t), "floating point"),
        (lambda: dist(s, t, reduction="avg"), "reduction"),
    ]
    for fn, fragment in cases:
        with pytest.raises(WiringError) as err:
            fn()
        assert fragment in str(err.value), (fragment, str(err.value))
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------


def test_registry_names_aliases_and_label_convention():
    expected = {
        "ce", "kd", "kl", "jsd", "skew_kl", "tvd", "dkd", "dist", "hint", "attention_transfer", "at",
        "rkd_distance", "rkd_angle", "similarity_preserving", "sp", "pkt", "correlation_congruence", "cc",
    }
    assert expected <= set(loss_names())
    assert get_loss("at") is get_loss("attention_transfer")
    assert get_loss("sp") is get_loss("similarity_preserving")
    assert get_loss("cc") is get_loss("correlation_congruence")
    assert [n for n in loss_names() if get_loss(n).module is not None] == ["adversarial", "crd"]
    assert get_loss("crd").module is CRDLoss
    assert [n for n in loss_names() if get_loss(n).needs_labels] == ["ce", "dkd"]
    assert [n for n in loss_names() if get_loss(n).sparse] == ["jsd", "kd", "kl", "skew_kl", "tvd"]
    assert [n for n in loss_names() if get_loss(n).gating] == ["jsd", "kd", "kl", "skew_kl", "tvd"]
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(call_term(get_loss("ce"), s, t, y, {}), ce(s, y))   # label losses ignore the teacher
    assert torch.allclose(call_term(get_loss("dkd"), s, t, y, {}), dkd(s, t, y))
    for name in ("kd", "kl", "jsd", "skew_kl", "tvd", "dist", "hint", "rkd_distance", "rkd_angle", "sp", "pkt", "cc"):
        assert torch.isfinite(call_term(get_loss(name), s, t, None, {}))


def test_unknown_loss_names_the_closest():
    from kdistill.errors import WiringError

    with pytest.raises(WiringError, match="did you mean 'kd'"):
        get_loss("kdd")
