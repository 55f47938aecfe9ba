"""Feature and relation losses against first-principles float64 references written with Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill.errors import WiringError
from kdistill.losses import (
    attention_transfer,
    correlation_congruence,
    hint,
    pkt,
    rkd_angle,
    rkd_distance,
    similarity_preserving,
)


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def vecs(x: torch.Tensor) -> list[list[float]]:
    return x.reshape(x.shape[0], -1).tolist()


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def norm(u):
    return math.sqrt(dot(u, u))


def unit(u):
    n = norm(u)
    return [0.0 for _ in u] if n == 0 else [a / n for a in u]


def sub(u, v):
    return [a - b for a, b in zip(u, v)]


def huber(x):  # smooth-L1 with beta = 1
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def close(got: torch.Tensor, expected: float, tol: float = 1e-9) -> None:
    assert abs(float(got.detach()) - expected) <= tol * max(1.0, abs(expected)), (float(got), expected)


# ---------------------------------------------------------------------------------------------------------------
# hint
# ---------------------------------------------------------------------------------------------------------------


def test_hint_matches_reference():
    s, t = rand(3, 2, 4, seed=1), rand(3, 2, 4, seed=2)
    flat_s, flat_t = s.flatten().tolist(), t.flatten().tolist()
    n = len(flat_s)
    close(hint(s, t, "mse"), sum((a - b) ** 2 for a, b in zip(flat_s, flat_t)) / n)
    close(hint(s, t, "l1"), sum(abs(a - b) for a, b in zip(flat_s, flat_t)) / n)
    cos = [dot(a, b) / (norm(a) * norm(b)) for a, b in zip(vecs(s), vecs(t))]
    close(hint(s, t, "cosine"), sum(1 - c for c in cos) / len(cos))
    for kind in ("mse", "l1", "cosine"):
        assert float(hint(t, t, kind)) < 1e-12
        assert float(hint(s, t, kind)) >= 0
    # cosine ignores per-sample scale
    close(hint(s * 7.0, t, "cosine"), float(hint(s, t, "cosine")))


def test_hint_shape_mismatch_says_adapter_needed():
    with pytest.raises(WiringError) as err:
        hint(torch.randn(2, 16, 8, 8), torch.randn(2, 32, 8, 8))
    msg = str(err.value)
    assert "(2, 16, 8, 8)" in msg and "(2, 32, 8, 8)" in msg and "adapter" in msg and "\n" not in msg
    with pytest.raises(WiringError, match="kind"):
        hint(torch.randn(2, 3), torch.randn(2, 3), kind="huber")


def test_hint_gradients_and_half_inputs():
    for kind in ("mse", "l1", "cosine"):
        s = rand(4, 6, seed=3).float().requires_grad_()
        t = rand(4, 6, seed=4).float()
        v = hint(s, t, kind)
        v.backward()
        assert torch.isfinite(s.grad).all()
        assert hint(s.detach().half(), t.half(), kind).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# attention transfer
# ---------------------------------------------------------------------------------------------------------------


def at_map_ref(x: torch.Tensor, p: float) -> list[list[float]]:
    """(B, C, *spatial) -> per-sample flattened mean_c |x|^p (not yet normalized)."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1).tolist()
    return [[sum(abs(flat[i][ch][k]) ** p for ch in range(c)) / c for k in range(len(flat[i][0]))] for i in range(b)]


def at_ref_from_maps(ms, mt) -> float:
    total, count = 0.0, 0
    for a, b in zip(ms, mt):
        ua, ub = unit(a), unit(b)
        for x, y in zip(ua, ub):
            total += (x - y) ** 2
            count += 1
    return total / count


