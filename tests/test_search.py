"""`kdistill search`: the search section's checks, a resumable SQLite study of real tiny runs, parallel workers on
one storage, constraints that keep a trial from being best, and best.yaml reproducing the best trial."""

import dataclasses
import json

import pytest
import yaml

from conftest import tiny_config
from kdistill.cli import main
from kdistill.search.config import parse_constraint
from kdistill.search.results import pick_best
from kdistill.search.space import assign

optuna = pytest.importorskip("optuna", reason="kdistill search needs optuna (pip install 'kdistill[search]')")


def search_config(**search):
    """conftest's tiny config on scikit-learn's digits (generating mnist1d costs ~2 s in every trial process)."""
    cfg = tiny_config(data={"name": "digits", "train_size": 512, "transfer": {"size": 0}},
                      teacher={"name": "mlp", "kwargs": {"hidden": [32]},
                               "train": {"steps": 10, "batch_size": 64, "log_every": 10}},
                      train={"steps": 10, "batch_size": 64, "log_every": 10, "threads": 1},
                      eval={"latency_repeats": 1, "throughput_batch": 4})
    cfg["search"] = {"space": {"distill.temperature": {"low": 1, "high": 8, "log": True},
                               "student.kwargs.hidden": {"choices": [[4], [64]]}},
                     "constraints": ["params<=1000"], **search}
    return cfg


