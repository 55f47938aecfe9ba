"""`train.threads`: the setting validates; a number is honoured in every step; `auto` calibrates on the stage's own
steps (no extra step) unless the user fixed the count; the watch warns once and calibrates again when the steps
slow down; a resumed stage keeps its checkpoint's count. No wall-clock time is asserted: step times are fed in."""

import json

import pytest
import torch
import yaml
from torch import nn

from kdistill.cli import main
from kdistill.config import TrainConfig
from kdistill.configbase import validate
from kdistill.data import ArrayDataset
from kdistill.distiller import Distiller, Term
from kdistill.engine import Engine
from kdistill.engine import threads as threads_mod
from kdistill.engine.threads import ThreadControl, stage_threads
from kdistill.errors import ConfigError
from tests.conftest import tiny_config


class ThreadProbe(nn.Module):
    """A small classifier that records torch's thread count at each forward in training mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        self.seen: list[int] = []

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.seen.append(torch.get_num_threads())
        return self.net(x)


def blobs(n=128):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    return ArrayDataset({"x": torch.randn(n, 6, generator=g) + y[:, None].float(), "y": y}, "blobs")


def fit(tmp_path, **train):
    model = ThreadProbe()
    cfg = TrainConfig(**{"steps": 30, "batch_size": 16, "log_every": 10, **train})
    result = Engine(cfg, tmp_path, stage="s", progress=False).fit(Distiller(model, None, [Term("ce", "ce")]), blobs())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return model.seen, result, [r for r in records if r.get("event") == "threads"]


@pytest.fixture
def unset_by_user(monkeypatch):
    """As if the user had fixed nothing: no OMP/MKL variable, torch's count as at import, 2 cores."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads_mod, "_PROCESS_DEFAULT", torch.get_num_threads())
    monkeypatch.setattr(threads_mod, "available_cores", lambda: 2)


@pytest.mark.parametrize("value", [0, -2, "four", "2", True, 1.5, None])
def test_bad_threads_setting_is_one_config_error(value):
    with pytest.raises(ConfigError, match="threads: got .*allowed: 'auto' or a number of threads >= 1"):
        validate(TrainConfig, {"threads": value})
    assert validate(TrainConfig, {}).threads == "auto" and validate(TrainConfig, {"threads": 3}).threads == 3


