import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill.config import TrainConfig
from kdistill.errors import DataError
from kdistill.distiller import Distiller, LiveTeacher, Term
from kdistill.engine import Engine, StepSampler
from kdistill.engine.checkpoint import list_checkpoints

from tests.conftest import blobs, mlp


def test_training_reduces_loss_and_logs_terms(tmp_path):
    data = blobs()
    cfg = TrainConfig(steps=60, batch_size=32, lr=0.01, log_every=20)
    res = Engine(cfg, tmp_path, stage="s", progress=False).fit(Distiller(mlp(), None, [Term("ce", "ce")]), data)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lines = [r for r in lines if r.get("event") != "threads"]
    assert [r["step"] for r in lines] == [20, 40, 60]
    assert lines[-1]["terms"]["ce"] < lines[0]["terms"]["ce"] * 0.5
    assert res["terms"].keys() == {"ce"}


def test_hinton_objective_matches_formula():
    """loss = (1 - alpha) CE(s, y) + alpha T^2 KL(softmax(t/T) || softmax(s/T)), batch mean."""
    alpha, temp = 0.7, 3.0
    student, teacher = mlp(0), mlp(1)
    d = Distiller(student, teacher, [Term("ce", "ce", 1 - alpha), Term("kd", "kd", alpha, params={"temperature": temp})])
    data = blobs(16)
    batch = data.batch(torch.arange(16))
    d.build(batch)
    out = d(batch)
    s = student(batch["x"]).double()
    with torch.no_grad():
        t = teacher(batch["x"]).double()
    p = torch.softmax(t / temp, -1)
    kl = (p * (p.log() - torch.log_softmax(s / temp, -1))).sum(-1).mean()
    expected = (1 - alpha) * F.cross_entropy(s, batch["y"]) + alpha * temp ** 2 * kl
    assert torch.allclose(out.loss.double(), expected, rtol=1e-5)


def test_teacher_is_frozen_eval_and_unchanged(tmp_path):
    teacher = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 3))
    before = copy.deepcopy(teacher.state_dict())
    d = Distiller(mlp(), teacher, [Term("kd", "kd", params={"temperature": 2.0})])
    assert isinstance(d.teacher, LiveTeacher)
    Engine(TrainConfig(steps=10, batch_size=32), None, progress=False).fit(d, blobs())
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])
    # deterministic teacher outputs (dropout off) and no autograd graph
    x = torch.randn(4, 6)
    a, b = d.teacher({"x": x})["logits"], d.teacher({"x": x})["logits"]
    assert torch.equal(a, b) and not a.requires_grad


def test_grad_accumulation_equals_full_batch():
    data = blobs(128)
    results = []
    for accum in (1, 4):
        model = mlp(3)
        cfg = TrainConfig(steps=5, batch_size=32, grad_accum=accum, optimizer="sgd", lr=0.1, momentum=0.0,
                          schedule="constant")
        Engine(cfg, None, progress=False).fit(Distiller(model, None, [Term("ce", "ce")]), data)
        results.append(model.state_dict())
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], atol=1e-6)