def write(tmp_path, cfg, name="search.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("change, message", [
    ({"space": {"distill.temprature": {"low": 1, "high": 2}}}, "search.space.distill.temprature: 'distill.temprature'"
                                                               " is not a config field"),
    ({"space": {"distill.alpha": {"low": 0.9, "high": 0.1}}}, "low 0.9 > high 0.1"),
    ({"space": {"distill.alpha": {"low": 0.5, "high": 1.5}}}, "search.space.distill.alpha = 1.5: distill.alpha"),
    ({"space": {"compress.prune.target": {"low": 0.2, "high": 0.5}}}, "no item of compress is a 'prune'"),
    ({"objectives": ["top1", "speed"]}, "unknown objective 'speed'"),
    ({"constraints": ["latency_ms<2"]}, "expected METRIC<=NUMBER or METRIC>=NUMBER"),
])
def test_bad_search_sections_are_one_line_exit_2(tmp_path, capsys, change, message):
    path = write(tmp_path, {**search_config(), "search": {**search_config()["search"], **change}})
    assert main(["search", str(path), "--trials", "2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "trials").exists()


@pytest.mark.parametrize("args, message", [
    (["--constraint", "latency<=2"], "unknown metric 'latency'"),
    (["--constraint", "bytes=<5"], "expected METRIC<=NUMBER"),
    (["--storage", "postgresql://db/x"], "only SQLite storage files are supported"),
    (["--storage", "sqlite:///:memory:"], "only SQLite storage files are supported"),
])
def test_bad_command_line_is_one_line_exit_2(tmp_path, capsys, args, message):
    path = write(tmp_path, search_config())
    assert main(["search", str(path), "--trials", "2", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_space_paths_reach_list_sections_by_kind():
    raw = {"compress": ["low_rank", {"prune": {"target": 0.5}}, "prune"]}
    out = assign(raw, {"compress.prune.target": 0.3, "compress.2.prune.target": 0.7, "distill.alpha": 0.2})
    assert out["compress"][1] == {"prune": {"target": 0.3}} and out["compress"][2] == {"prune": {"target": 0.7}}
    assert out["distill"] == {"alpha": 0.2} and raw["compress"][2] == "prune"  # the input is not changed


def test_latency_objective_and_constraints_measure_the_onnx_export(tmp_path):
    from kdistill.search.plan import make_plan

    cfg = search_config(objectives=["top1", "latency_ms"])
    plan, _ = make_plan(write(tmp_path, cfg), tmp_path / "out", constraints=["bytes<=200000"])
    assert plan.base["export"] == {"format": "onnx"} and plan.base["eval"]["threads"] == 1
    assert [str(c) for c in plan.constraints] == ["params<=1000", "bytes<=200000"]
    assert plan.base["baseline"] is False and "search" not in plan.base
    assert parse_constraint("top1 >= 0.5").violation(0.75) == pytest.approx(-0.25)


def test_constraint_violation_excludes_a_better_trial_from_best():
    def trial(n, top1, latency, feasible, state="COMPLETE"):
        return {"number": n, "state": state, "feasible": feasible, "metrics": {"top1": top1, "latency_ms": latency}}

    trials = [trial(0, 0.9, 1.0, False), trial(1, 0.8, 2.0, True), trial(2, 0.8, 1.5, True),
              trial(3, 0.95, 0.1, False, "FAIL")]
    assert pick_best(trials, ["top1"])["number"] == 1  # tie on top1: the lower trial number
    assert pick_best(trials, ["top1", "latency_ms"])["number"] == 2  # tie on top1: the lower latency
    assert pick_best([trials[0]], ["top1"]) is None


def test_parallel_and_resumed_workers_never_share_a_sampler_seed():
    """Worker 0 starting after worker 1's first trial (held 1) must not draw worker 1's random trials (held 0)."""
    from kdistill.search.trials import worker_offset

    offsets = [worker_offset(w, held) for w in range(8) for held in range(200)]
    assert len(set(offsets)) == len(offsets) and worker_offset(0, 1) != worker_offset(1, 0)


def test_search_resumes_with_workers_on_one_storage_and_best_reproduces(tmp_path, monkeypatch):
    import kdistill.tasks as tasks

    path = write(tmp_path, search_config())
    out = tmp_path / "out"
    real_get_task = tasks.get_task
    calls = []

    def killing(kill_at):
        task = real_get_task("classification")

        def run(cfg, run_dir, **options):
            calls.append(run_dir.name)
            if len(calls) == kill_at:
                (run_dir / "partial").mkdir(parents=True)
                raise KeyboardInterrupt  # a kill in the middle of a trial
            return task.run(cfg, run_dir, **options)

        return lambda name: dataclasses.replace(task, run=run)

    from kdistill.search import search

    monkeypatch.setattr(tasks, "get_task", killing(kill_at=2))
    with pytest.raises(KeyboardInterrupt):
        search(path, trials=2, out=out, log=lambda *a: None)
    study = optuna.load_study(study_name="kdistill", storage=f"sqlite:///{out / 'search.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    done_before = (out / "trials" / "0000" / "summary.json").stat().st_mtime_ns

    # resumed by two worker processes on the same storage: the finished trial is kept (not run again), the killed
    # one re-queued (same values, its run directory), one more run; exactly 3 finished trials, none repeated
    monkeypatch.setattr(tasks, "get_task", real_get_task)
    assert main(["search", str(path), "--trials", "3", "--jobs", "2", "--out", str(out)]) == 0
    record = json.loads((out / "search.json").read_text())
    states = {t["number"]: t["state"] for t in record["trials"]}
    assert states == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE", 3: "COMPLETE"}
    by_number = {t["number"]: t for t in record["trials"]}
    assert by_number[2]["values"] == by_number[1]["values"] and by_number[2]["requeued_from"] == 1
    assert by_number[2]["run_dir"].endswith("0001") and (out / "trials" / "0001" / "partial").is_dir()
    assert (out / "trials" / "0000" / "summary.json").stat().st_mtime_ns == done_before
    assert {by_number[n]["worker"] for n in (2, 3)} <= {0, 1} and by_number[0]["worker"] == 0
    done = [t for t in record["trials"] if t["state"] == "COMPLETE"]
    assert len({t["run_dir"] for t in done}) == 3 and list(out.glob("*.db")) == [out / "search.db"]
    # the teacher was trained once and every trial read its weights
    assert (out / "teacher" / "teacher.safetensors").is_file()
    assert not list((out / "trials").glob("*/teacher.safetensors"))

    # the constraint keeps the wide student out of the best and the Pareto front
    best = record["best"]
    assert best["values"]["student.kwargs.hidden"] == [4] and best["feasible"]
    infeasible = {t["number"] for t in done if t["values"]["student.kwargs.hidden"] == [64]}
    assert all(t["feasible"] == (t["number"] not in infeasible) for t in done)
    assert not infeasible & set(record["pareto"])
    assert best["metrics"]["top1"] == max(t["metrics"]["top1"] for t in done if t["feasible"])
    page = (out / "report.html").read_text()
    assert "Best configuration" in page and f"trial {best['number']}" in page

    # best.yaml reproduces the best trial's metric
    assert main(["run", str(out / "best.yaml"), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["student"]["accuracy"] == pytest.approx(best["metrics"]["top1"], abs=1e-9)


def test_docs_quote_the_committed_benchmark():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "benchmarks" / "results" / "search.json").read_text())
    text = " ".join((root / "docs" / "search.md").read_text().split())
    for key, scale, fmt in (("default_top1", 100, ".2f"), ("best_top1", 100, ".2f"),
                            ("default_latency_ms", 1, ".4f"), ("best_latency_ms", 1, ".4f")):
        s = result[key]
        assert f"{scale * s['mean']:{fmt}} ± {scale * s['std']:{fmt}}" in text, key
    assert f"latency_ms<={result['constraint_latency_ms']}" in text
    assert f"+{result['best_minus_default_points']:.2f} points" in text
    assert f"{result['trials']} finished trials, {result['feasible_trials']} feasible" in text
    assert f"trial {result['best_trial']['number']}" in text and result["git_revision"][:7] in text
    assert len(result["seeds"]) >= 3 and result["dataset"] == "fashion_mnist"
    # the acceptance: 20 trials under the latency limit; the best beats the default and meets the limit
    assert result["trials"] >= 20 and result["best_top1"]["mean"] > result["default_top1"]["mean"]
    assert all(result["best_meets_constraint"]) and len(result["best_meets_constraint"]) == len(result["seeds"])
    readme = " ".join((root / "README.md").read_text().split())
    meets = sum(result["best_meets_constraint"])
    assert (f"{result['trials']} trials under a batch-1 latency limit of {result['constraint_latency_ms']} ms found "
            f"settings that beat the defaults by +{result['best_minus_default_points']:.2f} points "
            f"({100 * result['best_top1']['mean']:.2f} % vs {100 * result['default_top1']['mean']:.2f} %, "
            f"{len(result['seeds'])} seeds") in readme
    assert f"meet the limit in {meets} of {len(result['seeds'])} re-measurements" in readme
