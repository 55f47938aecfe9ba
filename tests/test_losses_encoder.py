"""Encoder losses (kdistill.losses.encoder) against float64 references written with Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill.errors import WiringError
from kdistill.losses import get_loss, is_registered
from kdistill.losses.encoder import (
    attention_kl,
    attention_mse,
    attention_probabilities,
    embedding_cosine,
    embedding_mse,
    hidden_cosine,
    hidden_mse,
    self_relation,
    similarity_matrix,
)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def padded_mask():
    """(B=3, T=5): lengths 5, 3, 1."""
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for b, n in enumerate((5, 3, 1)):
        mask[b, :n] = True
    return mask


def softmax_rows(scores):
    """Reference softmax of a list of floats."""
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def ref_attention(q, k, heads, mask):
    """Nested lists [b][h][i][j] of softmax(q_h k_h^T / sqrt(d)) over the valid keys of sample b (0 elsewhere)."""
    b_, t_, d = q.shape
    dk = d // heads
    out = []
    for b in range(b_):
        keys = [j for j in range(t_) if mask[b, j]]
        per_head = []
        for h in range(heads):
            rows = []
            for i in range(t_):
                scores = [sum(float(q[b, i, h * dk + c]) * float(k[b, j, h * dk + c]) for c in range(dk)) / math.sqrt(dk)
                          for j in keys]
                probs = softmax_rows(scores)
                row = [0.0] * t_
                for j, p in zip(keys, probs):
                    row[j] = p
                rows.append(row)
            per_head.append(rows)
        out.append(per_head)
    return out


def ref_kl_rows(p_maps, q_maps, mask):
    """Mean over (valid query rows, heads) of KL(p_row || q_row)."""
    total, count = 0.0, 0
    for b in range(len(p_maps)):
        for i in range(len(p_maps[b][0])):
            if not mask[b, i]:
                continue
            for h in range(len(p_maps[b])):
                total += sum(p * math.log(p / q) for p, q in zip(p_maps[b][h][i], q_maps[b][h][i]) if p > 0) \
                    / len(p_maps[b])
            count += 1
    return total / count


def test_hidden_mse_matches_masked_reference():
    s, t, mask = rand(3, 5, 4, seed=1), rand(3, 5, 4, seed=2), padded_mask()
    total, n = 0.0, 0
    for b in range(3):
        for i in range(5):
            if mask[b, i]:
                total += sum((float(s[b, i, d]) - float(t[b, i, d])) ** 2 for d in range(4)) / 4
                n += 1
    assert hidden_mse(s, t, mask=mask).item() == pytest.approx(total / n, rel=1e-12)
    assert hidden_mse(s, t).item() == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-12)


def test_hidden_cosine_matches_reference_and_ignores_padding():
    s, t, mask = rand(3, 5, 4, seed=3), rand(3, 5, 4, seed=4), padded_mask()
    values = []
    for b in range(3):
        for i in range(5):
            if mask[b, i]:
                u, v = s[b, i].tolist(), t[b, i].tolist()
                dot = sum(a * c for a, c in zip(u, v))
                values.append(1 - dot / math.sqrt(sum(a * a for a in u) * sum(c * c for c in v)))
    assert hidden_cosine(s, t, mask=mask).item() == pytest.approx(sum(values) / len(values), rel=1e-10)
    garbage = s.clone()
    garbage[~mask] = 1e6
    assert hidden_cosine(garbage, t, mask=mask).item() == pytest.approx(hidden_cosine(s, t, mask=mask).item())
    # scale-invariant: only directions count
    assert hidden_cosine(3.0 * s, t, mask=mask).item() == pytest.approx(hidden_cosine(s, t, mask=mask).item())


def test_attention_probabilities_match_reference():
    q, k, mask = rand(3, 5, 6, seed=5), rand(3, 5, 6, seed=6), padded_mask()
    got = attention_probabilities(q, k, 2, mask)
    assert got.shape == (3, 2, 5, 5)
    assert torch.allclose(got, torch.tensor(ref_attention(q, k, 2, mask), dtype=torch.float64), atol=1e-12)
    assert torch.all(got[~mask[:, None, None, :].expand_as(got)] == 0)


def test_attention_kl_matches_minilm_reference():
    mask = padded_mask()
    teacher = attention_probabilities(rand(3, 5, 6, seed=7), rand(3, 5, 6, seed=8), 2, mask)
    student = attention_probabilities(rand(3, 5, 6, seed=9), rand(3, 5, 6, seed=10), 2, mask)
    expected = ref_kl_rows(teacher.tolist(), student.tolist(), mask)
    assert attention_kl(student, teacher, mask=mask).item() == pytest.approx(expected, rel=1e-10)
    assert attention_kl(teacher, teacher, mask=mask).item() == pytest.approx(0.0, abs=1e-14)


def test_attention_kl_gradient_is_finite_with_padding():
    mask = padded_mask()
    q = rand(3, 5, 6, seed=11).requires_grad_()
    student = attention_probabilities(q, rand(3, 5, 6, seed=12), 2, mask)
    teacher = attention_probabilities(rand(3, 5, 6, seed=13), rand(3, 5, 6, seed=14), 2, mask)
    attention_kl(student, teacher, mask=mask).backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_attention_mse_matches_tinybert_reference():
    mask = padded_mask()
    s = attention_probabilities(rand(3, 5, 6, seed=15), rand(3, 5, 6, seed=16), 3, mask)
    t = attention_probabilities(rand(3, 5, 6, seed=17), rand(3, 5, 6, seed=18), 3, mask)
    total, pairs = 0.0, 0
    for b in range(3):
        for i in range(5):
            for j in range(5):
                if mask[b, i] and mask[b, j]:
                    total += sum((float(s[b, h, i, j]) - float(t[b, h, i, j])) ** 2 for h in range(3)) / 3
                    pairs += 1
    assert attention_mse(s, t, mask=mask).item() == pytest.approx(total / pairs, rel=1e-12)


def test_attention_losses_need_equal_heads_unless_averaged():
    s = torch.softmax(rand(2, 2, 4, 4, seed=19), -1)
    t = torch.softmax(rand(2, 4, 4, 4, seed=20), -1)
    with pytest.raises(WiringError, match="head counts differ"):
        attention_kl(s, t)
    averaged = attention_mse(s, t, average_heads=True).item()
    assert averaged == pytest.approx(float(((s.mean(1) - t.mean(1)) ** 2).mean()), rel=1e-12)


def test_self_relation_matches_minilm_reference_across_widths():
    mask = padded_mask()
    v_s, v_t = rand(3, 5, 4, seed=21), rand(3, 5, 8, seed=22)  # widths differ: 2 heads of 2 vs 2 heads of 4
    expected = ref_kl_rows(ref_attention(v_t, v_t, 2, mask), ref_attention(v_s, v_s, 2, mask), mask)
    assert self_relation(v_s, v_t, 2, mask=mask).item() == pytest.approx(expected, rel=1e-10)
    assert self_relation(v_t, v_t, 4, mask=mask).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(WiringError, match="num_heads"):
        self_relation(v_s, v_t, 3)


def test_self_relation_ignores_padded_tokens():
    mask = padded_mask()
    v_s, v_t = rand(3, 5, 4, seed=23), rand(3, 5, 4, seed=24)
    changed = v_s.clone()
    changed[~mask] = 50.0
    assert self_relation(changed, v_t, 2, mask=mask).item() == pytest.approx(
        self_relation(v_s, v_t, 2, mask=mask).item(), rel=1e-12)


def test_similarity_matrix_matches_reference_and_is_width_free():
    s, t = rand(4, 3, seed=25), rand(4, 7, seed=26)

    def cos(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    sl, tl = s.tolist(), t.tolist()
    diffs = [(cos(sl[i], sl[j]) - cos(tl[i], tl[j])) ** 2 for i in range(4) for j in range(4) if i != j]
    assert similarity_matrix(s, t).item() == pytest.approx(sum(diffs) / len(diffs), rel=1e-12)
    rotation, _ = torch.linalg.qr(rand(7, 7, seed=27))
    assert similarity_matrix(t @ rotation, t).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("fn, args", [
    (hidden_mse, (rand(2, 3, 4), rand(2, 3, 5))),
    (hidden_cosine, (rand(2, 3), rand(2, 3))),
    (attention_kl, (rand(2, 2, 3, 4), rand(2, 2, 3, 4))),
    (similarity_matrix, (rand(1, 3), rand(1, 3))),
])
def test_bad_shapes_raise_wiring_errors(fn, args):
    with pytest.raises(WiringError):
        fn(*args)


def test_mask_must_be_bool_of_batch_shape():
    s, t = rand(2, 3, 4), rand(2, 3, 4)
    with pytest.raises(WiringError, match="bool"):
        hidden_mse(s, t, mask=torch.ones(2, 3))
    with pytest.raises(WiringError, match="mask shape"):
        hidden_mse(s, t, mask=torch.ones(3, 2, dtype=torch.bool))


def test_half_inputs_are_upcast():
    s, t = rand(2, 3, 4).half(), rand(2, 3, 4, seed=1).half()
    assert hidden_mse(s, t).dtype == torch.float32


def test_registered_in_the_term_registry():
    for name in ("hidden_mse", "hidden_cosine", "attention_kl", "attention_mse", "self_relation",
                 "similarity_matrix", "embedding_cosine", "embedding_mse", "embedding_layer", "value_relation",
                 "query_relation", "key_relation", "mlm", "simcse"):
        assert is_registered(name)


@pytest.mark.parametrize("name, kind, feature, min_layer, default_layers", [
    ("hidden_mse", "feature", "hidden", 0, "uniform"),        # also a classification tap loss: one spec
    ("hidden_cosine", "feature", "hidden", 0, "uniform"),
    ("embedding_layer", "layer", "hidden", 0, [[0, 0]]),
    ("attention_kl", "feature", "attention", 1, "last-1"),
    ("attention_mse", "feature", "attention", 1, "uniform"),
    ("value_relation", "layer", "value", 1, "last-1"),
    ("query_relation", "layer", "query", 1, "last-1"),
    ("key_relation", "layer", "key", 1, "last-1"),
])
def test_layer_losses_carry_their_feature_and_layer_map_in_the_registry(name, kind, feature, min_layer,
                                                                        default_layers):
    spec = get_loss(name)
    assert (spec.kind, spec.feature, spec.min_layer, spec.default_layers) == (kind, feature, min_layer,
                                                                             default_layers)


def test_embedding_losses_and_the_encoder_loss_list_come_from_the_registry():
    from kdistill.encoders.terms import encoder_loss_names

    for name in ("embedding_cosine", "embedding_mse", "similarity_matrix"):
        assert get_loss(name).kind == "embedding"
    assert get_loss("embedding_cosine").same_shape and not get_loss("similarity_matrix").same_shape
    assert not get_loss("mlm").needs_teacher and not get_loss("mlm").needs_labels  # labels from the masking
    assert not get_loss("simcse").needs_teacher
    names = encoder_loss_names()
    assert {"hidden_mse", "embedding_layer", "value_relation", "kd", "ce", "mlm", "simcse",
            "embedding_cosine", "similarity_matrix"} <= set(names)
    assert "crd" not in names and "hint" not in names and "self_relation" not in names


def test_embedding_cosine_and_mse_match_references():
    s, t = rand(5, 7), rand(5, 7, seed=1)
    cos = torch.nn.functional.cosine_similarity(s.double(), t.double(), dim=1)
    assert embedding_cosine(s, t).item() == pytest.approx((1 - cos).mean().item(), abs=1e-6)
    assert embedding_mse(s, t).item() == pytest.approx(((s.double() - t.double()) ** 2).mean().item(), abs=1e-6)
    with pytest.raises(WiringError, match="embedding_cosine"):
        embedding_cosine(s[0], t[0])
