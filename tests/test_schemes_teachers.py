"""Defining behaviour of the schemes with teachers: multi-teacher weighting, specialists, teacher-assistant
chains, Learning without Forgetting, cross-modal views, selective intervention."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill.config import ModelConfig, TrainConfig
from kdistill.data import ArrayDataset, digits
from kdistill.distiller import Distiller, Term
from kdistill.engine import Engine
from kdistill.errors import ConfigError, WiringError
from kdistill.evaluate import predict_logits
from kdistill.models import build_model
from kdistill.schemes import assistant
from kdistill.schemes.assistant import geometric_assistants, geometric_sizes, param_count, train_chain
from kdistill.schemes.common import train_ce
from kdistill.schemes.cross_modal import make_view, paired_views
from kdistill.schemes.lifelong import TaskSide, lifelong
from kdistill.schemes.multi_teacher import MultiTeacher, agreement_weights, combine_teachers
from kdistill.schemes.selective import SelectiveDistiller, intervention_mask, threshold_at
from kdistill.schemes.specialists import SpecialistEnsemble, combine_specialists, confusable_groups, specialist_data
from kdistill.seeding import seeded_build


@functools.lru_cache(maxsize=1)
def real_data():
    """scikit-learn's 8x8 digits (1437 train / 360 test): real, and fast to load and fit."""
    return digits()


def mlp(hidden, seed, d=64, classes=10):
    shape = (1, 8, 8) if d == 64 else (d,)
    return seeded_build(seed, lambda: build_model("mlp", {"hidden": hidden}, input_shape=shape, num_classes=classes))


def cfg(steps, batch_size=64, lr=3e-3):
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, log_every=50)


# -- multi-teacher -----------------------------------------------------------------------------------------------
def test_mean_and_fixed_weights_combine_softened_probabilities():
    z = [torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    temperature = 3.0
    probs = [torch.softmax(t / temperature, -1) for t in z]
    logits, w = combine_teachers(z, "mean", temperature=temperature)
    assert torch.allclose(torch.softmax(logits.double() / temperature, -1), sum(probs) / 3, atol=1e-6)
    logits, w = combine_teachers(z, "weights", [3, 1, 0], temperature=temperature)
    assert torch.allclose(torch.softmax(logits.double() / temperature, -1), 0.75 * probs[0] + 0.25 * probs[1],
                          atol=1e-6)
    assert torch.allclose(w[:, 0].double(), torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64))


def test_agreement_weights_follow_the_leave_one_out_formula():
    z = torch.randn(3, 4, 6, dtype=torch.float64)
    p = torch.softmax(z, -1)
    # A_k = P(a class drawn from teacher k equals one drawn from the mean of the other two)
    a = torch.stack([(p[k] * (p[(k + 1) % 3] + p[(k + 2) % 3]) / 2).sum(-1) for k in range(3)])
    expected = torch.exp(a / 0.05) / torch.exp(a / 0.05).sum(0)
    assert torch.allclose(agreement_weights(z, 0.05).double(), expected, atol=1e-5)


def test_agreement_weighting_gives_a_bad_teacher_little_weight():
    data = real_data()
    g = torch.Generator().manual_seed(0)
    shuffled = ArrayDataset({"x": data.train.tensors["x"],
                             "y": data.train.tensors["y"][torch.randperm(len(data.train), generator=g)]}, "shuffled")
    image = functools.partial(build_model, input_shape=(1, 8, 8), num_classes=10)
    good_mlp = train_ce("a", seeded_build(1, lambda: image("mlp", {"hidden": [64]})), data.train, cfg(150), seed=1)
    good_cnn = train_ce("b", seeded_build(2, lambda: image("cnn2d", {"channels": [8, 16]})), data.train, cfg(150),
                        seed=2)
    liar = train_ce("bad", seeded_build(3, lambda: image("mlp", {"hidden": [256]})), shuffled, cfg(150), seed=3)
    untrained = seeded_build(4, lambda: image("mlp", {"hidden": [64]}))
    batch, y = {"x": data.test.tensors["x"]}, data.test.tensors["y"]
    for bad in (liar, untrained):                           # trained on shuffled labels / barely trained
        agree = MultiTeacher([good_mlp, good_cnn, bad], "agreement", temperature=4.0)(batch)
        mean_weights = agree["teacher_weights"].mean(0)
        assert mean_weights[2] < 0.2 and mean_weights[2] < 0.5 * min(mean_weights[0], mean_weights[1])
        mean = MultiTeacher([good_mlp, good_cnn, bad], "mean", temperature=4.0)(batch)
        assert torch.allclose(mean["teacher_weights"], torch.full_like(mean["teacher_weights"], 1 / 3))
        # the bad teacher pulls the mean target off the labels more than the agreement-weighted one
        nll = lambda logits: F.cross_entropy(logits / 4.0, y)  # noqa: E731
        assert nll(agree["logits"]) < nll(mean["logits"])


