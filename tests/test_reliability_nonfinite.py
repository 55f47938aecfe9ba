"""The non-finite guard: a NaN injected into the logits (so every loss term is NaN) or into the gradient alone
(a finite loss) at a known step is reported with the term names and that step; `stop` ends the run without
checkpointing the damaged weights, `skip` drops exactly that optimizer step and trains on."""

from __future__ import annotations

import json

import pytest
import torch

from kdistill.config import TrainConfig
from kdistill.data import ArrayDataset
from kdistill.distiller import Distiller, Term
from kdistill.engine import Engine
from kdistill.engine.checkpoint import list_checkpoints, step_of
from kdistill.errors import NonFiniteError

from tests import reliability_models
from tests.reliability_support import config, run_inprocess, write_config, write_idx_dataset

STEPS, BAD = 12, 7


def blobs(n=96, d=5, classes=3):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(classes, d, generator=g)[y] * 3 + torch.randn(n, d, generator=g)
    return ArrayDataset({"x": x, "y": y}, "blobs")


def distiller():
    torch.manual_seed(0)
    student = reliability_models.mlp((5,), 3, hidden=(8,))
    teacher = reliability_models.mlp((5,), 3, hidden=(8,), role="teacher")
    return Distiller(student, teacher, [Term("ce", "ce", 0.5), Term("kd", "kd", 0.5, params={"temperature": 2.0})])


def fit(run_dir, monkeypatch, fault: str, **train):
    reliability_models.reset_counts()
    monkeypatch.setenv(fault, f"student:{BAD}")
    cfg = TrainConfig(**{"steps": STEPS, "batch_size": 16, "log_every": 4, "checkpoint_every": 2, "lr": 0.01,
                         "keep_checkpoints": 10, **train})
    logs: list[str] = []
    d = distiller()
    result = Engine(cfg, run_dir, progress=False, seed=1, log=logs.append).fit(d, blobs())
    return d, result, logs


def finite_checkpoints(run_dir) -> list[int]:
    """Steps of the checkpoints written, after checking that every one holds finite weights."""
    steps = []
    for ckpt in list_checkpoints(run_dir / "checkpoints" / "student"):
        from safetensors.torch import load_file

        assert all(torch.isfinite(v).all() for v in load_file(ckpt / "model.safetensors").values()), ckpt
        steps.append(step_of(ckpt))
    return steps


def adam_steps(run_dir) -> int:
    state = torch.load(list_checkpoints(run_dir / "checkpoints" / "student")[-1] / "state.pt", weights_only=True)
    return {int(s["step"]) for s in state["optimizer"]["state"].values()}.pop()


@pytest.mark.parametrize("fault, what", [("KDISTILL_TEST_NAN_AT", "loss term(s) ce, kd"),
                                         ("KDISTILL_TEST_NANGRAD_AT", "gradient (the loss terms were finite)")])
def test_stop_reports_terms_and_step_and_never_checkpoints_bad_weights(tmp_path, monkeypatch, fault, what):
    clip = {"clip_grad_norm": 10.0} if "GRAD" in fault else {}  # the gradient norm is then known per step
    with pytest.raises(NonFiniteError) as info:
        fit(tmp_path, monkeypatch, fault, nonfinite="stop", **clip)
    assert str(info.value).startswith(f"non-finite {what} at step {BAD} of stage 'student': ")
    assert finite_checkpoints(tmp_path) == [2, 4, 6]  # the check before checkpoint 8 stopped the run


def test_stop_without_clipping_still_stops_on_a_nan_gradient(tmp_path, monkeypatch):
    """Without clipping the gradient norm is not computed per step: the NaN weights it leaves make the next
    loss NaN, and the run stops at that step's check, before any checkpoint of those weights."""
    with pytest.raises(NonFiniteError, match=f"at step {BAD + 1} of stage 'student'"):
        fit(tmp_path, monkeypatch, "KDISTILL_TEST_NANGRAD_AT", nonfinite="stop")
    assert finite_checkpoints(tmp_path) == [2, 4, 6]


@pytest.mark.parametrize("fault, names, what", [
    ("KDISTILL_TEST_NAN_AT", ["ce", "kd"], "loss term(s) ce, kd"),
    ("KDISTILL_TEST_NANGRAD_AT", ["(gradient)"], "gradient")])
def test_skip_drops_exactly_the_bad_step_and_trains_on(tmp_path, monkeypatch, fault, names, what):
    d, result, logs = fit(tmp_path, monkeypatch, fault, nonfinite="skip")
    assert result["steps"] == STEPS
    assert f"warning: skipped step {BAD} of stage 'student': non-finite {what}" in logs
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skips = [e for e in events if e.get("event") not in (None, "threads")]
    assert skips == [{"stage": "student", "step": BAD, "event": "nonfinite_skip", "terms": names}]
    assert finite_checkpoints(tmp_path) == [2, 4, 6, 8, 10, 12]
    assert adam_steps(tmp_path) == STEPS - 1  # every step but the bad one updated the weights
    assert all(torch.isfinite(p).all() for p in d.student.parameters())


def test_cli_stop_is_one_line_exit_2_naming_term_and_step(tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path, config(write_idx_dataset(tmp_path / "data")))
    monkeypatch.setenv("KDISTILL_TEST_NAN_AT", "student:35")  # 30 baseline steps, then student step 5
    code, out, err = run_inprocess(["run", cfg, "--out", tmp_path / "run", "--no-progress"], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        "kdistill: error: non-finite loss term(s) ce, kd at step 5 of stage 'student': lower the learning rate, "
        "enable clip_grad_norm, check the inputs, or set train.nonfinite: skip"]
    assert not (tmp_path / "run" / "student.safetensors").exists()
