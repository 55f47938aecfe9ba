"""Each scheme against its paper's definition, computed independently here (float64, by hand): DML's K-peer
loss and alternating updates, the specialists' dustbin correction, BYOT's feature hint, LwF's warm-up."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill.config import TrainConfig
from kdistill.data import ArrayDataset
from kdistill.errors import WiringError
from kdistill.schemes import self_distill
from kdistill.schemes.lifelong import task_accuracy, warm_up
from kdistill.schemes.mutual import MutualObjective, mutual_kl, train_mutual
from kdistill.schemes.specialists import SpecialistEnsemble, dustbin_logit_shift, sampling_shift, specialist_data

from tests.conftest import blobs, mlp


def kl_rows(p, q):
    """KL(p || q) per row, float64."""
    return (p * (p.log() - q.log())).sum(-1)


# -- deep mutual learning: 1/(K-1) sum_{l != k} KL(p_l || p_k) ----------------------------------------------------
def test_dml_k_peer_loss_is_the_average_of_pairwise_kls_not_the_kl_from_the_mean():
    torch.manual_seed(0)
    logits = [torch.randn(64, 10, dtype=torch.float64) * 3 for _ in range(3)]
    t = 2.0
    probs = [torch.softmax(z / t, -1) for z in logits]
    for k in range(3):
        pairwise = sum(kl_rows(probs[l], probs[k]) for l in range(3) if l != k).mean() / 2
        assert torch.allclose(mutual_kl(logits, k, t), t * t * pairwise, rtol=1e-10)
        mean_other = sum(probs[l] for l in range(3) if l != k) / 2
        from_mean = t * t * kl_rows(mean_other, probs[k]).mean()
        assert mutual_kl(logits, k, t) > from_mean * 1.05          # KL is convex: the old target was too soft


def test_dml_objective_terms_use_the_pairwise_average():
    peers = [mlp(0), mlp(1), mlp(2)]
    objective = MutualObjective(peers, temperature=2.0, kl_weight=0.5)
    batch = blobs(16).batch(torch.arange(16))
    objective.build(batch)
    out = objective(batch)
    p = [torch.softmax(peer(batch["x"]).double() / 2, -1) for peer in peers]
    for k in range(3):
        expected = 0.5 * 4 * sum(kl_rows(p[l], p[k]) for l in range(3) if l != k).mean() / 2
        assert torch.allclose(out.terms[f"kl_peer{k}"].double(), expected, rtol=1e-5)


def test_dml_alternating_updates_follow_algorithm_1():
    """Peer 0 steps on batch B; then peer 1 steps on the same B against peer 0's *updated* prediction."""
    data = blobs(64)
    batch, other = data.batch(torch.arange(16)), data.batch(torch.arange(16, 32))
    peers = [mlp(0), mlp(1)]
    reference = [mlp(0), mlp(1)]
    objective = MutualObjective(peers, temperature=1.0, kl_weight=1.0, update="alternating")
    objective.build(batch)
    optimizer = torch.optim.SGD(objective.side.parameters(), lr=0.5)
    for step, b in enumerate([batch, other]):          # the second step must still use `batch` (one cycle)
        objective.set_step(step)
        optimizer.zero_grad(set_to_none=True)
        objective(b).loss.backward()
        idle = peers[1 - step]
        assert all(p.grad is None for p in idle.parameters())   # the other peer is not stepped
        optimizer.step()
    # Algorithm 1 by hand, on `batch` only
    x, y = batch["x"], batch["y"]
    for k in (0, 1):
        me, them = reference[k], reference[1 - k]
        with torch.no_grad():
            target = torch.softmax(them(x), -1)
        loss = F.cross_entropy(me(x), y) + kl_rows(target, torch.softmax(me(x), -1)).mean()
        grads = torch.autograd.grad(loss, list(me.parameters()))
        with torch.no_grad():
            for param, grad in zip(me.parameters(), grads):
                param -= 0.5 * grad
    for got, want in zip(peers, reference):
        for a, b in zip(got.parameters(), want.parameters()):
            assert torch.allclose(a, b, atol=1e-6)


def test_dml_alternating_trains_every_peer_on_the_engine():
    with pytest.raises(WiringError, match="grad_accum"):
        train_mutual([mlp(0), mlp(1)], blobs(), TrainConfig(steps=2, batch_size=32, grad_accum=2), update="alternating")
    peers = [mlp(0), mlp(1), mlp(2)]
    before = [[p.detach().clone() for p in peer.parameters()] for peer in peers]
    train_mutual(peers, blobs(), TrainConfig(steps=6, batch_size=32, lr=0.01, log_every=3), update="alternating")
    for peer, old in zip(peers, before):
        assert any(not torch.equal(a, b) for a, b in zip(peer.parameters(), old))


# -- specialists: the dustbin logit corrected for the oversampled group -------------------------------------------
def test_dustbin_shift_recovers_the_true_posterior_from_a_resampled_specialist():
    """Bayes by hand: a specialist trained on resampled data learns p'(c|x) ∝ p(c|x) s_c / pi_c; adding the shift to
    its dustbin logit gives back the true posterior coarsened to (group, dustbin)."""
    torch.manual_seed(0)
    classes, group = 10, [3, 7]
    prior = torch.full((classes,), 0.1, dtype=torch.float64)
    posterior = torch.softmax(torch.randn(50, classes, dtype=torch.float64) * 2, -1)
    P = float(prior[group].sum())                       # 0.2 of the data is in the group
    S = 0.5                                             # half the specialist's set (dustbin ratio 1)
    ratio = torch.full((classes,), (1 - S) / (1 - P), dtype=torch.float64)
    ratio[group] = S / P
    biased = posterior * ratio
    biased = biased / biased.sum(-1, keepdim=True)
    others = [c for c in range(classes) if c not in group]
    learned = torch.cat([biased[:, group], biased[:, others].sum(-1, keepdim=True)], -1)
    truth = torch.cat([posterior[:, group], posterior[:, others].sum(-1, keepdim=True)], -1)
    shift = dustbin_logit_shift(S, P)
    assert math.isclose(shift, math.log(4.0), rel_tol=1e-12)    # the "about 4x"
    logits = learned.log()
    logits[:, -1] += shift
    assert torch.allclose(torch.softmax(logits, -1), truth, atol=1e-12)
    assert not torch.allclose(learned, truth, atol=1e-3)        # without it the group's odds are inflated