def linear_resize_ref(values: list[float], out: int) -> list[float]:
    """1-D linear interpolation with align_corners=False (half-pixel centers, edge clamp)."""
    n = len(values)
    res = []
    for i in range(out):
        src = max((i + 0.5) * n / out - 0.5, 0.0)
        lo = min(int(math.floor(src)), n - 1)
        hi = min(lo + 1, n - 1)
        w = src - lo
        res.append((1 - w) * values[lo] + w * values[hi])
    return res


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_attention_transfer_matches_reference_2d(p):
    s, t = rand(2, 3, 4, 5, seed=5), rand(2, 6, 4, 5, seed=6)  # channel counts differ
    expected = at_ref_from_maps(at_map_ref(s, p), at_map_ref(t, p))
    close(attention_transfer(s, t, p=p), expected)


def test_attention_transfer_resizes_smaller_map_1d():
    s, t = rand(2, 3, 4, seed=7), rand(2, 5, 7, seed=8)
    ms = [linear_resize_ref(m, 7) for m in at_map_ref(s, 2.0)]
    close(attention_transfer(s, t), at_ref_from_maps(ms, at_map_ref(t, 2.0)))
    # symmetric in which side is smaller
    close(attention_transfer(t, s), at_ref_from_maps(at_map_ref(t, 2.0), ms))


def test_attention_transfer_resizes_smaller_map_2d_bilinear():
    s, t = rand(2, 3, 2, 3, seed=9), rand(2, 4, 4, 6, seed=10)
    out = []
    for m in at_map_ref(s, 2.0):  # bilinear = separable linear: rows (W) then columns (H)
        grid = [m[r * 3 : (r + 1) * 3] for r in range(2)]
        grid = [linear_resize_ref(row, 6) for row in grid]
        cols = [linear_resize_ref([grid[r][c] for r in range(2)], 4) for c in range(6)]
        out.append([cols[c][r] for r in range(4) for c in range(6)])
    close(attention_transfer(s, t), at_ref_from_maps(out, at_map_ref(t, 2.0)))


def test_attention_transfer_invariants_and_gradients():
    s, t = rand(2, 3, 4, 4, seed=11), rand(2, 3, 4, 4, seed=12)
    assert float(attention_transfer(t, t)) < 1e-15
    # scale-free and channel-count-free: repeating channels or scaling features changes nothing
    close(attention_transfer(s * 5.0, t), float(attention_transfer(s, t)))
    close(attention_transfer(s.repeat(1, 4, 1, 1), t), float(attention_transfer(s, t)))
    x = s.float().requires_grad_()
    attention_transfer(x, t.float()).backward()
    assert torch.isfinite(x.grad).all()
    z = torch.zeros(2, 3, 4, 4, requires_grad=True)  # all-zero map: normalize must not produce NaN
    attention_transfer(z, t.float()).backward()
    assert torch.isfinite(z.grad).all()


def test_attention_transfer_errors():
    with pytest.raises(WiringError, match=r"\(2, 3\)"):
        attention_transfer(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(WiringError, match="spatial"):
        attention_transfer(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 16))
    with pytest.raises(WiringError, match="batch sizes differ"):
        attention_transfer(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))
    with pytest.raises(WiringError, match="p must be"):
        attention_transfer(torch.randn(2, 3, 4), torch.randn(2, 3, 4), p=0)


# ---------------------------------------------------------------------------------------------------------------
# RKD
# ---------------------------------------------------------------------------------------------------------------


def rkd_distance_ref(s: torch.Tensor, t: torch.Tensor) -> float:
    def normalized(e):
        b = len(e)
        d = [[norm(sub(e[i], e[j])) for j in range(b)] for i in range(b)]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[v / mu for v in row] for row in d]

    ds, dt = normalized(vecs(s)), normalized(vecs(t))
    b = len(ds)
    return sum(huber(ds[i][j] - dt[i][j]) for i in range(b) for j in range(b)) / (b * b)


def rkd_angle_ref(s: torch.Tensor, t: torch.Tensor) -> float:
    es, et = vecs(s), vecs(t)
    b = len(es)
    total = 0.0
    for i in range(b):
        for j in range(b):
            for k in range(b):
                cs = dot(unit(sub(es[j], es[i])), unit(sub(es[k], es[i])))
                ct = dot(unit(sub(et[j], et[i])), unit(sub(et[k], et[i])))
                total += huber(cs - ct)
    return total / b**3