def test_multi_teacher_refuses_mismatched_outputs():
    teacher = MultiTeacher([nn.Linear(4, 3), nn.Linear(4, 5)])
    with pytest.raises(WiringError, match="differ in shape"):
        teacher({"x": torch.randn(2, 4)})


# -- specialists -------------------------------------------------------------------------------------------------
def test_confusable_groups_come_from_the_confusion_matrix():
    m = torch.eye(9) * 0.5
    m[1, 4], m[4, 1] = 0.3, 0.3      # 1 <-> 4 the most confused pair, and 7 confused with 4
    m[4, 7] = 0.1
    m[0, 2] = 0.2                    # 0, 2, 5 confused together
    m[2, 5], m[5, 0] = 0.15, 0.15
    assert confusable_groups(m, 1, 2) == [[1, 4]]
    assert confusable_groups(m, 2, 3) == [[1, 4, 7], [0, 2, 5]]
    assert confusable_groups(m.T, 2, 3) == [[1, 4, 7], [0, 2, 5]]   # symmetric in the direction of confusion
    with pytest.raises(ConfigError):
        confusable_groups(m, 4, 3)


def test_specialists_are_trained_only_on_their_group_plus_a_dustbin():
    data = real_data().train
    y = data.tensors["y"]
    group = [3, 5, 8]
    spec = specialist_data(data, group, 10, dustbin_ratio=0.5, seed=0)
    source = y[spec.tensors["source_index"]]
    labels = spec.tensors["y"]
    inside = labels < 3
    assert set(labels.tolist()) <= {0, 1, 2, 3}
    assert torch.equal(torch.tensor(group)[labels[inside]], source[inside])   # group labels map back exactly
    assert not torch.isin(source[~inside], torch.tensor(group)).any()         # the dustbin holds the rest
    assert int(inside.sum()) == int(torch.isin(y, torch.tensor(group)).sum())  # every example of the group
    assert int((~inside).sum()) == round(0.5 * int(inside.sum()))


