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


def test_compress_doc_numbers():
    result = load("compress.json")
    text = " ".join((ROOT / "docs" / "compress.md").read_text().split())
    assert not result["quick"]
    rev = result["git_revision"]
    assert f"revision `{rev[:7]}{'+uncommitted' if rev.endswith('+uncommitted') else ''}`" in text
    for key, stats in result["rows"].items():
        lo, hi = stats["ci95"]
        assert f"| {stats['mean']:.2f} ± {stats['std']:.2f} | [{lo:.2f}, {hi:.2f}] |" in text, key
    for key in ("qat_int8_minus_fp32", "ptq_static_minus_fp32", "prune_kd_minus_ce", "lowrank_kd_minus_ce",
                "width_minus_depth"):
        s = result[key]
        seeds = ", ".join(f"{v:+.2f}" for v in s["values"])
        assert f"| {s['mean']:+.2f} ± {s['std']:.2f} | [{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}] | {seeds} |" in text
    deploy = result["deploy"]
    for name, t in deploy["timing"]["by_threads"][str(deploy["timing"]["primary_threads"])].items():
        assert (f"| {name} | {deploy['bytes'][name]:,} | {t['latency_ms_b1']:.3f} | {t['latency_ms_b32']:.3f} |"
                in text), name
    for name, w in result["int8_by_width"]["rows"].items():
        assert (f"| cnn2d {name.replace('x', '/')} | {w['params']:,} | {w['bytes_fp32']:,} | {w['bytes_int8']:,} | "
                f"{w['bytes_ratio']:.2f} | {w['latency_ratio_b1']:.2f} | {w['latency_ratio_b32']:.2f} |") in text
    for r in result["minilm"]["rows"]:
        assert (f"| {r['name']} | {r['runtime']} | {r['spearman']:.4f} | {r['bytes']:,} | {r['latency_ms_b1']:.2f} | "
                f"{r['latency_ms_b32']:.1f} |") in text
    assert f"| {result['qat_int8_minus_fp32_points']:+.2f} points | met |" in text
    assert f"| <= 0.3 | {result['int8_bytes_ratio']:.3f} | **missed** |" in text
    assert f"| <= 0.7 | {result['int8_ort_latency_ratio_b32']:.2f} | **missed** |" in text
    ratio = result["pipeline_bytes_ratio_vs_teacher"]
    assert f"| {ratio:.3f} ({1 / ratio:.1f}x fewer) | aim missed |" in text
    assert f"| aim >= 0.97 | {result['pipeline_retention']:.3f} | aim missed |" in text
    assert (f"| {result['pipeline_latency_ratio_vs_teacher_b1']:.2f} and "
            f"{result['pipeline_latency_ratio_vs_teacher_b32']:.2f} |") in text
    assert f"| <= 0.01 | {result['minilm_int8_spearman_drop']:+.4f} | met |" in text
    assert f"at most {max(r['onnx_fp32_max_abs_diff'] for r in result['runs'].values()):.2e}" in text
    assert f"{1 / ratio:.1f}x fewer bytes than the teacher's ONNX file at {100 * result['pipeline_retention']:.1f} %" \
        in text