def test_clip_and_schedules_run(monkeypatch):
    """The LR the optimizer steps with follows each schedule (multipliers written out here from the documented
    shapes: linear warm-up over 2 steps, then constant / linear / cosine decay over the 4 others; one-cycle warms
    up from 1/25 and decays to 1e-4), and every step's gradient norm is clipped to the limit."""
    cos = [0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75)]
    expected = {"constant": [0.5, 1, 1, 1, 1, 1], "linear": [0.5, 1, 1, 0.75, 0.5, 0.25],
                "cosine": [0.5, 1, *cos], "onecycle": [0.04 + 0.96 * 0.5, 1, *[1e-4 + (1 - 1e-4) * c for c in cos]]}
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append((self.param_groups[0]["lr"], float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    for schedule, multipliers in expected.items():
        seen.clear()
        cfg = TrainConfig(steps=6, batch_size=16, lr=0.02, schedule=schedule, warmup_steps=2, clip_grad_norm=0.05)
        Engine(cfg, None, progress=False).fit(Distiller(mlp(), None, [Term("ce", "ce")]), blobs(64))
        assert [lr for lr, _ in seen] == pytest.approx([0.02 * m for m in multipliers], rel=1e-6), schedule
        norms = [n for _, n in seen]
        assert max(norms) <= 0.05 * (1 + 1e-4), schedule
        assert max(norms) == pytest.approx(0.05, rel=1e-3), schedule    # clipping was active (raw norms exceed it)


def test_sampler_is_a_pure_function_of_step():
    a = StepSampler(100, 10, seed=3)
    b = StepSampler(100, 10, seed=3)
    assert torch.equal(a.indices(37), b.indices(37))
    epoch = torch.cat([a.indices(s) for s in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))
    ranks = [StepSampler(100, 10, seed=3, rank=r, world_size=2) for r in (0, 1)]
    both = torch.cat([r.indices(0) for r in ranks])
    assert len(set(both.tolist())) == 20


def test_length_grouped_sampler_keeps_epochs_and_groups_lengths():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 65, (1000,), generator=g)
    grouped = StepSampler(1000, 8, seed=3, lengths=lengths)
    plain = StepSampler(1000, 8, seed=3)
    steps = grouped.steps_per_epoch
    epoch = torch.cat([grouped.indices(s) for s in range(steps)])
    assert sorted(epoch.tolist()) == sorted(plain._permutation(0)[:steps * 8].tolist())  # same rows per epoch
    assert torch.equal(grouped.indices(7), StepSampler(1000, 8, seed=3, lengths=lengths).indices(7))  # pure
    assert not torch.equal(epoch, torch.cat([grouped.indices(steps + s) for s in range(steps)]))    # reshuffled

    def padded(sampler):  # mean padded length of a batch: what the model computes
        return sum(int(lengths[sampler.indices(s)].max()) for s in range(steps)) / steps
    assert padded(grouped) < 0.7 * padded(plain)
    # batch order is shuffled, not sorted longest-first across the epoch
    maxima = [int(lengths[grouped.indices(s)].max()) for s in range(steps)]
    assert maxima != sorted(maxima, reverse=True)


def test_group_by_length_needs_an_attention_mask(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=32, group_by_length=True)
    with pytest.raises(DataError, match="attention_mask"):
        Engine(cfg, tmp_path, progress=False).fit(Distiller(mlp(), None, [Term("ce", "ce")]), blobs())


def test_interrupted_run_resumes_to_same_weights(tmp_path):
    """A stage stopped after a checkpoint and run again ends where an uninterrupted run ends."""
    data = blobs()
    cfg = TrainConfig(steps=40, batch_size=32, checkpoint_every=10, log_every=10)
    full = mlp(1)
    Engine(cfg, tmp_path / "a", progress=False, seed=5).fit(Distiller(full, None, [Term("ce", "ce")]), data)
    # first half: same run cut at step 20 (a config with 20 steps would change the LR schedule, so stop by signal)
    part = mlp(1)
    d = Distiller(part, None, [Term("ce", "ce")])
    eng = Engine(cfg, tmp_path / "b", progress=False, seed=5)
    from kdistill.engine import Interrupted
    from kdistill.engine.metrics import MetricsLog

    original = MetricsLog.write

    def stop_at_20(self, record):
        original(self, record)
        if record.get("step") == 20:
            import os
            import signal
            os.kill(os.getpid(), signal.SIGTERM)

    MetricsLog.write = stop_at_20
    try:
        with pytest.raises(Interrupted, match="resume"):
            eng.fit(d, data)
    finally:
        MetricsLog.write = original
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints" / "student")][-1] == "step-00000020"
    resumed = mlp(99)  # different init: everything must come from the checkpoint
    res = Engine(cfg, tmp_path / "b", progress=False, seed=5).fit(Distiller(resumed, None, [Term("ce", "ce")]), data)
    assert res["resumed_from"] == 20
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_checkpoint_state_loads_with_weights_only(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=16, checkpoint_every=2)
    Engine(cfg, tmp_path, progress=False).fit(Distiller(mlp(), None, [Term("ce", "ce")]), blobs(64))
    ckpt = list_checkpoints(tmp_path / "checkpoints" / "student")[-1]
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["step"] == 4 and "optimizer" in state and "scheduler" in state
    rng = torch.load(ckpt / "rng-rank0.pt", weights_only=True)
    assert {"torch", "numpy_keys", "python_state"} <= set(rng)
