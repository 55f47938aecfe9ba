"""The demo's claims: the README's (and demo.py's) stated sizes and ratios are what the demo config builds
(parameters and FLOPs measured here, no timing), and the README's accuracies are the committed measurement
(benchmarks/results/demo.json, made from this very config) which meets the demo's promises."""

import json
import re
from pathlib import Path

import pytest
import torch

from kdistill import demo
from kdistill.demo import DEMO_CONFIG
from kdistill.evaluate import flops_per_sample, param_count
from kdistill.models import build_model

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "demo.json"


def demo_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## What `make demo` does")
    return " ".join(text[start:text.index("\n## ", start + 1)].split())   # line breaks as spaces


@pytest.fixture(scope="module")
def measured():
    sizes = {}
    for role in ("teacher", "student"):
        spec = DEMO_CONFIG[role]
        model = build_model(spec["name"], spec["kwargs"], input_shape=(40,), num_classes=10)
        sizes[role] = (param_count(model), flops_per_sample(model, torch.zeros(1, 40)))
    return sizes


def k(n: int) -> str:
    return f"{n / 1000:.1f}k"


def test_the_student_is_over_ten_times_smaller_in_parameters_and_flops(measured):
    (tp, tf), (sp, sf) = measured["teacher"], measured["student"]
    assert tp / sp >= 10 and tf / sf >= 10


def test_readme_and_demo_docstring_state_the_measured_sizes_and_ratios(measured):
    (tp, tf), (sp, sf) = measured["teacher"], measured["student"]
    section = demo_section()
    teacher = re.search(r"(\d+\.\dk) parameters, (\d+\.\d+)M FLOPs", section)
    assert teacher and teacher.groups() == (k(tp), f"{tf / 1e6:.2f}")
    student = re.search(r"(\d+\.\dk) parameters, (\d+\.\dk) FLOPs; (\d+\.\d)x fewer parameters, "
                        r"(\d+\.\d)x fewer FLOPs", section)
    assert student and student.groups() == (k(sp), k(sf), f"{tp / sp:.1f}", f"{tf / sf:.1f}")
    doc = " ".join(demo.__doc__.split())
    assert f"{k(tp)} parameters, {tf / 1e6:.2f}M FLOPs" in doc
    assert f"{k(sp)} parameters and {sf / 1000:.0f}k FLOPs, {tp / sp:.0f}x and {tf / sf:.0f}x" in doc


def test_readme_accuracies_come_from_the_committed_demo_measurement(measured):
    result = json.loads(RESULT.read_text())
    assert result["config"] == DEMO_CONFIG                   # measured with this very config
    assert {"git_revision", "command", "torch", "threads"} <= set(result)
    models = result["models"]
    assert (models["teacher"]["params"], models["teacher"]["flops"]) == measured["teacher"]
    assert (models["student"]["params"], models["student"]["flops"]) == measured["student"]
    t, b, s = (100 * models[m]["accuracy"] for m in ("teacher", "baseline", "student"))
    stated = re.search(r"teacher (\d+\.\d) %, baseline (\d+\.\d) %, student with KD (\d+\.\d) % \(retention "
                       r"(\d\.\d{3}), KD - baseline \+(\d+\.\d) points\) in (\d+) s", demo_section())
    assert stated, "the README's demo section must state the measured accuracies"
    assert stated.groups() == (f"{t:.1f}", f"{b:.1f}", f"{s:.1f}", f"{result['retention']:.3f}",
                               f"{result['kd_minus_scratch_points']:.1f}", f"{result['wall_seconds']:.0f}")
    # the demo's promises, as measured
    assert result["retention"] >= 0.95 and result["kd_minus_scratch_points"] >= 5
    assert result["param_ratio"] >= 10 and result["flops_ratio"] >= 10
