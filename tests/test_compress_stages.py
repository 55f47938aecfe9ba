"""The compress and export stages of a classification run: every stage runs, resumes after a kill, is loaded when
done; the exported models match PyTorch; the summary's deployed rows; bad inputs are one line and exit 2."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason="the deploy extra (pip install 'kdistill[deploy]') is not installed")
pytest.importorskip("torch_pruning", reason="the deploy extra (pip install 'kdistill[deploy]') is not installed")
pytest.importorskip("torchao", reason="the deploy extra (pip install 'kdistill[deploy]') is not installed")

from tests.reliability_support import (config, leftovers, run_inprocess, run_subprocess, write_config,  # noqa: E402
                                       write_idx_dataset)

RECOVERY = {"steps": 8, "lr": 0.001}
COMPRESS = [{"prune": {"target": 0.5, "recovery": RECOVERY}},
            {"low_rank": {"energy": 0.8, "recovery": RECOVERY}},
            {"quantize": {"mode": "qat", "calibration_batches": 2, "recovery": RECOVERY}}]


def compress_config(root: Path, **over) -> dict:
    cfg = config(root, baseline=False, student={"name": "tests.reliability_models:mlp",
                                                "kwargs": {"hidden": [64, 32]}},
                 train={"steps": 30, "batch_size": 32, "log_every": 1, "checkpoint_every": 4})
    cfg["compress"] = COMPRESS
    cfg["export"] = {"int8": ["dynamic", "static"], "calibration_batches": 2, "parity_batches": 2}
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_idx_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """One run with prune -> low_rank -> quantize (QAT) and an fp32 + int8 export, run once uninterrupted."""
    folder = tmp_path_factory.mktemp("compress")
    cfg = write_config(folder, compress_config(data))
    from kdistill.cli import main
    from tests import reliability_models

    reliability_models.reset_counts()
    assert main(["run", str(cfg), "--out", str(folder / "run"), "--no-progress"]) == 0
    return folder / "run"


def test_every_stage_leaves_its_files_and_a_deployed_row(finished):
    run = finished
    for name in ("prune", "low_rank"):
        for suffix in (".arch.json", ".init.safetensors", ".json", ".safetensors", ".safetensors.sha256"):
            assert (run / f"{name}{suffix}").is_file(), f"{name}{suffix}"
        assert (run / "checkpoints" / name).is_dir()
    for f in ("quantize.int8.onnx", "quantize.json", "quantize.safetensors", "low_rank.onnx",
              "low_rank.int8-dynamic.onnx", "low_rank.int8-static.onnx"):
        assert (run / f).is_file(), f
    assert leftovers(run) == [] and not list(run.glob("*.tmp.onnx*"))
    summary = json.loads((run / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["deployed"]}
    assert list(rows) == ["teacher", "student", "prune", "low_rank", "quantize", "low_rank.onnx",
                          "low_rank.int8-dynamic.onnx", "low_rank.int8-static.onnx"]
    for name, row in rows.items():
        assert row["runtime"] == ("torch" if name in ("teacher", "student", "prune", "low_rank") else "onnxruntime")
        assert 0 <= row["accuracy"] <= 1 and row["bytes"] > 0
        assert row["latency_ms_b1"] > 0 and row["latency_ms_b32"] > 0 and row["throughput"] > 0
        assert row["batch_sizes"] == [1, 32] and row["threads"] >= 1 and row["by_threads"]
        assert (row["agreement"] is None) == (name == "teacher")
    # pruning removed whole units; the factorized model is smaller again; the int8 file is smaller than fp32
    prune_info = json.loads((run / "prune.json").read_text())
    assert prune_info["params_after"] < prune_info["params_before"]
    assert rows["low_rank.int8-dynamic.onnx"]["bytes"] < rows["low_rank.onnx"]["bytes"]
    assert json.loads((run / "low_rank.onnx.json").read_text())["max_abs_diff"] <= 1e-4


def test_a_rerun_loads_every_finished_stage(finished, capsys):
    code, out, err = run_inprocess(["run", str(finished), "--no-progress"], capsys)
    assert code == 0, err
    for line in ("[prune] done earlier", "[low_rank] done earlier", "[quantize] done earlier",
                 "[prune] transform done earlier"):
        assert line in out, out
    assert "deployed" in out and "quantize" in out


def test_pruned_model_reloads_without_torch_pruning(finished):
    """A fresh process where `import torch_pruning` fails rebuilds the pruned model from its files."""
    import subprocess
    import sys

    from tests.reliability_support import REPO, cli_env

    code = (
        "import sys, torch; sys.modules['torch_pruning'] = None\n"
        "from kdistill.compress.stages import load_stage_model\n"
        "from tests.reliability_models import mlp\n"
        f"m = load_stage_model({str(finished)!r}, 'prune', mlp((1, 28, 28), 10, hidden=[64, 32]))\n"
        "print(sum(p.numel() for p in m.parameters()), tuple(m(torch.zeros(2, 1, 28, 28)).shape))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    params = json.loads((finished / "prune.json").read_text())["params_after"]
    assert out.stdout.split() == [str(params), "(2,", "10)"]


@pytest.mark.parametrize("stage,offset", [("prune", 5), ("low_rank", 8 + 3), ("quantize", 16 + 6)])
def test_each_stage_killed_midway_resumes(tmp_path, data, capsys, stage, offset):
    """SIGTERM at a recovery step of `stage` (the student-role model's training forwards are counted across the
    process: 30 student steps, then 8 per recovery): exit 143 with a checkpoint; the next run resumes it."""
    cfg = write_config(tmp_path, compress_config(data, export=None))
    run = tmp_path / "run"
    proc = run_subprocess("run", cfg, "--out", run, "--no-progress", timeout=300,
                          KDISTILL_TEST_KILL=f"student:{30 + offset}:SIGTERM")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert f"stage '{stage}'" in proc.stderr and "resume with: kdistill run" in proc.stderr
    assert not (run / f"{stage}.safetensors").is_file()
    code, out, err = run_inprocess(["run", str(run), "--no-progress"], capsys)
    assert code == 0, err
    assert f"[{stage}] resumed from" in out, out
    for earlier in ("prune", "low_rank")[:("prune", "low_rank", "quantize").index(stage)]:
        assert f"[{earlier}] done earlier" in out, out
    summary = json.loads((run / "summary.json").read_text())
    assert [r["name"] for r in summary["deployed"]][-1] == "quantize"


def test_bad_prune_target_is_one_line_exit_2(tmp_path, data, capsys):
    cfg = write_config(tmp_path, compress_config(data))
    for bad in ("1.5", "0", "-0.1", "1"):
        code, out, err = run_inprocess(["run", str(cfg), "--out", str(tmp_path / "run"),
                                        "--set", "compress=[{prune: {target: " + bad + "}}]"], capsys)
        assert code == 2 and "Traceback" not in err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "target" in lines[0] and "between 0 and 1" in lines[0], err


def test_export_of_a_run_without_a_student_is_one_line_exit_2(tmp_path, data, capsys):
    cfg = write_config(tmp_path, compress_config(data))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.read_text())
    code, out, err = run_inprocess(["export", str(run), "--int8", "dynamic"], capsys)
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "no distilled student" in lines[0] and "kdistill run" in lines[0], err
    code, out, err = run_inprocess(["export", str(run), "--int8", "int4"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "int8" in err, err


def test_export_command_on_a_finished_run(finished, capsys):
    code, out, err = run_inprocess(["export", str(finished), "--int8", "static"], capsys)
    assert code == 0, err
    assert "low_rank.int8-static.onnx" in out and "quantize" in out
    summary = json.loads((finished / "summary.json").read_text())
    assert "teacher" in summary and summary["deployed"][0]["name"] == "teacher"
