"""CRDLoss: InfoNCE value against an explicit reference, queue mechanics, checkpointing, and learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdistill.errors import WiringError
from kdistill.losses import CRDLoss


def rand(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def info_nce_ref(anchors, positives, queue, in_batch, tau) -> float:
    """-1/B sum_i log softmax over {positive_i} u negatives, with plain Python loops."""
    a, p, q = anchors.tolist(), positives.tolist(), queue.tolist()
    total = 0.0
    for i, ai in enumerate(a):
        pos = sum(x * y for x, y in zip(ai, p[i])) / tau
        logits = [pos]
        if in_batch:
            logits += [sum(x * y for x, y in zip(ai, p[j])) / tau for j in range(len(p)) if j != i]
        logits += [sum(x * y for x, y in zip(ai, qk)) / tau for qk in q]
        m = max(logits)
        total += -(pos - m - math.log(sum(math.exp(v - m) for v in logits)))
    return total / len(a)


def embeddings(crd: CRDLoss, f_s, f_t):
    with torch.no_grad():
        v_s = F.normalize(f_s.flatten(1) @ crd.embed_student.weight.t() + crd.embed_student.bias, dim=1)
        v_t = F.normalize(f_t.flatten(1) @ crd.embed_teacher.weight.t() + crd.embed_teacher.bias, dim=1)
    return v_s, v_t


@pytest.mark.parametrize("in_batch,symmetric", [(True, True), (False, True), (True, False), (False, False)])
def test_loss_matches_explicit_info_nce(in_batch, symmetric):
    torch.manual_seed(0)
    crd = CRDLoss(6, 5, embed_dim=4, queue_size=7, temperature=0.2, in_batch_negatives=in_batch,
                  symmetric=symmetric).double()
    f_s, f_t = rand(4, 6, seed=1, dtype=torch.float64), rand(4, 5, seed=2, dtype=torch.float64)
    # step 1: empty queue (only in-batch negatives, if any)
    empty = torch.zeros(0, 4, dtype=torch.float64)
    v_s, v_t = embeddings(crd, f_s, f_t)
    expected = info_nce_ref(v_s, v_t, empty, in_batch, 0.2)
    if symmetric:
        expected = 0.5 * (expected + info_nce_ref(v_t, v_s, empty, in_batch, 0.2))
    assert abs(float(crd(f_s, f_t).detach()) - expected) < 1e-10
    assert int(crd.queue_count) == 4
    # step 2: the queue now holds step 1's key embeddings (4 of 7 slots filled)
    g_s, g_t = rand(4, 6, seed=3, dtype=torch.float64), rand(4, 5, seed=4, dtype=torch.float64)
    q_t, q_s = crd.queue_teacher[:4].clone(), crd.queue_student[:4].clone()
    v_s, v_t = embeddings(crd, g_s, g_t)
    expected = info_nce_ref(v_s, v_t, q_t, in_batch, 0.2)
    if symmetric:
        expected = 0.5 * (expected + info_nce_ref(v_t, v_s, q_s, in_batch, 0.2))
    assert abs(float(crd(g_s, g_t).detach()) - expected) < 1e-10


def test_queue_is_fixed_size_fifo_and_only_updated_in_training():
    crd = CRDLoss(8, 3, embed_dim=4, queue_size=10, momentum=0.0)
    sizes = set()
    for step in range(25):
        crd(rand(3, 8, seed=step), rand(3, 3, seed=100 + step))
        sizes.add(tuple(crd.queue_teacher.shape))
        assert int(crd.queue_count) == min(3 * (step + 1), 10)
        assert int(crd.queue_ptr) == (3 * (step + 1)) % 10
    assert sizes == {(10, 4)} and crd.queue_student.shape == (10, 4)
    # with momentum=0 the last written entries are exactly the current teacher-head embeddings (FIFO order)
    f_s, f_t = rand(3, 8, seed=7), rand(3, 3, seed=8)
    ptr = int(crd.queue_ptr)
    crd(f_s, f_t)
    _, v_t = embeddings(crd, f_s, f_t)
    idx = [(ptr + k) % 10 for k in range(3)]
    torch.testing.assert_close(crd.queue_teacher[idx], v_t)
    norms = crd.queue_teacher.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(10))
    # eval mode reads the queue but never writes it
    crd.eval()
    before = crd.queue_teacher.clone(), int(crd.queue_ptr), int(crd.queue_count)
    crd(rand(3, 8, seed=9), rand(3, 3, seed=10))
    assert torch.equal(crd.queue_teacher, before[0]) and int(crd.queue_ptr) == before[1]
    assert int(crd.queue_count) == before[2]


def test_batch_larger_than_queue_keeps_last_entries():
    crd = CRDLoss(4, 4, embed_dim=3, queue_size=5, momentum=0.0)
    f_s, f_t = rand(8, 4, seed=11), rand(8, 4, seed=12)
    crd(f_s, f_t)
    assert int(crd.queue_count) == 5 and crd.queue_teacher.shape == (5, 3)
    _, v_t = embeddings(crd, f_s, f_t)
    assert {tuple(r) for r in crd.queue_teacher.round(decimals=5).tolist()} == {
        tuple(r) for r in v_t[-5:].round(decimals=5).tolist()
    }


def test_queue_in_state_dict_and_restored():
    crd = CRDLoss(6, 4, embed_dim=4, queue_size=8)
    for step in range(5):
        crd(rand(3, 6, seed=step), rand(3, 4, seed=50 + step))
    state = crd.state_dict()
    for key in ("queue_teacher", "queue_student", "queue_ptr", "queue_count"):
        assert key in state
    restored = CRDLoss(6, 4, embed_dim=4, queue_size=8)
    restored.load_state_dict(state)
    assert torch.equal(restored.queue_teacher, crd.queue_teacher)
    assert int(restored.queue_ptr) == int(crd.queue_ptr) and int(restored.queue_count) == 8
    crd.eval()
    restored.eval()
    f_s, f_t = rand(3, 6, seed=60), rand(3, 4, seed=61)
    torch.testing.assert_close(restored(f_s, f_t), crd(f_s, f_t))
    # queue buffers are not parameters: an optimizer never touches them
    names = {n for n, p in crd.named_parameters() if p.requires_grad}
    assert names == {"embed_student.weight", "embed_student.bias", "embed_teacher.weight", "embed_teacher.bias"}


def test_gradients_reach_both_heads_and_student_features():
    crd = CRDLoss(6, 4, embed_dim=4, queue_size=8)
    crd(rand(5, 6, seed=19), rand(5, 4, seed=18))  # a non-empty queue that the next call overwrites in place
    f_s = rand(5, 2, 3, seed=20).requires_grad_()  # (B, *) features are flattened
    f_t = rand(5, 4, seed=21)  # teacher features need no grad
    crd(f_s, f_t).backward()
    assert torch.isfinite(f_s.grad).all() and f_s.grad.abs().sum() > 0
    assert crd.embed_student.weight.grad is not None and crd.embed_teacher.weight.grad is not None
    assert crd.key_student.weight.grad is None


def test_loss_decreases_when_student_learns_fixed_teacher():
    torch.manual_seed(0)
    n, d_s, d_t = 32, 6, 10
    teacher = rand(n, d_t, seed=30)
    student = torch.nn.Parameter(rand(n, d_s, seed=31))
    crd = CRDLoss(d_s, d_t, embed_dim=8, queue_size=64, temperature=0.1)
    opt = torch.optim.Adam([student, *crd.parameters()], lr=0.05)
    gen = torch.Generator().manual_seed(32)

    def eval_loss() -> float:
        crd.eval()
        with torch.no_grad():
            value = float(crd(student, teacher))
        crd.train()
        return value

    before = eval_loss()
    for _ in range(60):
        idx = torch.randperm(n, generator=gen)[:8]
        loss = crd(student[idx], teacher[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)
    # student embeddings now retrieve their own teacher embedding
    with torch.no_grad():
        v_s = F.normalize(crd.embed_student(student), dim=1)
        v_t = F.normalize(crd.embed_teacher(teacher), dim=1)
    accuracy = float(((v_s @ v_t.t()).argmax(dim=1) == torch.arange(n)).float().mean())
    assert accuracy > 0.6  # chance is 1/32


def test_errors_are_wiring_errors():
    crd = CRDLoss(6, 4)
    with pytest.raises(WiringError) as err:
        crd(torch.randn(2, 7), torch.randn(2, 4))
    msg = str(err.value)
    assert "(2, 7)" in msg and "student_dim=7" in msg and "\n" not in msg
    with pytest.raises(WiringError, match="teacher_dim=5"):
        crd(torch.randn(2, 6), torch.randn(2, 5))
    with pytest.raises(WiringError, match="batch sizes differ"):
        crd(torch.randn(2, 6), torch.randn(3, 4))
    with pytest.raises(WiringError, match=r"\(6,\)"):
        crd(torch.randn(6), torch.randn(2, 4))
    with pytest.raises(WiringError, match="momentum"):
        CRDLoss(6, 4, momentum=1.0)
    with pytest.raises(WiringError, match="temperature"):
        CRDLoss(6, 4, temperature=0)
    with pytest.raises(WiringError, match="no negatives"):
        CRDLoss(6, 4, queue_size=0, in_batch_negatives=False)
