"""benchmarks/methods.py --quick: every method row runs through Distiller + Engine and the JSON has the table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "benchmarks" / "methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist missing")
def test_quick_benchmark_runs_every_method_row(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "quick.json"
    bench.main(["--dataset", "fashion_mnist", "--quick", "--json", str(out)])
    result = json.loads(out.read_text())
    expected = ["scratch", "KD", "DKD", "DIST", "FitNet", "AT", "SP", "RKD", "PKT", "CC", "CRD", "KD+CRD"]
    assert result["dataset"] == "fashion_mnist" and 0 <= result["teacher_top1"] <= 1
    assert [r["method"] for r in result["rows"]] == expected
    for row in result["rows"]:
        assert row["failed"] == [], row
        assert 0 <= row["top1_mean"] <= 1 and row["top1_std"] >= 0 and row["ms_per_step"] > 0
        assert len(row["top1_seeds"]) == len(result["seeds"])
    rows = {r["method"]: r for r in result["rows"]}
    # trained-only parameters: FitNet's 1x1 conv adapter (16 -> 64 channels, no bias), CRD's heads; none elsewhere
    assert rows["FitNet"]["train_only_params"] == 16 * 64
    assert rows["CRD"]["train_only_params"] > 0 and rows["KD+CRD"]["train_only_params"] > 0
    assert all(rows[m]["train_only_params"] == 0 for m in ("scratch", "KD", "DKD", "DIST", "AT", "SP", "RKD",
                                                           "PKT", "CC"))
    assert result["compression"] >= 10
    assert result["command"].endswith("--quick --json " + str(out))
    table = capsys.readouterr().out
    assert all(f"| {m} |" in table for m in expected)
