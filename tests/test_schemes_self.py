"""Defining behaviour of the teacher-less schemes: deep mutual learning, born-again generations, BYOT exits,
progressive self-distillation (snapshot teacher)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from kdistill.config import TrainConfig
from kdistill.engine import Engine
from kdistill.schemes import self_distill
from kdistill.schemes.mutual import MutualObjective, train_mutual
from kdistill.schemes.self_distill import SnapshotObjective, born_again, train_byot

from tests.conftest import blobs, mlp


def cfg(steps=20, batch_size=32, **kw):
    return TrainConfig(steps=steps, batch_size=batch_size, lr=0.01, log_every=10, **kw)


# -- deep mutual learning ----------------------------------------------------------------------------------------
def test_mutual_loss_matches_formula_and_each_peer_learns_only_from_its_own_terms():
    peers = [mlp(0), mlp(1), mlp(2)]
    objective = MutualObjective(peers, temperature=2.0, kl_weight=0.5)
    batch = blobs(16).batch(torch.arange(16))
    objective.build(batch)
    out = objective(batch)
    z = [p(batch["x"]).double() for p in peers]
    for k in range(3):
        kl = sum((p * (p.log() - torch.log_softmax(z[k] / 2, -1))).sum(-1).mean()
                 for p in (torch.softmax(z[i].detach() / 2, -1) for i in range(3) if i != k)) / 2
        assert torch.allclose(out.terms[f"kl_peer{k}"].double(), 0.5 * 4 * kl, rtol=1e-5)
        assert torch.allclose(out.terms[f"ce_peer{k}"].double(), F.cross_entropy(z[k], batch["y"]), rtol=1e-5)
    # peer 0's terms give no gradient to peer 1 (its target is a constant)
    grads = torch.autograd.grad(out.terms["kl_peer0"] + out.terms["ce_peer0"], list(peers[1].parameters()),
                                allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)


def test_dml_updates_every_peer_at_every_step():
    peers = [mlp(0), mlp(1)]
    seen = {0: [], 1: []}
    for k, peer in enumerate(peers):
        peer.register_forward_pre_hook(
            lambda m, args, k=k: seen[k].append(torch.cat([p.detach().flatten() for p in m.parameters()]).clone())
            if m.training else None)
    ensemble = train_mutual(peers, blobs(), cfg(steps=4))
    for k in (0, 1):
        states = seen[k]
        assert len(states) == 4                                        # one training forward per step
        assert all(not torch.equal(a, b) for a, b in zip(states, states[1:]))
        final = torch.cat([p.detach().flatten() for p in peers[k].parameters()])
        assert not torch.equal(states[-1], final)                      # the last step too
    x = blobs().tensors["x"][:8]
    with torch.no_grad():
        mean_prob = (torch.softmax(peers[0](x), -1) + torch.softmax(peers[1](x), -1)) / 2
        assert torch.allclose(ensemble(x).exp(), mean_prob, atol=1e-6)


# -- born-again networks -----------------------------------------------------------------------------------------
def test_born_again_generation_k_learns_from_frozen_generation_k_minus_1(monkeypatch):
    rounds = []
    real = self_distill.distill

    def spy(name, student, teacher, *args, **kwargs):
        before = copy.deepcopy(teacher.state_dict())
        frozen = not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        out = real(name, student, teacher, *args, **kwargs)
        unchanged = all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
        rounds.append((name, teacher, student, frozen, unchanged))
        return out

    monkeypatch.setattr(self_distill, "distill", spy)
    gens = born_again(lambda k: mlp(10 + k), blobs(), cfg(steps=10), generations=3)
    assert [r[0] for r in rounds] == ["gen1", "gen2", "gen3"]
    for k, (_, teacher, student, frozen, unchanged) in enumerate(rounds, start=1):
        assert teacher is gens[k - 1] and student is gens[k]
        assert frozen and unchanged
    assert len({id(g) for g in gens}) == 4


# -- be your own teacher -----------------------------------------------------------------------------------------
def test_byot_exit_learns_from_labels_and_the_detached_final_output():
    data = blobs()
    student = mlp(0)
    objective = self_distill.ByotObjective(student, {"hidden": "1"}, alpha=0.7, temperature=3.0)
    batch = data.batch(torch.arange(32))
    objective.build(batch)
    out = objective(batch)
    head = objective.side.heads["hidden"]
    h = torch.relu(student[0](batch["x"]))
    z_exit, z_final = head(h), student(batch["x"])
    p = torch.softmax(z_final.detach() / 3, -1)
    kl = (p * (p.log() - torch.log_softmax(z_exit / 3, -1))).sum(-1).mean()
    assert torch.allclose(out.terms["hidden_kd"], 0.7 * 9 * kl, rtol=1e-5)
    assert torch.allclose(out.terms["hidden_ce"], 0.3 * F.cross_entropy(z_exit, batch["y"]), rtol=1e-5)
    # the exit's KD term trains the shallow layer and the exit, never the final classifier it learns from
    g_final, g_first = torch.autograd.grad(out.terms["hidden_kd"], [student[2].weight, student[0].weight],
                                           allow_unused=True)
    assert (g_final is None or g_final.abs().max() == 0) and g_first.abs().max() > 0


def test_byot_trains_exits_and_exports_the_plain_student():
    student, exits = train_byot(mlp(0), {"hidden": "1"}, blobs(), cfg(steps=40))
    assert all(not m._forward_hooks for m in student.modules())
    x = blobs(seed=1)
    logits = exits["hidden"](x.tensors["x"])
    assert logits.shape == (256, 3)
    assert (logits.argmax(-1) == x.tensors["y"]).float().mean() > 0.6   # the exit learned something
    assert all(not m._forward_hooks for m in student.modules())        # the exit's hooks are gone again


# -- progressive self-knowledge distillation ----------------------------------------------------------------------
def test_snapshot_teacher_is_the_models_own_previous_epoch_prediction():
    data = blobs(n=8)
    student = mlp(0)
    train_cfg = cfg(steps=6, batch_size=4)                     # 2 steps per epoch, 3 epochs
    objective = SnapshotObjective(student, len(data), train_cfg, alpha=0.9)
    side = objective.side
    objective.build(data.batch(torch.arange(4)))
    # PS-KD's a_t = alpha_T (t + 1) / T (the authors' code): the last epoch reaches alpha_T
    assert [side.alpha_at(s) for s in range(6)] == pytest.approx([0.3, 0.3, 0.6, 0.6, 0.9, 0.9])
    recorded = {}
    order = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7]), torch.tensor([2, 0, 7, 5])]
    for step, idx in enumerate(order):
        side.step = step
        batch = data.batch(idx)
        with torch.no_grad():
            z = student(batch["x"])
        out = objective(batch)
        if step < 2:
            assert out.terms["self_kd"] == 0                   # epoch 0: no snapshot yet, labels only
            assert torch.allclose(out.terms["ce"], F.cross_entropy(z, batch["y"]), rtol=1e-5)
        else:
            previous = torch.stack([recorded[int(i)] for i in idx])
            soft = -(torch.softmax(previous, -1) * torch.log_softmax(z, -1)).sum(-1)
            hard = F.cross_entropy(z, batch["y"], reduction="none")
            assert torch.allclose(out.terms["self_kd"], (0.6 * soft).mean(), rtol=1e-5)
            assert torch.allclose(out.terms["ce"], (0.4 * hard).mean(), rtol=1e-5)
        for i, row in zip(idx, z):
            recorded[int(i)] = row
    assert torch.allclose(side.snapshot[2], recorded[2]) and bool(side.seen.all())
    assert "snapshot" in side.state_dict()                     # checkpointed with the side


def test_snapshot_round_on_the_engine_changes_the_model_compared_with_labels_only():
    data = blobs()
    plain = Engine(cfg(steps=30), progress=False)
    from kdistill.distiller import Distiller, Term

    a, b = mlp(0), mlp(0)
    plain.fit(Distiller(a, None, [Term("ce", "ce")]), data)
    Engine(cfg(steps=30), progress=False).fit(SnapshotObjective(b, len(data), cfg(steps=30), alpha=0.8), data)
    assert not torch.equal(a[0].weight, b[0].weight)