def test_methods_doc_tables():
    """docs/methods.md's tables and verdicts are `benchmarks/methods_report.py`'s output for the committed JSONs;
    the README's sentence is its headline; the issue's acceptance as measured."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import methods_report as report

    text = (ROOT / "docs" / "methods.md").read_text()
    full, few = load("methods_fashion_mnist.json"), load("methods_fashion_mnist_fewlabels.json")
    for result in (full, few, load("methods_mnist1d.json")):
        assert not result["quick"] and result["git_revision"] and result["command"]
        for block in (report.convergence_sentence(result), report.curve_table(result),
                      report.methods_table(result), report.findings(result)):
            assert block in text, block[:80]
    assert report.orderings_table({"full labels": full, "few labels": few}) in text
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert " ".join(report.headline(full, few).split()) in readme
    assert few["labels"] == 1000 and full["labels"] is None
    assert 10 <= full["compression"] <= 25 and len(full["seeds"]) >= 3
    results_md = (ROOT / "docs" / "results.md").read_text()
    for name, result in (("full labels", full), ("1,000 labels + transfer set", few)):
        kd, scratch = report.row_of(result, "KD"), report.row_of(result, "scratch")
        assert f"{name} KD {100 * kd['top1_mean']:.2f} vs scratch {100 * scratch['top1_mean']:.2f}" in results_md


def test_audit_doc_numbers():
    """docs/audit.md's benchmark tables and sentences are benchmarks/results/audit.json's numbers."""
    r = load("audit.json")
    text = " ".join((ROOT / "docs" / "audit.md").read_text().split())
    n, c, d = r["backdoor_seeds"], r["clean_seeds"], r["by_detector"]
    labels = {"strip": "strip (the default verdict)", "neural_cleanse": "neural_cleanse", "either": "either",
              "both": "both"}
    for rule, label in labels.items():
        b = r["by_rule"][rule]
        assert f"| {label} | {b['backdoor_flagged']} of {n} | {b['clean_false_alarms']} of {c} |" in text, rule
    assert r["settings"]["audit"]["backdoor"]["rule"] == "strip"
    assert (r["backdoor_flagged"], r["clean_false_alarms"]) == (r["by_rule"]["strip"]["backdoor_flagged"],
                                                               r["by_rule"]["strip"]["clean_false_alarms"])
    assert (f"The verdict named the planted target for {r['backdoor_target_correct']} of {n} backdoored teachers "
            f"(STRIP's class; the trigger reconstruction alone named it for "
            f"{d['neural_cleanse']['backdoor_target_correct']} of {n})") in text
    show = lambda v: "none" if v is None else str(v)  # noqa: E731
    verdict = lambda a: f"class {a['suspected_class']}" if a["flagged"] else "not flagged"  # noqa: E731
    for b in r["backdoor"]:
        a = b["audit"]
        assert (f"| {b['seed']} | {b['target']} | {100 * b['teacher_top1']:.1f} % | "
                f"{100 * a['strip_fraction_below']:.1f} % | {show(a['strip_suspected_class'])} | "
                f"{a['anomaly_score']:.2f} | {a['min_norm_class']} | {show(a['neural_cleanse_suspected_class'])} | "
                f"{verdict(a)} | {100 * b['teacher_attack_success']:.1f} % | {100 * b['student_attack_success']:.1f} % | "
                f"{100 * b['student_clean_data_attack_success']:.1f} % |") in text, b["seed"]
    for cl in r["clean"]:
        a = cl["audit"]
        assert (f"| {cl['seed']} | {100 * cl['teacher_top1']:.1f} % | {100 * a['strip_fraction_below']:.1f} % | "
                f"{a['anomaly_score']:.2f} | {a['min_norm_class']} | {show(a['neural_cleanse_suspected_class'])} | "
                f"{verdict(a)} |") in text, cl["seed"]
    assert (f"sends {100 * r['student_attack_success']:.1f} % (std {100 * r['student_attack_success_std']:.1f})"
            in text)
    assert f"it does not**: {100 * r['student_clean_data_attack_success']:.1f} %" in text
    clean_student = sum(b["student_clean_data_reconstructed_trigger_success"] for b in r["backdoor"]) / n
    assert (f"{100 * r['teacher_reconstructed_trigger_success']:.1f} % (std "
            f"{100 * r['teacher_reconstructed_trigger_success_std']:.1f}) of those rows to it on the teacher, "
            f"{100 * r['student_reconstructed_trigger_success']:.1f} % (std "
            f"{100 * r['student_reconstructed_trigger_success_std']:.1f}) on the poisoned-data student and "
            f"{100 * clean_student:.1f} % on average on the clean-data student") in text
    # the keys are there; the verdicts stated in the prose hold
    assert {"backdoor_flagged", "backdoor_target_correct", "clean_false_alarms", "clean_seeds",
            "student_attack_success"} <= set(r)
    assert r["backdoor_flagged"] == r["backdoor_target_correct"] == n and r["clean_false_alarms"] == 0 and c == 5
    assert d["neural_cleanse"]["clean_false_alarms"] == c and all(cl["audit"]["min_norm_class"] == 8
                                                                  for cl in r["clean"])
    assert r["by_rule"]["both"]["clean_false_alarms"] == 0 and r["by_rule"]["either"]["clean_false_alarms"] == c
    below = [100 * b["audit"]["strip_fraction_below"] for b in r["backdoor"]]
    clean_below = [100 * cl["audit"]["strip_fraction_below"] for cl in r["clean"]]
    assert (f"STRIP at {min(below):.1f}-{max(below):.1f} % of the examined rows below the threshold against "
            f"{min(clean_below):.1f}-{max(clean_below):.1f} % on clean teachers") in text


def test_readme_audit_sentence():
    r = load("audit.json")
    text = " ".join((ROOT / "README.md").read_text().split())
    assert (f"the audit's backdoor verdict (STRIP by default) flagged all {r['backdoor_flagged']} and named their "
            f"targets with no false alarm on {r['clean_seeds']} clean teachers") in text
    assert r["backdoor_flagged"] == r["backdoor_target_correct"] == r["backdoor_seeds"]
    assert r["clean_false_alarms"] == 0
    assert (f"the trigger reconstruction alone raised a false alarm on all "
            f"{r['by_detector']['neural_cleanse']['clean_false_alarms']} clean teachers") in text