def test_bad_threads_on_the_command_line_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(train={"threads": 0}, eval={"threads": "many"})))
    assert main(["run", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "threads" in err[0] and "Traceback" not in err[0]


def test_explicit_count_is_honoured_in_every_step_and_restored_after(tmp_path):
    before = torch.get_num_threads()
    seen, result, records = fit(tmp_path, threads=2)
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == before
    assert result["threads"]["mode"] == "fixed" and result["threads"]["threads"] == 2
    assert records[0]["reason"] == "train.threads" and "step_ms" not in records[0]


def test_no_calibration_when_omp_num_threads_is_set(tmp_path, monkeypatch, unset_by_user):
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    seen, result, records = fit(tmp_path)
    assert set(seen) == {torch.get_num_threads()}
    assert result["threads"]["mode"] == "user" and "OMP_NUM_THREADS" in result["threads"]["reason"]
    assert len(records) == 1 and "step_ms" not in records[0] and "OMP_NUM_THREADS" in records[0]["reason"]


def test_no_calibration_after_torch_set_num_threads(tmp_path, monkeypatch, unset_by_user):
    monkeypatch.setattr(threads_mod, "_PROCESS_DEFAULT", torch.get_num_threads() + 1)  # the user changed it
    seen, result, records = fit(tmp_path)
    assert set(seen) == {torch.get_num_threads()}
    assert result["threads"]["mode"] == "user" and "torch.set_num_threads" in records[0]["reason"]


def test_auto_calibrates_on_the_stage_own_steps(tmp_path, monkeypatch, unset_by_user):
    monkeypatch.setattr(ThreadControl, "SLOWER", float("inf"))  # no re-check from a load spike during the test
    monkeypatch.setattr(ThreadControl, "PROBE_SECONDS", float("inf"))
    monkeypatch.setattr(ThreadControl, "CLEAR", float("inf"))  # every calibration step, whatever the load
    start = torch.get_num_threads()
    seen, result, records = fit(tmp_path)
    fixed, _, _ = fit(tmp_path / "fixed", threads=1)
    n = ThreadControl.SAMPLES
    assert len(seen) == len(fixed) == 30  # the calibration steps are training steps, not extra ones
    assert seen[:1 + 2 * n] == [1] + [1, 2] * n  # a warm-up step, then alternating counts
    chosen = result["threads"]["threads"]
    assert chosen in (1, 2) and set(seen[1 + 2 * n:]) == {chosen}
    assert records[0]["mode"] == "auto" and records[0]["step"] == 1 + 2 * n
    assert set(records[0]["step_ms"]) == {"1", "2"} and records[0]["threads"] == chosen
    assert stage_threads(tmp_path / "metrics.jsonl")["s"]["threads"] == chosen
    assert torch.get_num_threads() == start


def test_deterministic_runs_never_change_the_count(tmp_path, unset_by_user):
    seen, result, _ = fit(tmp_path, deterministic=True)
    assert len(set(seen)) == 1 and result["threads"]["mode"] == "left"


def feed(control, times, first_step=0):
    for i, seconds in enumerate(times):
        control.before_step(first_step + i)
        control.after_step(first_step + i, seconds)


def test_calibration_keeps_the_faster_count_and_rechecks_when_steps_slow_down(unset_by_user):
    lines, records = [], []
    control = ThreadControl("auto", stage="teacher", record=records.append, log=lines.append)
    control.begin(0, 1000)
    n = ThreadControl.SAMPLES
    feed(control, [9.0] + [0.010, 0.020] * n)  # warm-up, then 1 thread 10 ms, 2 threads 20 ms
    assert control.count == 1 and torch.get_num_threads() == 1
    assert records[-1]["step_ms"] == {"1": 10.0, "2": 20.0}
    feed(control, [0.010] * ThreadControl.WINDOW)  # steady: nothing happens
    assert not lines and control.plan == []
    feed(control, [0.050] * 4)  # 5x slower: one warning line, then a new calibration
    assert len(lines) == 1 and "5.0x slower" in lines[0] and "competing for the CPU cores" in lines[0]
    assert records[-1]["event"] == "threads_slower" and control.plan == [1, 2] * n
    feed(control, [0.050, 0.030] * n)  # now 2 threads are faster
    assert control.count == 2 and "again" in records[-1]["reason"]
    feed(control, [0.3] * 4)  # slower again: recorded and re-measured, but no second warning line
    assert len(lines) == 1 and records[-1]["event"] == "threads_slower"
    control.close()


def test_a_count_several_times_slower_loses_after_one_step(unset_by_user):
    records = []
    control = ThreadControl("auto", stage="s", record=records.append)
    control.begin(0, 1000)
    feed(control, [0.5, 0.010, 0.400])  # warm-up, 1 thread, 2 threads: no need for more
    assert control.plan == [] and control.count == 1 and torch.get_num_threads() == 1
    assert records[-1]["step"] == 3 and records[-1]["step_ms"] == {"1": 10.0, "2": 400.0}
    control.close()


def test_periodic_probe_measures_the_other_count(unset_by_user):
    now = [0.0]
    control = ThreadControl("auto", stage="s", clock=lambda: now[0])
    control.begin(0, 1000)
    n = ThreadControl.SAMPLES
    feed(control, [1.0] + [0.010, 0.020] * n)  # 1 thread kept
    now[0] = ThreadControl.PROBE_SECONDS + 1
    feed(control, [0.010] * ThreadControl.WINDOW)
    assert control.plan == [2] * ThreadControl.PROBE_STEPS  # the other count gets a few steps
    feed(control, [0.004] * ThreadControl.PROBE_STEPS)  # clearly faster now: calibrate both again
    assert control.plan == [1, 2] * n
    control.close()


def test_user_fixed_count_only_warns(monkeypatch, unset_by_user):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    lines = []
    control = ThreadControl("auto", stage="s", log=lines.append)
    control.begin(0, 1000)
    feed(control, [0.01] * ThreadControl.WINDOW + [0.05] * 4)
    assert len(lines) == 1 and "OMP_NUM_THREADS=2" in lines[0] and "stays" in lines[0]
    assert control.plan == [] and control.mode == "user"
    control.close()


def test_resumed_stage_keeps_the_checkpoint_count_and_writes_no_record(unset_by_user):
    records = []
    control = ThreadControl("auto", stage="s", record=records.append)
    control.begin(12, 100, {"count": 2, "calibrated": True})
    assert control.count == 2 and control.plan == [] and records == []
    assert control.state() == {"count": 2, "mode": "auto", "calibrated": True}
    control.close()


def test_dataloader_workers_and_processes_leave_cores_to_each_other(monkeypatch, unset_by_user):
    monkeypatch.setattr(threads_mod, "available_cores", lambda: 8)
    assert ThreadControl("auto", stage="s", num_workers=3).candidates == [1, 5]
    assert ThreadControl("auto", stage="s", num_workers=20).candidates == [1]
    ddp = ThreadControl("auto", stage="s", world_size=4)
    assert ddp.mode == "fixed" and ddp.count == 2
