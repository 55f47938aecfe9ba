"""Numbers quoted in docs come from committed results: each table or sentence is re-derived from its JSON."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> dict:
    return json.loads((ROOT / "benchmarks" / "results" / name).read_text())


def test_threads_doc_busy_machine_numbers():
    result = load("busy_machine.json")
    text = " ".join((ROOT / "docs" / "threads.md").read_text().split())
    for load_name, stages in result["step_ms"].items():
        for stage, ms in stages.items():
            chose = result["auto_threads"][load_name][stage]
            row = (f"| {load_name} | {stage} | {ms['auto']:.2f} ms | {ms['1']:.2f} ms | {ms['2']:.2f} ms | "
                   f"{chose} |")
            assert row in text, row
    assert f"{result['auto_vs_best_quiet']:.2f}x slower" in text
    assert f"and {result['auto_vs_best_busy']:.2f}x when it is busy" in text
    assert f"took {result['demo_quiet_s']:.1f} s quiet and {result['demo_busy_s']:.1f} s" in text
    assert f"({result['demo_busy_over_quiet']:.2f}x)" in text
    busy, quiet = result["step_ms"]["busy"], result["step_ms"]["quiet"]
    assert (f"all cores cost {busy['teacher']['2'] / busy['teacher']['1']:.1f}x (teacher) and "
            f"{busy['student']['2'] / busy['student']['1']:.1f}x (student) the 1-thread step time") in text
    assert f"2 threads were {100 * (quiet['teacher']['1'] / quiet['teacher']['2'] - 1):.0f} % faster" in text
    # the acceptance, as measured
    assert result["demo_busy_s"] <= 2.5 * result["demo_quiet_s"]
    assert result["auto_vs_best_quiet"] <= 1.3 and result["auto_vs_best_busy"] <= 1.3
    assert {"git", "command", "torch"} <= set(result) and not result["quick"]


def test_results_doc_busy_demo_sentence():
    result = load("busy_machine.json")
    text = " ".join((ROOT / "docs" / "results.md").read_text().split())
    assert (f"{result['demo_busy_s']:.1f} s against {result['demo_quiet_s']:.1f} s quiet "
            f"({result['demo_busy_over_quiet']:.2f}x)") in text
    assert re.search(r"Wall time (\d+) s on 2 idle cores", text).group(1) == f"{load('demo.json')['wall_seconds']:.0f}"