def test_specialist_combination_solves_hintons_objective():
    torch.manual_seed(0)
    p_g = torch.softmax(torch.randn(5, 6, dtype=torch.float64), -1)
    groups = [[1, 2], [3, 4, 5]]
    p_s = [torch.softmax(torch.randn(5, 3, dtype=torch.float64), -1),
           torch.softmax(torch.randn(5, 4, dtype=torch.float64), -1)]
    active = torch.tensor([[True, True, False, True, False], [True, False, True, True, False]])
    q = combine_specialists(p_g, p_s, groups, active, iterations=300)

    def objective(q):
        total = (p_g * (p_g.log() - q.log())).sum(-1)
        for m, g in enumerate(groups):
            rest = [c for c in range(6) if c not in g]
            q_m = torch.cat([q[:, g], q[:, rest].sum(-1, keepdim=True)], -1)
            total = total + active[m] * (p_s[m] * (p_s[m].log() - q_m.log())).sum(-1)
        return total

    # an independent minimizer: L-BFGS on logits with autograd
    z = p_g.log().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(torch.softmax(z, -1)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    reference = torch.softmax(z.detach(), -1)
    assert torch.allclose(q, reference, atol=1e-6)
    assert (objective(q) <= objective(reference) + 1e-9).all()
    assert torch.allclose(q[4], p_g[4])                       # no active specialist: the generalist as it is


def test_a_confident_specialist_resolves_the_generalists_confusion():
    generalist = nn.Linear(2, 4, bias=False)
    specialist = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        generalist.weight.copy_(torch.tensor([[0.0, 0], [2, 0], [2, 0], [0, 0]]))   # unsure between 1 and 2
        specialist.weight.copy_(torch.tensor([[3.0, 0], [0, 0], [0, 0]]))           # sure it is 1 (of {1, 2})
    teacher = SpecialistEnsemble(generalist, [specialist], [[1, 2]], top_k=2)
    q = teacher(torch.tensor([[1.0, 0.0]])).exp()[0]
    p_g = torch.softmax(generalist(torch.tensor([[1.0, 0.0]])), -1)[0]
    assert abs(p_g[1] - p_g[2]) < 1e-6 and q[1] > q[2] + 0.2
    assert torch.allclose(q.sum(), torch.tensor(1.0), atol=1e-5)


# -- teacher-assistant chain -------------------------------------------------------------------------------------
def test_geometric_assistants_sit_between_teacher_and_student():
    assert geometric_sizes(100, 10000, 1) == pytest.approx([1000])
    assert geometric_sizes(100, 10000, 3) == pytest.approx([10 ** 3.5, 1000, 10 ** 2.5])
    student = ModelConfig(name="mlp", kwargs={"hidden": [16]})
    small = param_count(student, (40,), 10)
    configs = geometric_assistants(student, 100 * small, (40,), 10, count=3)
    sizes = [param_count(c, (40,), 10) for c in configs]
    for size, target in zip(sizes, geometric_sizes(small, 100 * small, 3)):
        assert abs(size / target - 1) < 0.1
    assert sizes == sorted(sizes, reverse=True) and all(c.name == "mlp" for c in configs)
    with pytest.raises(ConfigError, match="list the assistants"):
        geometric_assistants(ModelConfig(name="tests.test_schemes_teachers:no_knobs"), 10_000, (40,), 10)


def no_knobs(input_shape, num_classes):
    return nn.Linear(input_shape[0], num_classes)


def test_chain_link_learns_from_the_previous_link(monkeypatch):
    seen = []
    real = assistant.distill

    def spy(name, student, teacher, *args, **kwargs):
        seen.append((name, student, teacher, not any(p.requires_grad for p in teacher.parameters())))
        return real(name, student, teacher, *args, **kwargs)

    monkeypatch.setattr(assistant, "distill", spy)
    data = real_data().train
    teacher, a1, a2, student = mlp([64], 0), mlp([32], 1), mlp([24], 2), mlp([8], 3)
    trained = train_chain(teacher, [a1, a2, student], data, cfg(5))
    assert [s[0] for s in seen] == ["assistant1", "assistant2", "student"]
    assert [s[2] for s in seen] == [teacher, a1, a2] and all(s[3] for s in seen)
    assert trained == [a1, a2, student]


# -- learning without forgetting ---------------------------------------------------------------------------------
def test_lwf_objective_reads_only_its_classes():
    model, old = mlp([16], 0, d=6, classes=6), mlp([16], 1, d=6, classes=6)
    side = TaskSide(model, task_classes=[3, 4, 5], keep_classes=[0, 1, 2], lwf_weight=0.5, temperature=2.0)
    x, y = torch.randn(8, 6), torch.tensor([3, 4, 5, 3, 4, 5, 3, 4])
    with torch.no_grad():
        old_logits = old(x)
    out, terms = side(x, {"logits": old_logits}, y)
    z = model(x)
    assert torch.allclose(terms["ce"], F.cross_entropy(z[:, 3:], y - 3), rtol=1e-5)
    p = torch.softmax(old_logits[:, :3] / 2, -1)
    kl = (p * (p.log() - torch.log_softmax(z[:, :3] / 2, -1))).sum(-1).mean()
    assert torch.allclose(terms["lwf"], 0.5 * kl, rtol=1e-5)
    # the new task's CE never touches the old classes' output weights
    (g,) = torch.autograd.grad(terms["ce"], [model[-1].weight])
    assert g[:3].abs().max() == 0 and g[3:].abs().max() > 0


def test_lwf_keeps_more_old_task_accuracy_than_finetuning():
    bundle = real_data()
    result = lifelong(lambda: mlp([64], 0), bundle, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], cfg(200), seed=0)
    assert result["old"]["old_task"] > 0.9
    assert result["lwf"]["old_task"] > result["finetune"]["old_task"]
    assert result["lwf"]["forgetting"] < 0.5 * result["finetune"]["forgetting"]
    assert result["lwf"]["new_task"] > 0.9 and result["finetune"]["new_task"] > 0.9


# -- cross-modal views -------------------------------------------------------------------------------------------
def test_paired_views_and_view_specs():
    data = ArrayDataset({"x": torch.randn(10, 40), "y": torch.arange(10)}, "d")
    paired = paired_views(data, "identity", "downsample:2+noise:0.1", seed=3)
    assert torch.equal(paired.tensors["teacher_x"], data.tensors["x"])
    s = paired.tensors["student_x"]
    assert s.shape == (10, 20) and paired.tensors["x"] is s
    pooled = data.tensors["x"].view(10, 20, 2).mean(-1)
    assert 0.05 < (s - pooled).std() < 0.15                       # the noise, on top of the pooled signal
    assert torch.equal(paired_views(data, "identity", "downsample:2+noise:0.1", seed=3).tensors["student_x"], s)
    assert make_view("downsample:2")(torch.ones(2, 1, 8, 8), None).shape == (2, 1, 4, 4)
    with pytest.raises(ConfigError, match="bad view 'blur:3'"):
        make_view("downsample:2+blur:3")


class Recorder(nn.Module):
    def __init__(self, d, classes=3):
        super().__init__()
        self.linear = nn.Linear(d, classes)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.linear(x)