def test_sampling_shift_reads_the_fractions_from_the_data_and_the_ensemble_applies_it():
    y = torch.arange(200) % 10
    data = ArrayDataset({"x": torch.randn(200, 4), "y": y}, "ten")
    spec_set = specialist_data(data, [2, 5], 10, dustbin_ratio=1.0, seed=0)
    assert math.isclose(sampling_shift(data, [2, 5], spec_set), math.log(4.0), rel_tol=1e-9)
    spec_set3 = specialist_data(data, [2, 5], 10, dustbin_ratio=3.0, seed=0)   # 1/4 in group: odds 1/3 vs 1/4
    assert math.isclose(sampling_shift(data, [2, 5], spec_set3), math.log((1 / 3) / (1 / 4)), rel_tol=1e-9)

    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits.expand(len(x), -1)

    generalist = Fixed(torch.log(torch.tensor([0.4, 0.4, 0.2])))
    specialist = Fixed(torch.tensor([1.0, 0.0, 0.5]))            # classes 0, 1 and the dustbin
    x = torch.zeros(2, 1)
    plain = SpecialistEnsemble(generalist, [specialist], [[0, 1]], top_k=2)(x).exp()
    shifted = SpecialistEnsemble(generalist, [specialist], [[0, 1]], top_k=2, dustbin_shifts=[math.log(4)])(x).exp()
    # the corrected specialist gives the dustbin (class 2) more mass: so does the combined teacher
    assert shifted[0, 2] > plain[0, 2] + 0.05
    expected = torch.softmax(torch.tensor([1.0, 0.0, 0.5 + math.log(4)]), -1)
    # only one specialist, covering every coarsened class of q: q coarsened is the average of p_g and p_m
    q_m = torch.stack([shifted[0, 0], shifted[0, 1], shifted[0, 2]])
    assert torch.allclose(q_m, (torch.tensor([0.4, 0.4, 0.2]) + expected) / 2, atol=1e-4)


# -- BYOT: the L2 hint from the deepest features to each exit's bottleneck ----------------------------------------
def test_byot_hint_is_the_l2_from_the_deepest_features_to_the_exit_bottleneck():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    objective = self_distill.ByotObjective(student, {"early": "1"}, alpha=0.5, temperature=3.0, hint_weight=0.2)
    batch = blobs(32).batch(torch.arange(32))
    objective.build(batch)
    out = objective(batch)
    head = objective.side.heads["early"]
    x = batch["x"]
    early = torch.relu(student[0](x))
    deepest = torch.relu(student[2](early))                     # the input of the last linear layer
    bottleneck = torch.relu(head.bottleneck[1](early))
    assert bottleneck.shape == deepest.shape                    # the bottleneck is as wide as F_C
    expected = 0.2 * ((bottleneck - deepest.detach()) ** 2).sum(-1).mean()
    assert torch.allclose(out.terms["early_hint"], expected, rtol=1e-5)
    assert torch.allclose(head(early), head.classifier(bottleneck))
    # the hint trains the shallow layer and the bottleneck, never the deeper layers it learns from
    g_deep, g_first = torch.autograd.grad(out.terms["early_hint"], [student[2].weight, student[0].weight],
                                          allow_unused=True)
    assert (g_deep is None or g_deep.abs().max() == 0) and g_first.abs().max() > 0


def test_byot_hint_can_name_the_deepest_features_or_be_switched_off():
    student = mlp(0)
    tapped = self_distill.ByotObjective(student, {"h": "1"}, hint_weight=1.0, hint="1")
    batch = blobs(16).batch(torch.arange(16))
    tapped.build(batch)
    assert "h_hint" in tapped(batch).terms
    off = self_distill.ByotObjective(mlp(0), {"h": "1"}, hint_weight=0.0)
    off.build(batch)
    assert "h_hint" not in off(batch).terms


# -- LwF: the warm-up trains the new head only ---------------------------------------------------------------------
def test_lwf_warm_up_trains_only_the_new_classes_rows_of_the_last_layer():
    data = blobs(n=300, classes=4)
    new = [2, 3]
    rows = torch.isin(data.tensors["y"], torch.tensor(new)).nonzero().flatten()
    new_data = ArrayDataset({k: v[rows] for k, v in data.tensors.items() if k != "index"}, "new")
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc_before = task_accuracy(model, data, new)
    warmed = warm_up(model, new_data, new, TrainConfig(steps=60, batch_size=32, lr=0.05, weight_decay=0.1,
                                                       log_every=20))
    after = warmed.state_dict()
    for name, value in before.items():
        if name.startswith("3."):                               # the output layer: only the new rows move
            assert torch.equal(after[name][:2], value[:2])
            assert not torch.equal(after[name][2:], value[2:])
        else:                                                   # shared weights and BatchNorm statistics frozen
            assert torch.equal(after[name], value), name
    assert all(p.requires_grad for p in warmed.parameters())    # trainable again for the joint round
    assert task_accuracy(warmed, data, new) > max(acc_before, 0.8)
