"""Cost measurement that holds on a busy machine: fixed, recorded thread counts (1 and all cores), warm-up,
models timed interleaved in rounds, median and spread recorded, one warning line when the spread is large;
`kdistill eval` writes its measurement next to the run's summary.json instead of over it. No timing is asserted."""

import json

import pytest
import torch
import yaml
from torch import nn

from kdistill.cli import main
from kdistill.evaluate import cost as cost_mod
from kdistill.evaluate.cost import measure_cost, measurement_threads, round_ratio, spread
from tests.conftest import tiny_config


class Recorder(nn.Module):
    """A linear model that logs (its name, torch's thread count) at every forward."""

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log, self.lin = name, log, nn.Linear(4, 3)

    def forward(self, x):
        self.log.append((self.name, torch.get_num_threads()))
        return self.lin(x)


def test_auto_measures_at_one_thread_and_all_cores(monkeypatch):
    monkeypatch.setattr(cost_mod.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert measurement_threads("auto") == [1, 3] and measurement_threads(2) == [2]
    monkeypatch.setattr(cost_mod.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert measurement_threads("auto") == [1]


def test_each_count_is_fixed_recorded_and_the_caller_count_restored(monkeypatch):
    monkeypatch.setattr(cost_mod, "measurement_threads", lambda setting: [1, 2])
    before = torch.get_num_threads()
    log = []
    cost = measure_cost({"teacher": Recorder("teacher", log), "student": Recorder("student", log)},
                        torch.randn(1, 4), latency_repeats=6, throughput_batch=4, throughput_repeats=3)
    assert torch.get_num_threads() == before
    assert cost["threads"] == [1, 2] and cost["primary_threads"] == 1 and set(cost["by_threads"]) == {"1", "2"}
    calls = len(log) // 2
    assert {t for _, t in log[:calls]} == {1} and {t for _, t in log[calls:]} == {2}
    for at in cost["by_threads"].values():
        for row in at.values():
            assert len(row["latency_ms_rounds"]) == 6 and len(row["throughput_rounds"]) == 3
            assert row["latency_ms"] > 0 and row["latency_spread"] >= 0 and row["throughput"] > 0


def test_models_are_timed_in_turn_with_a_rotating_order():
    log = []
    models = {name: Recorder(name, log) for name in ("a", "b", "c")}
    times = cost_mod.timed_rounds(models, torch.randn(1, 4), repeats=3, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    names = [n for n, _ in log]
    assert names[:3] == ["a", "b", "c"]  # the warm-up, one call each
    assert names[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # one call per model per round


def test_spread_ignores_one_extreme_round_and_ratios_go_round_by_round():
    assert spread([1.0]) == 0
    assert spread([1.0, 1.5]) == pytest.approx(0.5 / 1.25)
    assert spread([1.0, 1.0, 1.1, 1.0, 50.0]) == pytest.approx(0.1)
    cost = {"by_threads": {"1": {"t": {"latency_ms_rounds": [10.0, 40.0, 12.0]},
                                 "s": {"latency_ms_rounds": [1.0, 4.0, 1.2]}}}}
    assert round_ratio(cost, "t", "s", 1) == {"ratio": pytest.approx(10.0), "spread": pytest.approx(0.0)}


def test_large_spread_gives_one_warning_line(monkeypatch):
    rounds = {"1": iter([{"m": [0.001, 0.004, 0.001]}, {"m": [0.1, 0.1, 0.1]}])}
    monkeypatch.setattr(cost_mod, "measurement_threads", lambda setting: [1])
    monkeypatch.setattr(cost_mod, "timed_rounds", lambda models, x, **kw: next(rounds["1"]))
    cost = measure_cost({"m": nn.Linear(4, 3)}, torch.randn(1, 4), throughput_batch=2)
    assert cost["by_threads"]["1"]["m"]["latency_spread"] == pytest.approx(3.0)
    assert len(cost["warnings"]) == 1
    assert "m latency at 1 thread(s), 300%" in cost["warnings"][0] and "vary more than 25%" in cost["warnings"][0]
    steady = {"1": iter([{"m": [0.001] * 3}, {"m": [0.1] * 3}])}
    monkeypatch.setattr(cost_mod, "timed_rounds", lambda models, x, **kw: next(steady["1"]))
    assert measure_cost({"m": nn.Linear(4, 3)}, torch.randn(1, 4), throughput_batch=2)["warnings"] == []


def test_eval_writes_a_new_file_and_leaves_summary_json_alone(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(eval={"latency_repeats": 3, "throughput_batch": 8, "threads": 1})))
    run = tmp_path / "run"
    assert main(["run", str(path), "--out", str(run), "--no-progress"]) == 0
    summary_bytes = (run / "summary.json").read_bytes()
    summary = json.loads(summary_bytes)
    assert summary["cost"]["threads"] == [1] and summary["cost"]["primary_threads"] == 1
    assert summary["teacher"]["cost_threads"] == 1 and "latency_spread" in summary["student"]
    assert summary["speedup"] == summary["cost"]["speedup_by_threads"]["1"]["ratio"]
    assert set(summary["train_threads"]) == {"teacher", "baseline", "student"}
    assert main(["eval", str(run)]) == 0 and main(["eval", str(run)]) == 0
    capsys.readouterr()
    assert (run / "summary.json").read_bytes() == summary_bytes
    evals = sorted(run.glob("eval-*.json"))
    assert len(evals) == 2
    measured = json.loads(evals[0].read_text())
    assert measured["cost"]["threads"] == [1] and measured["student"]["accuracy"] == summary["student"]["accuracy"]
