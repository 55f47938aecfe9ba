"""benchmarks/methods.py, run as a script: --quick trains every method row through Distiller + Engine and the
JSON has the table; --describe-methods lists each preset's loss terms (no test imports a benchmark script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "methods.py"


def bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist missing")
def test_quick_benchmark_runs_every_method_row(tmp_path):
    out = tmp_path / "quick.json"
    done = bench("--dataset", "fashion_mnist", "--quick", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    expected = ["scratch", "KD", "DKD", "DIST", "FitNet", "AT", "SP", "RKD", "PKT", "CC", "CRD", "KD+CRD"]
    assert result["dataset"] == "fashion_mnist" and 0 <= result["teacher_top1"] <= 1
    assert [r["method"] for r in result["rows"]] == expected
    for row in result["rows"]:
        assert row["failed"] == [], row
        assert 0 <= row["top1_mean"] <= 1 and row["top1_std"] >= 0 and row["ms_per_step"] > 0
        assert len(row["top1_seeds"]) == len(result["seeds"])
    rows = {r["method"]: r for r in result["rows"]}
    # trained-only parameters: FitNet's 1x1 conv adapter (16 -> 128 channels, no bias), CRD's heads; none elsewhere
    assert rows["FitNet"]["train_only_params"] == 16 * 128
    assert rows["CRD"]["train_only_params"] > 0 and rows["KD+CRD"]["train_only_params"] > 0
    assert all(rows[m]["train_only_params"] == 0 for m in ("scratch", "KD", "DKD", "DIST", "AT", "SP", "RKD",
                                                           "PKT", "CC"))
    assert 10 <= result["compression"] <= 25  # a sensible student: 10-25x fewer parameters than the teacher
    for row in result["rows"]:  # the 95 % interval contains the mean; every run has its held-out curve
        assert row["ci95"][0] <= row["top1_mean"] <= row["ci95"][1]
        assert all(curve[-1][0] == result["train"]["steps"] for curve in row["heldout_curves"])
    conv = result["convergence"]
    assert conv["double_steps"] == 2 * result["train"]["steps"] and result["scratch_converged"] == conv["converged"]
    assert conv["converged"] == (conv["gain_points"] < 0.5)
    assert result["git_revision"] and result["environment"]["threads"] == 1 and result["setting"] == "full labels"
    assert result["preset"] == "imagenet"  # Fashion-MNIST's default: the papers' T = 1 settings
    assert rows["KD"]["setting"] == "0.5 CE + 0.5 KD, T=1"
    assert result["command"].endswith("--quick --json " + str(out))
    assert result["teacher"]["tap_shapes"] == {"feat": [128, 7, 7], "emb": [128, 1, 1], "logits": [10]}
    assert all(f"| {m} |" in done.stdout for m in expected)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist missing")
def test_few_labels_table_trains_scratch_on_the_labelled_rows_only(tmp_path):
    out = tmp_path / "few.json"
    done = bench("--dataset", "fashion_mnist", "--quick", "--labels", "1000", "--methods", "scratch", "KD",
                 "--no-convergence-check", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    # --quick keeps 32 labels of 256 training rows (64 more are held out); KD reads all 256, scratch the 32
    assert result["labels"] == 32 and result["setting"].startswith("32 labels")
    assert rows["scratch"]["trained_rows"] == 32 and rows["KD"]["trained_rows"] == 256
    assert result["scratch_converged"] is None and result["convergence"] is None
    assert not out.with_suffix(".partial.json").exists()


def _temperatures(terms):
    # CRD's contrastive temperature (0.07) is not a softmax temperature of the logits
    return {t["name"]: t["params"]["temperature"] for t in terms if "temperature" in t["params"] and t["loss"] != "crd"}


def test_presets_change_only_the_temperature_rows():
    done = bench("--describe-methods")
    assert done.returncode == 0, done.stderr[-2000:]
    described = json.loads(done.stdout)
    cifar, imagenet = described["presets"]["cifar100"], described["presets"]["imagenet"]
    assert list(cifar) == list(imagenet)
    response = {"KD", "DKD", "DIST", "KD+CRD"}
    for name in cifar:
        same = cifar[name]["terms"] == imagenet[name]["terms"]
        assert same == (name not in response), name
    assert all(set(_temperatures(cifar[n]["terms"]).values()) == {4.0} for n in response)
    assert all(set(_temperatures(imagenet[n]["terms"]).values()) == {1.0} for n in response)
    kd = {t["name"]: t["weight"] for t in imagenet["KD"]["terms"]}
    assert kd == {"ce": 0.5, "kd": 0.5}
    dkd = [t for t in imagenet["DKD"]["terms"] if t["name"] == "dkd"][0]
    assert dkd["params"]["beta"] == 0.5 and dkd["warmup_steps"] == 12
    assert described["default_preset"] == {"fashion_mnist": "imagenet", "mnist1d": "cifar100"}
    refused = bench("--describe-methods", "--preset", "cifar10")
    assert refused.returncode == 2 and "invalid choice" in refused.stderr
