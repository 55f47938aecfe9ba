"""Experiment tracking (`train.log_with`): the trackers get the scalars of metrics.jsonl, per stage."""

import json

import pytest

from conftest import tiny_config
from kdistill.cli import main
from kdistill.config import parse_config
from kdistill.engine.tracking import scalars
from kdistill.errors import ConfigError
from kdistill.tasks import get_task


def test_scalars_of_metrics_records():
    assert scalars({"stage": "s", "step": 10, "lr": 0.1, "loss": 1.5, "terms": {"ce": 1.0, "kd": 0.5}}) == \
        {"loss": 1.5, "lr": 0.1, "terms/ce": 1.0, "terms/kd": 0.5}
    assert scalars({"stage": "s", "step": 20, "eval": {"accuracy": 0.5, "name": "x", "bad": float("nan")}}) == \
        {"eval/accuracy": 0.5}
    assert scalars({"stage": "s", "step": 0, "event": "threads", "threads": 1}) == {}


def test_unknown_or_missing_tracker_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="train.log_with: unknown tracker 'neptune'"):
        parse_config(tiny_config(train={"log_with": "neptune"}))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(tiny_config(train={"log_with": ["mlflow"]})))
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tracker 'mlflow' is not installed; pip install mlflow" in err[0]


def test_tensorboard_events_hold_the_metrics_jsonl_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'kdistill[search]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # scikit-learn's digits: seconds-long (generating mnist1d alone takes ~2 s)
    cfg = parse_config(tiny_config(data={"name": "digits", "train_size": 512, "transfer": {"size": 0}},
                                   teacher={"name": "mlp", "kwargs": {"hidden": [32]}},
                                   baseline=False, train={"log_with": "tensorboard", "eval_every": 10},
                                   eval={"latency_repeats": 1, "throughput_batch": 4, "threads": 1}))
    get_task("classification").run(cfg, tmp_path, progress=False, log=lambda *a: None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for stage in ("teacher", "student"):
        files = list((tmp_path / "tracking" / stage).glob("events.out.tfevents.*"))
        assert len(files) == 1, stage  # one run per stage, no stage writing into another's
        acc = EventAccumulator(str(files[0].parent))
        acc.Reload()
        logged = [r for r in records if r["stage"] == stage and "terms" in r]
        assert logged
        got = {(e.step, round(e.value, 5)) for e in acc.Scalars("loss")}
        assert got == {(r["step"], round(r["loss"], 5)) for r in logged}
        for name in logged[-1]["terms"]:
            values = {e.step: e.value for e in acc.Scalars(f"terms/{name}")}
            assert values[logged[-1]["step"]] == pytest.approx(logged[-1]["terms"][name], rel=1e-6)
        evals = [r for r in records if r["stage"] == stage and "eval" in r]
        assert evals, "eval_every gives evaluation records"
        assert {e.step for e in acc.Scalars("eval/accuracy")} == {r["step"] for r in evals}
