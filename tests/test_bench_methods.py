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
    assert result["preset"] == "imagenet"  # Fashion-MNIST's default: the papers' T = 1 settings
    assert rows["KD"]["setting"] == "0.5 CE + 0.5 KD, T=1"
    assert result["command"].endswith("--quick --json " + str(out))
    table = capsys.readouterr().out
    assert all(f"| {m} |" in table for m in expected)


def _temperatures(method, steps=1200):
    # CRD's contrastive temperature (0.07) is not a softmax temperature of the logits
    return {t.name: t.params["temperature"] for t in method.terms(steps)
            if "temperature" in t.params and t.loss != "crd"}


def test_presets_change_only_the_temperature_rows():
    bench = load_bench()
    cifar = {m.name: m for m in bench.build_methods("cifar100")}
    imagenet = {m.name: m for m in bench.build_methods("imagenet")}
    assert list(cifar) == list(imagenet)
    response = {"KD", "DKD", "DIST", "KD+CRD"}
    for name in cifar:
        a, b = cifar[name].terms(1200), imagenet[name].terms(1200)
        same = [(t.name, t.loss, t.weight, t.params, t.warmup_steps) for t in a] == \
               [(t.name, t.loss, t.weight, t.params, t.warmup_steps) for t in b]
        assert same == (name not in response), name
    assert all(set(_temperatures(cifar[n]).values()) == {4.0} for n in response)
    assert all(set(_temperatures(imagenet[n]).values()) == {1.0} for n in response)
    kd = {t.name: t.weight for t in imagenet["KD"].terms(1200)}
    assert kd == {"ce": 0.5, "kd": 0.5}
    dkd = [t for t in imagenet["DKD"].terms(1200) if t.name == "dkd"][0]
    assert dkd.params["beta"] == 0.5 and dkd.warmup_steps == 12
    assert bench.SETUPS["fashion_mnist"].preset == "imagenet" and bench.SETUPS["mnist1d"].preset == "cifar100"
    with pytest.raises(ValueError, match="unknown preset"):
        bench.build_methods("cifar10")