def test_rkd_distance_matches_reference():
    s, t = rand(5, 4, seed=13), rand(5, 7, seed=14, scale=3.0)  # embedding dims differ
    close(rkd_distance(s, t), rkd_distance_ref(s, t))
    # large relative differences exercise the linear branch of the Huber loss
    s2 = torch.cat([rand(4, 3, seed=15), rand(1, 3, seed=16) * 40])
    t2 = rand(5, 3, seed=17)
    close(rkd_distance(s2, t2), rkd_distance_ref(s2, t2))
    assert rkd_distance_ref(s2, t2) > 0.1


def test_rkd_angle_matches_triple_loop_reference():
    s, t = rand(5, 4, seed=18), rand(5, 6, seed=19)
    close(rkd_angle(s, t), rkd_angle_ref(s, t))
    s4 = rand(2, 2, 3, seed=20)  # (B, *) is flattened
    t4 = rand(2, 6, seed=21)
    close(rkd_angle(s4, t4), rkd_angle_ref(s4, t4))


def test_rkd_invariances_and_gradients():
    s, t = rand(6, 5, seed=22), rand(6, 3, seed=23)
    q, _ = torch.linalg.qr(rand(5, 5, seed=24))  # rotation
    moved = (s @ q) * 3.0 + rand(1, 5, seed=25)
    for fn in (rkd_distance, rkd_angle):
        assert float(fn(t, t)) < 1e-20
        assert float(fn(s, t)) > 0
        close(fn(moved, t), float(fn(s, t)), tol=1e-9)
    # duplicates in the batch (collapsed embeddings) keep finite gradients
    dup = torch.cat([rand(1, 5, seed=26).repeat(3, 1), rand(3, 5, seed=27)]).float().requires_grad_()
    teacher = rand(6, 3, seed=28).float()  # no requires_grad needed on the teacher
    (rkd_distance(dup, teacher) + rkd_angle(dup, teacher)).backward()
    assert torch.isfinite(dup.grad).all()
    same = rand(1, 4, seed=29).float().repeat(4, 1).requires_grad_()  # all identical: zero mean distance
    v = rkd_distance(same, teacher[:4]) + rkd_angle(same, teacher[:4])
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(same.grad).all()


def test_rkd_needs_two_samples_and_matching_batch():
    with pytest.raises(WiringError, match="at least 2"):
        rkd_distance(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(WiringError, match=r"\(4, 8\).*\(5, 8\)"):
        rkd_angle(torch.randn(4, 8), torch.randn(5, 8))


# ---------------------------------------------------------------------------------------------------------------
# similarity preserving, PKT, correlation congruence
# ---------------------------------------------------------------------------------------------------------------


def sp_ref(s, t) -> float:
    def gram(e):
        g = [[dot(a, b) for b in e] for a in e]
        return [unit(row) for row in g]

    gs, gt = gram(vecs(s)), gram(vecs(t))
    b = len(gs)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def pkt_ref(s, t, eps=1e-7) -> float:
    def cond(e):
        e = [[a / (norm(v) + eps) for a in v] for v in e]
        k = [[(dot(a, b) + 1) / 2 for b in e] for a in e]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = cond(vecs(s)), cond(vecs(t))
    b = len(ps)
    total = sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b))
    return total / (b * b)


