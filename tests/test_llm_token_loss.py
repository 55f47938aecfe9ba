"""Chunked token-level KD loss (`kdistill.losses.lm`): equal to the full-logits reference below and to the
divergence formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from kdistill.errors import WiringError
from kdistill.losses.lm import (DIVERGENCES, divergence_term, head_logits, row_divergence, token_kd_inputs,
                                token_kd_loss)

transformers = pytest.importorskip("transformers")

from kdistill.llm import head_parts  # noqa: E402


def token_kd_loss_reference(student_hidden, student_head, teacher_hidden, teacher_head, labels, *,
                            divergence="forward_kl", beta=0.5, alpha=0.1, temperature=1.0, chunk_size=None,
                            student_softcap=None, teacher_softcap=None, student_logit_scale=1.0,
                            teacher_logit_scale=1.0):
    """Plain version of `token_kd_loss` (same signature and value) that builds the full ``(B, T, V)`` logits of
    both models and lets autograd store everything; for tests and benchmarks. `chunk_size` is ignored."""
    w_s, b_s, w_t, b_t = token_kd_inputs(student_hidden, student_head, teacher_hidden, teacher_head, labels)
    fn = row_divergence(*divergence_term(divergence, beta=beta, alpha=alpha, temperature=temperature))
    z_s = head_logits(F.linear(student_hidden, w_s, b_s), student_logit_scale, student_softcap)
    with torch.no_grad():
        z_t = head_logits(F.linear(teacher_hidden, w_t, b_t), teacher_logit_scale, teacher_softcap)
    valid = labels.to(z_s.device) != -100
    if not bool(valid.any()):
        return student_hidden.reshape(-1)[:0].sum().float() + w_s.reshape(-1)[:0].sum().float()
    return fn(z_s[valid], z_t[valid]) / valid.sum()

B, T, H_S, H_T, V = 3, 7, 12, 20, 37


def _inputs(seed: int = 0, *, ignore_some: bool = True, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(B, T, H_S, generator=gen).requires_grad_(True)
    teacher_hidden = torch.randn(B, T, H_T, generator=gen)
    student_head = nn.Linear(H_S, V, bias=bias)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(V, H_S, generator=gen) * 0.5)
        if bias:
            student_head.bias.copy_(torch.randn(V, generator=gen))
    teacher_weight = torch.randn(V, H_T, generator=gen) * 0.5
    labels = torch.randint(0, V, (B, T), generator=gen)
    if ignore_some:
        labels[0, :3] = -100  # 21 - 4 = 17 valid rows: no chunk size below divides it except 1 and 17
        labels[2, -1] = -100
    return student_hidden, student_head, teacher_hidden, teacher_weight, labels


def _student_params(student_hidden, student_head):
    return [student_hidden, student_head.weight] + ([student_head.bias] if student_head.bias is not None else [])


def _loss_and_grads(fn, inputs, **kwargs):
    student_hidden, student_head, teacher_hidden, teacher_weight, labels = inputs
    loss = fn(student_hidden, student_head, teacher_hidden, teacher_weight, labels, **kwargs)
    grads = torch.autograd.grad(loss, _student_params(student_hidden, student_head))
    return loss.detach(), grads


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 1024])
def test_chunked_equals_reference_values_and_gradients(divergence, chunk_size):
    inputs = _inputs()
    kwargs = dict(divergence=divergence, beta=0.3, alpha=0.2, temperature=1.7)
    loss, grads = _loss_and_grads(token_kd_loss, inputs, chunk_size=chunk_size, **kwargs)
    ref_loss, ref_grads = _loss_and_grads(token_kd_loss_reference, inputs, **kwargs)
    assert loss > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-7)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert grad.abs().max() > 0
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-7)


def _explicit_per_row(divergence, z_s, z_t, *, beta, alpha, temperature):
    """Float64 per-row divergences written straight from their definitions (P teacher, Q student)."""
    p = torch.softmax(z_t.double() / temperature, -1)
    q = torch.softmax(z_s.double() / temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if divergence == "forward_kl":
        return kl(p, q)
    if divergence == "reverse_kl":
        return kl(q, p)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if divergence == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if divergence == "skew_reverse_kl":
        return kl(q, alpha * q + (1 - alpha) * p)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(divergence)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_value_matches_the_divergence_definition_in_float64(divergence):
    student_hidden, student_head, teacher_hidden, teacher_weight, labels = _inputs(1)
    beta, alpha, temperature = 0.3, 0.2, 2.0
    loss = token_kd_loss(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_weight,
        labels,
        divergence=divergence,
        beta=beta,
        alpha=alpha,
        temperature=temperature,
        chunk_size=4,
    )
    valid = labels != -100
    z_s = student_head(student_hidden).detach().double()
    z_t = teacher_hidden.double() @ teacher_weight.double().T
    expected = _explicit_per_row(divergence, z_s[valid], z_t[valid], beta=beta, alpha=alpha, temperature=temperature)
    torch.testing.assert_close(loss.double(), expected.mean(), rtol=1e-4, atol=1e-8)


def test_jsd_endpoints_are_the_two_kl_directions():
    inputs = _inputs(2)
    forward, _ = _loss_and_grads(token_kd_loss, inputs, divergence="forward_kl", chunk_size=3)
    reverse, _ = _loss_and_grads(token_kd_loss, inputs, divergence="reverse_kl", chunk_size=3)
    jsd0, _ = _loss_and_grads(token_kd_loss, inputs, divergence="jsd", beta=0.0, chunk_size=3)
    jsd1, _ = _loss_and_grads(token_kd_loss, inputs, divergence="jsd", beta=1.0, chunk_size=3)
    torch.testing.assert_close(jsd0, forward)
    torch.testing.assert_close(jsd1, reverse)
    assert not torch.allclose(forward, reverse)


def test_all_labels_ignored_gives_zero_with_zero_gradients():
    student_hidden, student_head, teacher_hidden, teacher_weight, labels = _inputs()
    labels = torch.full_like(labels, -100)
    for fn in (token_kd_loss, token_kd_loss_reference):
        loss = fn(student_hidden, student_head, teacher_hidden, teacher_weight, labels)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.count_nonzero(student_hidden.grad) == 0
        assert torch.count_nonzero(student_head.weight.grad) == 0
        student_hidden.grad = None
        student_head.zero_grad()


def test_softcap_and_logit_scale_are_applied_before_the_divergence():
    student_hidden, student_head, teacher_hidden, teacher_weight, labels = _inputs(3)
    cap_s, cap_t, scale_s, scale_t = 1.5, 2.5, 0.8, 1.3
    kwargs = dict(
        student_softcap=cap_s, teacher_softcap=cap_t, student_logit_scale=scale_s, teacher_logit_scale=scale_t
    )
    loss = token_kd_loss(student_hidden, student_head, teacher_hidden, teacher_weight, labels, chunk_size=5, **kwargs)
    valid = labels != -100
    z_s = cap_s * torch.tanh(scale_s * student_head(student_hidden.detach()).double() / cap_s)
    z_t = cap_t * torch.tanh(scale_t * (teacher_hidden @ teacher_weight.T).double() / cap_t)
    expected = _explicit_per_row("forward_kl", z_s[valid], z_t[valid], beta=0.5, alpha=0.1, temperature=1.0)
    torch.testing.assert_close(loss.double(), expected.mean(), rtol=1e-4, atol=1e-8)
    uncapped = token_kd_loss(student_hidden, student_head, teacher_hidden, teacher_weight, labels)
    assert abs(uncapped.item() - loss.item()) > 1e-3
    loss_c, grads_c = _loss_and_grads(
        token_kd_loss, (student_hidden, student_head, teacher_hidden, teacher_weight, labels), chunk_size=4, **kwargs
    )
    loss_r, grads_r = _loss_and_grads(
        token_kd_loss_reference, (student_hidden, student_head, teacher_hidden, teacher_weight, labels), **kwargs
    )
    torch.testing.assert_close(loss_c, loss_r, rtol=1e-4, atol=1e-7)
    for grad, ref in zip(grads_c, grads_r, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-7)


def test_weight_tensor_head_without_bias_and_upstream_gradient_scaling():
    student_hidden, student_head, teacher_hidden, teacher_weight, labels = _inputs(4, bias=False)
    weight = student_head.weight
    (3.0 * token_kd_loss(student_hidden, weight, teacher_hidden, teacher_weight, labels, chunk_size=2)).backward()
    chunked = (student_hidden.grad.clone(), weight.grad.clone())
    student_hidden.grad, weight.grad = None, None
    (3.0 * token_kd_loss_reference(student_hidden, weight, teacher_hidden, teacher_weight, labels)).backward()
    torch.testing.assert_close(chunked[0], student_hidden.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(chunked[1], weight.grad, rtol=1e-4, atol=1e-7)


def test_teacher_gets_no_gradient_and_no_grad_path_gives_the_same_value():
    student_hidden, student_head, teacher_hidden, teacher_weight, labels = _inputs(5)
    teacher_hidden.requires_grad_(True)
    teacher_weight.requires_grad_(True)
    loss = token_kd_loss(student_hidden, student_head, teacher_hidden, teacher_weight, labels, chunk_size=3)
    loss.backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None
    assert student_hidden.grad is not None
    with torch.no_grad():
        no_grad = token_kd_loss(student_hidden, student_head, teacher_hidden, teacher_weight, labels, chunk_size=3)
    assert not no_grad.requires_grad
    torch.testing.assert_close(no_grad, loss.detach())


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_full_logits_tensor_in_forward_or_backward():
    n, hidden, vocab, chunk = 64, 8, 500, 16
    student_hidden = torch.randn(1, n, hidden, requires_grad=True)
    student_weight = torch.randn(vocab, hidden, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(1, n, hidden), torch.randn(vocab, hidden)
    labels = torch.zeros(1, n, dtype=torch.long)
    sizes = {}
    for name, fn in (("chunked", token_kd_loss), ("reference", token_kd_loss_reference)):
        with _LargestTensor() as mode:
            fn(
                student_hidden,
                student_weight,
                teacher_hidden,
                teacher_weight,
                labels,
                chunk_size=chunk,
                divergence="jsd",
            ).backward()
        sizes[name] = mode.largest
    assert sizes["chunked"] <= chunk * vocab
    assert sizes["reference"] >= n * vocab  # the check can fail: the reference does build (N, V)


def test_mismatched_vocabulary_is_refused_with_both_sizes():
    student_hidden, student_head, teacher_hidden, _, labels = _inputs()
    teacher_weight = torch.randn(V + 3, H_T)
    with pytest.raises(WiringError, match=rf"{V}.*{V + 3}.*sequence-level"):
        token_kd_loss(student_hidden, student_head, teacher_hidden, teacher_weight, labels)
    with pytest.raises(WiringError, match=rf"{V}.*{V + 3}"):
        token_kd_loss_reference(student_hidden, student_head, teacher_hidden, teacher_weight, labels)


def test_bad_arguments_are_refused():
    student_hidden, student_head, teacher_hidden, teacher_weight, labels = _inputs()
    with pytest.raises(WiringError, match="unknown divergence"):
        token_kd_loss(student_hidden, student_head, teacher_hidden, teacher_weight, labels, divergence="kl")
    with pytest.raises(WiringError, match="head expects"):
        token_kd_loss(teacher_hidden, student_head, teacher_hidden, teacher_weight, labels)
    with pytest.raises(WiringError, match="positions differ"):
        token_kd_loss(student_hidden, student_head, teacher_hidden, teacher_weight, labels[:, :-1])
    with pytest.raises(WiringError, match="chunk_size"):
        token_kd_loss(student_hidden, student_head, teacher_hidden, teacher_weight, labels, chunk_size=0)
    with pytest.raises(WiringError, match="student_softcap"):
        token_kd_loss(student_hidden, student_head, teacher_hidden, teacher_weight, labels, student_softcap=0.0)


def _tiny(config_cls, model_cls, **extra):
    config = config_cls(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        **extra,
    )
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.mark.parametrize(
    "family, extra, softcap, scale",
    [
        ("Llama", {}, None, 1.0),
        ("Gemma2", {"final_logit_softcapping": 3.0}, 3.0, 1.0),
        ("Cohere", {"logit_scale": 0.25}, None, 0.25),
    ],
)
def test_head_parts_reproduce_the_model_logits(family, extra, softcap, scale):
    model = _tiny(getattr(transformers, f"{family}Config"), getattr(transformers, f"{family}ForCausalLM"), **extra)
    parts = head_parts(model)
    weight, bias, got_softcap, got_scale = parts["weight"], parts["bias"], parts["softcap"], parts["scale"]
    assert (got_softcap, got_scale) == (softcap, pytest.approx(scale))
    input_ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True)
    # KL(model logits || logits rebuilt from the head pieces) = 0, and a shifted teacher gives a positive loss
    hidden = out.hidden_states[-1]
    labels = torch.zeros_like(input_ids)
    kwargs = dict(student_softcap=got_softcap, student_logit_scale=got_scale)
    same = token_kd_loss(
        hidden,
        weight if bias is None else model.get_output_embeddings(),
        hidden,
        weight,
        labels,
        teacher_softcap=got_softcap,
        teacher_logit_scale=got_scale,
        **kwargs,
    )
    assert same.abs().item() < 1e-6
    z = weight.detach() @ hidden[0, 0] * got_scale
    if got_softcap:
        z = got_softcap * torch.tanh(z / got_softcap)
    torch.testing.assert_close(z, out.logits[0, 0], rtol=1e-4, atol=1e-5)
