"""Adversarial distillation: the discriminator term against a float64 computation of its definition, its gradient
routing (D learns from L_D only, the student from L_G only), the registry wiring, and boundary samples."""

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.datafree.boundary import BoundaryDistiller, boundary_samples, disagreement
from kdistill.datafree.config import BoundaryConfig
from kdistill.distiller import Distiller, Term
from kdistill.losses import get_loss
from kdistill.losses.adversarial import DiscriminatorLoss


def _softmax(a, temperature):
    e = np.exp((a - a.max(-1, keepdims=True)) / temperature)
    return e / e.sum(-1, keepdims=True)


def _mlp64(loss: DiscriminatorLoss, p):
    """D's logit by an explicit float64 forward of its three linear layers (LeakyReLU 0.2)."""
    ws = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in loss.net
          if isinstance(m, nn.Linear)]
    h = p
    for i, (w, b) in enumerate(ws):
        h = h @ w.T + b
        if i < len(ws) - 1:
            h = np.where(h > 0, h, 0.2 * h)
    return h[:, 0]


def test_discriminator_term_matches_its_definition_in_float64():
    torch.manual_seed(0)
    loss = DiscriminatorLoss(5, 5, hidden=7, temperature=2.0, disc_weight=0.5)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    value = loss(s, t)
    p_s, p_t = _softmax(s.double().numpy(), 2.0), _softmax(t.double().numpy(), 2.0)
    d_s, d_t = _mlp64(loss, p_s), _mlp64(loss, p_t)
    log_sig = lambda z: -np.log1p(np.exp(-z))  # noqa: E731
    loss_d = -np.mean(log_sig(d_t)) - np.mean(np.log1p(-1 / (1 + np.exp(-d_s))))
    loss_g = -np.mean(log_sig(d_s))
    assert float(value.detach()) == pytest.approx(loss_g + 0.5 * loss_d, rel=1e-5)
    assert float(loss.last["discriminator"]) == pytest.approx(loss_d, rel=1e-5)
    assert float(loss.last["generator"]) == pytest.approx(loss_g, rel=1e-5)


def test_discriminator_gets_only_its_loss_and_the_student_only_the_generator_loss():
    torch.manual_seed(1)
    loss = DiscriminatorLoss(4, 4, hidden=8)
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 4, requires_grad=True)
    loss(s, t).backward()
    grads_d = [p.grad.clone() for p in loss.parameters()]
    # reference: L_D alone for the discriminator's weights, L_G alone for the student's logits
    ref = DiscriminatorLoss(4, 4, hidden=8)
    ref.load_state_dict(loss.state_dict())
    s2 = s.detach().clone().requires_grad_(True)
    p_s, p_t = torch.softmax(s2, -1), torch.softmax(t.detach(), -1)
    bce = nn.functional.binary_cross_entropy_with_logits
    d_t, d_s = ref.net(p_t).squeeze(-1), ref.net(p_s.detach()).squeeze(-1)
    (bce(d_t, torch.ones(5)) + bce(d_s, torch.zeros(5))).backward()
    for got, want in zip(grads_d, [p.grad for p in ref.parameters()]):
        torch.testing.assert_close(got, want)
    ref.zero_grad()
    bce(ref.net(p_s).squeeze(-1), torch.ones(5)).backward()
    torch.testing.assert_close(s.grad, s2.grad)
    assert t.grad is None or float(t.grad.abs().sum()) == 0.0  # the teacher gets nothing


def test_adversarial_term_trains_through_the_distiller():
    spec = get_loss("adversarial")
    assert spec.module is DiscriminatorLoss and spec.needs_teacher
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    objective = Distiller(student, teacher, [Term("kd", "kd"), Term("adv", "adversarial", 0.5, params={"hidden": 8})])
    batch = {"x": torch.randn(8, 4)}
    objective.build(batch)
    assert isinstance(objective.side.loss_modules["adv"], DiscriminatorLoss)
    params = list(objective.side.parameters())
    assert any(p is objective.side.loss_modules["adv"].net[0].weight for p in params)  # D trains with the side
    out = objective(batch)
    assert set(out.terms) == {"kd", "adv"} and torch.isfinite(out.loss)
    out.loss.backward()
    assert student.weight.grad is not None and objective.side.loss_modules["adv"].net[0].weight.grad is not None


def test_boundary_samples_increase_disagreement_within_the_ball():
    torch.manual_seed(0)
    teacher, student = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)), nn.Linear(6, 4)
    x = torch.rand(32, 6)
    before = disagreement(teacher(x), student(x)).detach()
    adv = boundary_samples(teacher, student, x, steps=5, step_size=0.05, epsilon=0.2, clamp=(0.0, 1.0))
    after = disagreement(teacher(adv), student(adv)).detach()
    assert float(after.mean()) > float(before.mean())
    assert float((adv - x).abs().max()) <= 0.2 + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert all(p.grad is None for p in list(teacher.parameters()) + list(student.parameters()))
    # the disagreement is KL(p_t || p_s), checked in float64
    t, s = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    p, q = _softmax(t.numpy(), 2.0), _softmax(s.numpy(), 2.0)
    np.testing.assert_allclose(disagreement(t, s, 2.0).numpy(), (p * np.log(p / q)).sum(-1), rtol=1e-12)


def test_boundary_distiller_adds_unlabelled_copies_to_every_batch():
    torch.manual_seed(0)
    teacher, student = nn.Linear(6, 3), nn.Linear(6, 3)
    objective = BoundaryDistiller(student, teacher, [Term("ce", "ce", 0.5), Term("kd", "kd")], teacher_model=teacher,
                                  boundary=BoundaryConfig(fraction=0.5, steps=2))
    batch = {"x": torch.randn(8, 6), "y": torch.randint(0, 3, (8,)), "index": torch.arange(8)}
    grown = objective.with_boundary(batch)
    assert grown["x"].shape == (12, 6) and grown["y"][8:].eq(-100).all() and torch.equal(grown["x"][:8], batch["x"])
    objective.build(batch)
    out = objective(batch)
    assert out.output.shape == (12, 3) and torch.isfinite(out.loss)