def cc_ref(s, t, kernel="gaussian", gamma=0.4, order=2) -> float:
    def corr(e):
        e = [unit(v) for v in e]
        out = []
        for a in e:
            row = []
            for b in e:
                x = dot(a, b)
                if kernel == "bilinear":
                    row.append(x)
                else:
                    row.append(sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * x**p
                                   for p in range(order + 1)))
            out.append(row)
        return out

    cs, ct = corr(vecs(s)), corr(vecs(t))
    b = len(cs)
    return sum((cs[i][j] - ct[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_similarity_preserving_matches_reference():
    s, t = rand(4, 3, 2, 2, seed=30), rand(4, 5, seed=31)
    close(similarity_preserving(s, t), sp_ref(s, t))
    assert float(similarity_preserving(t, t)) < 1e-20
    close(similarity_preserving(s * 10.0, t), float(similarity_preserving(s, t)))


def test_pkt_matches_reference_with_authors_mean_convention():
    s, t = rand(5, 6, seed=32), rand(5, 3, seed=33)
    close(pkt(s, t), pkt_ref(s, t))
    close(pkt(s, t, eps=1e-4), pkt_ref(s, t, eps=1e-4))
    # mean over all B*B entries == (1/B) * batch mean of per-anchor KL (eps -> 0)
    def cond_rows(e):
        e = [unit(x) for x in e]
        k = [[(dot(a, b) + 1) / 2 for b in e] for a in e]
        return [[x / sum(row) for x in row] for row in k]

    ps, pt = cond_rows(vecs(s)), cond_rows(vecs(t))
    kl_per_anchor = [sum(a * math.log(a / b) for a, b in zip(pt[i], ps[i])) for i in range(5)]
    v = float(pkt(s, t, eps=0.0))
    close(torch.tensor(v, dtype=torch.float64), (sum(kl_per_anchor) / 5) / 5)
    assert abs(float(pkt(t, t))) < 1e-12 and v >= 0


@pytest.mark.parametrize("kernel,gamma,order", [("gaussian", 0.4, 2), ("gaussian", 1.0, 5), ("bilinear", 0.4, 2)])
def test_correlation_congruence_matches_reference(kernel, gamma, order):
    s, t = rand(5, 4, seed=34), rand(5, 9, seed=35)
    close(correlation_congruence(s, t, kernel=kernel, gamma=gamma, order=order), cc_ref(s, t, kernel, gamma, order))
    assert float(correlation_congruence(t, t, kernel=kernel)) < 1e-20


def test_correlation_congruence_taylor_converges_to_rbf():
    s, t = rand(4, 6, seed=36), rand(4, 6, seed=37)

    def rbf_loss():
        def k(e):
            e = [unit(v) for v in e]
            return [[math.exp(-0.4 * norm(sub(a, b)) ** 2) for b in e] for a in e]

        ks, kt = k(vecs(s)), k(vecs(t))
        return sum((ks[i][j] - kt[i][j]) ** 2 for i in range(4) for j in range(4)) / 16

    close(correlation_congruence(s, t, gamma=0.4, order=20), rbf_loss(), tol=1e-12)


@pytest.mark.parametrize("fn", [similarity_preserving, pkt, correlation_congruence])
def test_relation_gradients_finite_with_zero_rows(fn):
    s = rand(5, 6, seed=38).float()
    s[2] = 0.0
    s.requires_grad_()
    t = rand(5, 4, seed=39).float()
    v = fn(s, t)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(s.grad).all()
    assert fn(s.detach().half(), t.half()).dtype == torch.float32


def test_relation_errors():
    for fn in (similarity_preserving, pkt, correlation_congruence):
        with pytest.raises(WiringError, match="batch sizes differ"):
            fn(torch.randn(3, 4), torch.randn(4, 4))
        with pytest.raises(WiringError, match=r"\(4,\)"):
            fn(torch.randn(4), torch.randn(4))
    with pytest.raises(WiringError, match="kernel"):
        correlation_congruence(torch.randn(3, 4), torch.randn(3, 4), kernel="laplace")
    with pytest.raises(WiringError, match="gamma"):
        correlation_congruence(torch.randn(3, 4), torch.randn(3, 4), gamma=0.0)
    with pytest.raises(WiringError, match="order"):
        correlation_congruence(torch.randn(3, 4), torch.randn(3, 4), order=1.5)
    with pytest.raises(WiringError, match="floating point"):
        pkt(torch.ones(3, 4, dtype=torch.long), torch.randn(3, 4))
