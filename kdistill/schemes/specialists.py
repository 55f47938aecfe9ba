"""Specialist ensembles (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network", sec. 5).

1. A generalist (the configured teacher) is trained (or loaded).
2. Confusable class groups are read from the generalist's soft confusion matrix on the training data,
   ``M[i, j] = mean over x of class i of p_j(x)`` (soft, so it has structure even where the generalist is
   right): the most confused pair starts a group, which grows by the class most confused with it.
3. A specialist per group learns |group| + 1 classes: the group's classes and a *dustbin* for everything else.
   Its training set is every example of its group plus `dustbin_ratio` times as many random others (as the
   dustbin), so half its data (ratio 1) is from its group; it starts from the generalist's weights where shapes
   match. Its in-group classes are oversampled, so its dustbin logit is corrected (Hinton et al., sec. 5.2:
   "incrementing the logit of the dustbin class by the log of the proportion by which the specialist class is
   oversampled"; see `dustbin_logit_shift`).
4. Generalist + specialists form the teacher. For input x, the active specialists A are those whose group meets
   the generalist's top-k classes; the teacher's distribution q solves (Hinton et al., eq. 5)::

       q = argmin_q  KL(p_g || q) + sum_{m in A} KL(p_m || q_m)

   where q_m is q coarsened to specialist m's classes (its group's classes, and the dustbin holding the mass
   of all others). Each term is the likelihood of a coarsening of q, so the minimizer is found by the EM
   fixed-point iteration ``q_j <- (p_g_j + sum_{m in A} q_j p_m[a_m(j)] / q_m[a_m(j)]) / (1 + |A|)``
   (monotone, and exact at its fixed point: the objective is convex in q). With no active specialist q = p_g.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
from pydantic import Field
from torch import nn

from kdistill.configbase import Strict
from kdistill.data import ArrayDataset
from kdistill.errors import ConfigError, WiringError
from kdistill.evaluate import accuracy, predict_logits
from kdistill.outputs import call_model, logits_of
from kdistill.schemes.common import SchemeJob, freeze, scheme_run, train_ce
from kdistill.schemes.sections import ModelConfig
from kdistill.train_config import TrainConfig


class SpecialistsScheme(Strict):
    """Specialist ensembles (Hinton et al. 2015, sec. 5): the teacher is the generalist; specialists learn
    confusable class groups (plus a dustbin class); generalist + specialists teach the student."""

    name: Literal["specialists"]
    num_specialists: int = Field(2, ge=1)
    group_size: int = Field(2, ge=2)
    specialist: Optional[ModelConfig] = Field(None, description="specialist model (default: the teacher's)")
    specialist_train: Optional[TrainConfig] = Field(None, description="default: teacher.train or train")
    dustbin_ratio: float = Field(1.0, gt=0, description="dustbin examples per in-group example")
    top_k: int = Field(2, ge=1, description="a specialist is used when its group meets the generalist's top k")


def soft_confusion(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """M[i, j] = mean predicted probability of class j over the examples of class i."""
    probs = torch.softmax(logits.float(), -1)
    m = torch.zeros(num_classes, num_classes)
    for i in range(num_classes):
        rows = labels == i
        if rows.any():
            m[i] = probs[rows].mean(0)
    return m


def confusable_groups(confusion: torch.Tensor, num_groups: int, group_size: int) -> list[list[int]]:
    """Disjoint groups of `group_size` classes, greedily by symmetric confusion (off-diagonal M + M^T)."""
    c = confusion.shape[0]
    if num_groups * group_size > c:
        raise ConfigError(f"{num_groups} groups of {group_size} classes need {num_groups * group_size} classes, "
                          f"the data has {c}", where="scheme.num_specialists",
                          fix="lower num_specialists or group_size")
    s = (confusion + confusion.T).clone().double()
    s.fill_diagonal_(-1.0)
    free = set(range(c))
    groups = []
    for _ in range(num_groups):
        sub = torch.full_like(s, -2.0)
        idx = torch.tensor(sorted(free))
        sub[idx[:, None], idx[None, :]] = s[idx[:, None], idx[None, :]]
        i, j = divmod(int(sub.argmax()), c)
        group = [i, j]
        free -= {i, j}
        while len(group) < group_size:
            best = max(sorted(free), key=lambda k: float(s[k, group].sum()))
            group.append(best)
            free.discard(best)
        groups.append(sorted(group))
    return groups


def specialist_data(data: ArrayDataset, group: Sequence[int], num_classes: int, *, dustbin_ratio: float = 1.0,
                    seed: int = 0) -> ArrayDataset:
    """The training set of a specialist: every labelled example of `group` (label = position in the group) and
    round(dustbin_ratio * that many) random other labelled examples (label = len(group), the dustbin)."""
    y = data.tensors["y"]
    lookup = torch.full((num_classes,), len(group), dtype=torch.long)
    lookup[torch.as_tensor(list(group))] = torch.arange(len(group))
    labelled = y != -100
    in_group = labelled & torch.isin(y, torch.as_tensor(list(group)))
    inside = in_group.nonzero().flatten()
    outside = (labelled & ~in_group).nonzero().flatten()
    g = torch.Generator().manual_seed(seed)
    n_out = min(len(outside), int(round(dustbin_ratio * len(inside))))
    chosen = torch.cat([inside, outside[torch.randperm(len(outside), generator=g)[:n_out]]]).sort().values
    rows = {k: v[chosen] for k, v in data.tensors.items() if k != "index"}
    rows["y"] = lookup[y[chosen]]
    rows["source_index"] = data.tensors["index"][chosen]
    return ArrayDataset(rows, f"{data.name}-specialist-{'-'.join(map(str, group))}")


def dustbin_logit_shift(in_group_train: float, in_group_true: float) -> float:
    """The correction added to a specialist's dustbin logit for its resampled training set.

    Resampling keeps each class's inputs, p'(x | c) = p(x | c), and changes the class prior from pi_c (the full
    labelled data) to s_c (the specialist's set). Every in-group example is kept, so s_c / pi_c = S / P for each
    in-group class c, and the dustbin is a uniform sample of the rest, so its ratio is (1 - S) / (1 - P), where
    S and P are the in-group fractions of the specialist's set and of the full data. By Bayes the specialist
    learns p'(c | x) ∝ p(c | x) s_c / pi_c, i.e. its logits are the unbiased ones plus log(S / P) (in-group)
    or log((1 - S) / (1 - P)) (dustbin). A softmax ignores a common shift, so adding

        delta = log(S / (1 - S)) - log(P / (1 - P))

    to the dustbin logit alone gives back p(c | x) on the specialist's |group| + 1 classes: the log of the odds
    ratio by which the group is oversampled (2 of 10 balanced classes at half the data: delta = log 4).
    """
    if not (0 < in_group_train < 1 and 0 < in_group_true < 1):
        raise WiringError(f"in-group fractions must lie in (0, 1), got {in_group_train} (specialist set) and "
                          f"{in_group_true} (full data)", where="scheme.dustbin_ratio")
    odds = lambda f: math.log(f / (1 - f))  # noqa: E731
    return odds(in_group_train) - odds(in_group_true)


def sampling_shift(data: ArrayDataset, group: Sequence[int], specialist_set: ArrayDataset) -> float:
    """`dustbin_logit_shift` of a specialist's set (`specialist_data`) drawn from the labelled rows of `data`."""
    y = data.tensors["y"]
    labelled = y[y != -100]
    true = float(torch.isin(labelled, torch.as_tensor(list(group))).double().mean())
    train = float((specialist_set.tensors["y"] < len(group)).double().mean())
    return dustbin_logit_shift(train, true)


def combine_specialists(generalist_probs: torch.Tensor, specialist_probs: Sequence[torch.Tensor],
                        groups: Sequence[Sequence[int]], active: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """The distribution q (B, C) minimizing KL(p_g || q) + sum over active m of KL(p_m || q_m) (EM iteration).

    Args:
        generalist_probs: p_g (B, C).
        specialist_probs: p_m (B, |group_m| + 1) per specialist, the dustbin last.
        groups: the classes of each specialist.
        active: bool (M, B), whether specialist m takes part for each input.
    """
    p_g = generalist_probs.double()
    c = p_g.shape[-1]
    maps = []
    for group in groups:
        a = torch.zeros(c, len(group) + 1, dtype=torch.float64, device=p_g.device)
        a[:, len(group)] = 1.0
        a[list(group), len(group)] = 0.0
        a[list(group), torch.arange(len(group))] = 1.0
        maps.append(a)
    act = active.double()
    count = 1.0 + act.sum(0)[:, None]
    q = p_g.clone()
    for _ in range(iterations):
        numerator = p_g.clone()
        for m, (p_m, a) in enumerate(zip(specialist_probs, maps)):
            q_m = (q @ a).clamp_min(1e-300)
            numerator += act[m][:, None] * q * ((p_m.double() / q_m) @ a.T)
        q = numerator / count
    return q.to(generalist_probs.dtype)


class SpecialistEnsemble(nn.Module):
    """Generalist + specialists as one teacher model: x -> log q (see the module docstring)."""

    def __init__(self, generalist: nn.Module, specialists: Sequence[nn.Module], groups: Sequence[Sequence[int]],
                 top_k: int = 2, iterations: int = 100, dustbin_shifts: Optional[Sequence[float]] = None):
        super().__init__()
        if len(specialists) != len(groups):
            raise WiringError(f"{len(specialists)} specialists for {len(groups)} groups")
        shifts = [0.0] * len(groups) if dustbin_shifts is None else [float(d) for d in dustbin_shifts]
        if len(shifts) != len(groups):
            raise WiringError(f"{len(shifts)} dustbin shifts for {len(groups)} specialists")
        self.dustbin_shifts = shifts  # added to each specialist's dustbin logit (`dustbin_logit_shift`)
        self.generalist = generalist
        self.specialists = nn.ModuleList(specialists)
        self.groups = [list(g) for g in groups]
        self.top_k, self.iterations = top_k, iterations

    def active(self, generalist_probs: torch.Tensor) -> torch.Tensor:
        """(M, B): specialist m is active for x when its group meets the generalist's top-k classes of x."""
        top = generalist_probs.topk(min(self.top_k, generalist_probs.shape[-1]), -1).indices
        return torch.stack([torch.isin(top, torch.as_tensor(g, device=top.device)).any(-1) for g in self.groups])

    def forward(self, x):
        p_g = torch.softmax(logits_of(call_model(self.generalist, x)).float(), -1)
        p_s = []
        for spec, shift in zip(self.specialists, self.dustbin_shifts):
            z = logits_of(call_model(spec, x)).float()
            p_s.append(torch.softmax(torch.cat([z[..., :-1], z[..., -1:] + shift], -1), -1))
        q = combine_specialists(p_g, p_s, self.groups, self.active(p_g), self.iterations)
        return q.clamp_min(1e-30).log()


def copy_matching(source: nn.Module, target: nn.Module) -> int:
    """Copy every tensor of `source` whose name and shape match into `target`; returns how many."""
    own = target.state_dict()
    take = {k: v for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape}
    target.load_state_dict(take, strict=False)
    return len(take)


@scheme_run
def run(job: SchemeJob) -> dict:
    cfg, s = job.cfg, job.cfg.scheme
    bundle = job.bundle
    generalist = job.teacher()
    train_logits = predict_logits(generalist, bundle.train)
    confusion = soft_confusion(train_logits, bundle.train.tensors["y"], bundle.num_classes)
    groups = confusable_groups(confusion, s.num_specialists, s.group_size)
    job.log(f"[specialists] confusable groups: {groups}")
    spec_cfg = s.specialist or cfg.teacher
    spec_train = s.specialist_train or cfg.teacher.train or cfg.train
    specialists, shifts = [], []
    for m, group in enumerate(groups):
        model = job.model(spec_cfg, cfg.seed + 303 + m, "scheme.specialist", num_classes=len(group) + 1)
        copy_matching(generalist, model)
        data = specialist_data(bundle.train, group, bundle.num_classes, dustbin_ratio=s.dustbin_ratio,
                               seed=cfg.seed + m)
        shifts.append(sampling_shift(bundle.train, group, data))
        specialists.append(freeze(train_ce(f"specialist{m}", model, data, spec_train, seed=cfg.seed + 40 + m,
                                           **job.stage_options)))
    teacher = SpecialistEnsemble(generalist, specialists, groups, s.top_k, dustbin_shifts=shifts).eval()
    student = job.distill("student", job.student(), teacher, seed=cfg.seed + 3)
    teacher_logits = predict_logits(teacher, bundle.test)
    models = {"generalist": job.evaluate(generalist),
              "generalist + specialists": job.evaluate(teacher, cost=False)}
    if cfg.baseline:
        models["student, no teacher"] = job.evaluate(job.baseline(), reference_logits=teacher_logits)
    models["student"] = job.evaluate(student, reference_logits=teacher_logits)
    within = {}
    for m, (group, spec) in enumerate(zip(groups, specialists)):
        test = specialist_data(bundle.test, group, bundle.num_classes, dustbin_ratio=0.0)
        logits = predict_logits(spec, test)[:, :len(group)]
        gen_logits = predict_logits(generalist, test)[:, group]
        within[f"specialist{m}"] = {"group": group, "accuracy_within_group": accuracy(logits, test.tensors["y"]),
                                    "generalist_within_group": accuracy(gen_logits, test.tensors["y"])}
    return job.finish(models, groups=groups, dustbin_shifts=shifts, specialists=within)