def test_teacher_reads_teacher_view_and_student_reads_student_view():
    data = ArrayDataset({"x": torch.randn(64, 12), "y": torch.randint(0, 3, (64,))}, "d")
    paired = paired_views(data, "identity", "downsample:3", seed=0)
    teacher, student = Recorder(12), Recorder(4)
    Engine(TrainConfig(steps=2, batch_size=16, log_every=1), progress=False).fit(
        Distiller(student, teacher, [Term("kd", "kd", params={"temperature": 2.0})]), paired)
    rows = {tuple(r.tolist()): i for i, r in enumerate(paired.tensors["teacher_x"])}
    for t_in, s_in in zip(teacher.inputs, student.inputs):
        assert t_in.shape[1] == 12 and s_in.shape[1] == 4
        idx = torch.tensor([rows[tuple(r.tolist())] for r in t_in])
        assert torch.equal(paired.tensors["student_x"][idx], s_in)   # same samples, each side its own view


# -- selective intervention --------------------------------------------------------------------------------------
def test_intervention_mask_and_threshold_schedule():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    kl = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
    tau = float(kl.median())
    assert torch.equal(intervention_mask(s, t, tau, "kl"), kl > tau)
    assert torch.equal(intervention_mask(s, t, 0.5, "top1"), s.argmax(-1) != t.argmax(-1))
    assert threshold_at(0, 11, 1.0, 0.0, "linear") == 1.0 and threshold_at(10, 11, 1.0, 0.0, "linear") == 0.0
    assert threshold_at(5, 11, 1.0, 0.0, "linear") == pytest.approx(0.5)
    assert threshold_at(5, 11, 1.0, 0.0, "constant") == 1.0


def test_selective_term_counts_only_where_student_and_teacher_diverge():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    terms = [Term("ce", "ce", 0.5), Term("kd", "kd", 0.5, params={"temperature": 2.0})]
    d = SelectiveDistiller(student, teacher, terms, threshold=0.05)
    batch = {"x": x, "y": y}
    d.build(batch)
    out = d(batch)
    s = student(x)
    with torch.no_grad():
        t = teacher(x)
    kl1 = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
    chosen = kl1 > 0.05
    assert 0 < int(chosen.sum()) < 16
    p = torch.softmax(t / 2, -1)
    kd_i = 4 * (p * (p.log() - torch.log_softmax(s / 2, -1))).sum(-1)
    assert torch.allclose(out.terms["kd"], 0.5 * (kd_i * chosen).sum() / 16, rtol=1e-5)
    assert torch.allclose(out.terms["ce"], 0.5 * F.cross_entropy(s, y), rtol=1e-5)   # labels: never gated
    assert d.side.last_fraction == pytest.approx(float(chosen.float().mean()))
    # a sample where the two agree gets no gradient from the teacher's term
    xs = x.clone().requires_grad_(True)
    d_out = d({"x": xs, "y": y})
    (g,) = torch.autograd.grad(d_out.terms["kd"], [xs])
    assert g[~chosen].abs().max() == 0 and g[chosen].abs().max() > 0


def test_selective_per_token_gating_and_whole_sequence_gating():
    s, t = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    kl = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
    tau = float(kl.median())
    token = intervention_mask(s, t, tau, "kl", "token")
    assert token.shape == (2, 5) and torch.equal(token, kl > tau)
    sample = intervention_mask(s, t, tau, "kl", "sample")
    assert torch.equal(sample, (kl.mean(1, keepdim=True) > tau).expand(2, 5))


def test_selective_refuses_to_gate_label_terms():
    with pytest.raises(WiringError, match="cannot gate"):
        SelectiveDistiller(nn.Linear(4, 3), nn.Linear(4, 3), [Term("ce", "ce"), Term("kd", "kd")], gated=["ce"])


def test_predict_logits_of_specialist_ensemble_is_a_distribution():
    data = real_data()
    gen = mlp([16], 0)
    spec = mlp([16], 1, classes=3)
    ens = SpecialistEnsemble(gen, [spec], [[2, 7]])
    logits = predict_logits(ens, ArrayDataset({"x": data.test.tensors["x"][:32]}, "t"))
    assert torch.allclose(logits.exp().sum(-1), torch.ones(32), atol=1e-4)


class TokenModel(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = nn.Embedding(7, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.embed(x))


def test_selective_gates_tokens_and_ignores_padding():
    student, teacher = TokenModel(0), TokenModel(1)
    x = torch.randint(0, 7, (3, 6))
    y = torch.randint(0, 5, (3, 6))
    y[:, 4:] = -100                                             # padding: never counted, never taught
    d = SelectiveDistiller(student, teacher, [Term("ce", "ce"), Term("kl", "kl")], threshold=0.1)
    batch = {"x": x, "y": y}
    d.build(batch)
    out = d(batch)
    s = student(x)
    with torch.no_grad():
        t = teacher(x)
    kl = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
    valid = y != -100
    chosen = (kl > 0.1) & valid
    assert 0 < int(chosen.sum()) < int(valid.sum())
    assert torch.allclose(out.terms["kl"], (kl * chosen).sum() / valid.sum(), rtol=1e-5)
