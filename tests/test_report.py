"""The HTML report (`kdistill report`, written at the end of every run): self-contained, every section of a
classification run, every number from the run's files, bad inputs are one line and exit 2."""

import html
import json
import re
import shutil

import pytest
import torch

from kdistill.cli import main
from kdistill.evaluate.predictions import load_arrays, save_similarities
from kdistill.evaluate.quality import accuracy, agreement, expected_calibration_error
from kdistill.report import plots
from kdistill.report.html import build_report, write_report
from kdistill.report.markup import lookup

from tests.report_support import SECTIONS, tiny_report_run

CELL = re.compile(r'data-src="([^"]+)" data-value="([^"]*)"')


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_report_run(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def page(run_dir):
    return (run_dir / "report.html").read_text()


def summary_of(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def sections_of(page):
    return dict(re.findall(r'<section id="([^"]+)" data-has-data="(true|false)"', page))


def test_the_run_writes_a_report_with_every_classification_section(run_dir, page):
    assert (run_dir / "predictions.safetensors").is_file()
    found = sections_of(page)
    assert {name: found.get(name) for name in SECTIONS} == {name: "true" for name in SECTIONS}
    assert page.count('<svg class="plot"') == 3 + 2 + 1 + 1 + 1 + 4  # 3 curves, 2 Pareto, reliability..., 4 audit
    names = re.findall(r'<svg class="plot"[^>]*data-plot="([^"]+)"', page)
    assert len(names) == len(set(names)) and {"reliability", "audit-reliability"} <= set(names), names
    # per-class: one row per class with the retention column; disagreement examples
    assert "retention (student / teacher)" in page and "test index" in page


def test_the_page_makes_no_external_reference(page):
    refs = re.findall(r'(?<![\w-])(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', page, flags=re.I)
    # in-page anchors, and the heat maps' pixels inline (data: URIs)
    assert refs and all(ref.startswith(("#", "data:image/png;base64,")) for ref in refs), refs
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page.replace("url(#", "")
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_every_number_shown_is_the_summarys(run_dir, page):
    summary = summary_of(run_dir)
    cells = CELL.findall(page)
    sources = {src for src, _ in cells}
    for name in ("teacher", "baseline", "student"):
        assert {f"{name}/accuracy", f"{name}/ece", f"{name}/params", f"{name}/bytes"} <= sources
    assert {"student/agreement", "baseline/agreement", "retention", "compression", "speedup"} <= sources
    for src, value in cells:
        assert json.loads(value.replace("&quot;", '"')) == lookup(summary, src), src
    # the shown text of a percentage is the summary's value, formatted
    shown = re.search(r'data-src="student/accuracy" data-value="[^"]*">([^<]+)<', page).group(1)
    assert shown == f"{100 * summary['student']['accuracy']:.2f}"


def test_saved_predictions_give_the_summarys_accuracy_ece_and_agreement(run_dir):
    summary = summary_of(run_dir)
    tensors, meta = load_arrays(run_dir / "predictions.safetensors")
    labels = tensors["labels"]
    assert set(meta["models"].split(",")) == {"teacher", "student", "baseline"}
    assert labels.shape == (1000,) and tensors["teacher_logits"].shape == (1000, 10)
    for name in ("teacher", "student", "baseline"):
        logits = tensors[f"{name}_logits"]
        assert accuracy(logits, labels) == summary[name]["accuracy"]
        assert expected_calibration_error(logits, labels, int(meta["ece_bins"])) == pytest.approx(
            summary[name]["ece"], abs=1e-7)
    assert agreement(tensors["student_logits"], tensors["teacher_logits"]) == summary["student"]["agreement"]
    # the disagreement count on the page is the summary's agreement
    n = int(round((1 - summary["student"]["agreement"]) * len(labels)))
    assert f"{n} of {len(labels)} test examples" in (run_dir / "report.html").read_text()


def test_deployed_rows_are_shown_and_missing_data_is_said(run_dir, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("checkpoints", "*.safetensors*"))
    (other / "metrics.jsonl").unlink()
    summary = summary_of(run_dir)
    rows = [{"name": name, "runtime": runtime, "file": None, "bytes": size, "accuracy": acc, "agreement": agree,
             "latency_ms_b1": lat, "latency_ms_b32": 8 * lat, "throughput": 1e3 / lat, "threads": 1}
            for name, runtime, size, acc, agree, lat in (("teacher", "torch", 8000, 0.9, None, 0.2),
                                                          ("student", "torch", 3600, 0.8, 0.85, 0.05),
                                                          ("student.int8-dynamic", "onnxruntime", 1100, 0.79, 0.84,
                                                           0.01))]
    (other / "summary.json").write_text(json.dumps({**summary, "deployed": rows}))
    path, notes = write_report(other, tmp_path / "elsewhere.html")
    page = path.read_text()
    assert path == tmp_path / "elsewhere.html" and notes == []
    found = sections_of(page)
    assert found["comparison"] == found["pareto"] == "true"
    assert found["curves"] == found["calibration"] == found["per-class"] == found["disagreements"] == "false"
    assert "student.int8-dynamic (deployed)" in page and "no predictions" not in page
    assert "this run kept no per-example predictions" in page and "metrics.jsonl holds no loss records" in page
    cells = dict(CELL.findall(page))
    assert json.loads(cells["deployed/2/latency_ms_b32"]) == pytest.approx(0.08)
    assert json.loads(cells["deployed/2/bytes"]) == 1100 and json.loads(cells["deployed/1/agreement"]) == 0.85


def test_without_matplotlib_the_page_says_so_once(run_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(plots, "available", lambda: False)
    page, notes = build_report(run_dir)
    assert notes == [plots.INSTALL_HINT] and html.unescape(page).count("pip install 'kdistill[report]'") == 1
    assert "<svg" not in page and sections_of(page)["calibration"] == "true"
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.html")]) == 0
    assert capsys.readouterr().err.strip() == f"note: {plots.INSTALL_HINT}"


def test_other_tasks_get_their_own_sections(tmp_path):
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.yaml").write_text("task: causal_lm\n")
    (lm / "summary.json").write_text(json.dumps({
        "teacher_ppl": 20.5, "student_init_ppl": 90.0, "student_ce_ppl": 40.25, "student_kd_ppl": 35.0,
        "kd_over_ce_ppl": 35.0 / 40.25, "params_teacher": 1000, "params_student": 500, "steps": 4}))
    page = build_report(lm)[0]
    assert sections_of(page)["language-model"] == "true" and "token agreement is not measured" in page
    assert 'data-src="student_kd_ppl" data-value="35.0"' in page and "calibration" not in sections_of(page)
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "config.yaml").write_text("task: sentence_embedding\n")
    (emb / "summary.json").write_text(json.dumps({"spearman": 0.8125, "probe_acc_student": 0.5,
                                                  "probe_acc_teacher": 0.625, "models": {}}))
    assert sections_of(build_report(emb)[0])["similarities"] == "false"
    teacher = torch.linspace(-0.2, 1, 50, dtype=torch.float64)
    save_similarities(emb / "similarities.safetensors", teacher, teacher ** 2)
    page = build_report(emb)[0]
    assert sections_of(page)["similarities"] == "true" and 'data-plot="similarities"' in page
    assert 'data-src="spearman" data-value="0.8125"' in page


@pytest.mark.parametrize("case", ["missing", "file", "unfinished", "empty"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    target = tmp_path / "run"
    if case == "file":
        target.write_text("x")
    elif case in ("unfinished", "empty"):
        target.mkdir()
        if case == "unfinished":
            (target / "config.yaml").write_text("seed: 0\n")
    code = main(["report", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdistill: error:"), err
    expected = {"missing": "does not exist", "file": "not a run directory", "unfinished": "kdistill run",
                "empty": "no summary.json"}[case]
    assert expected in lines[0]


def test_damaged_summary_is_one_line(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not valid JSON" in err


def test_report_command_writes_the_default_and_the_given_file(run_dir, tmp_path, capsys):
    default = run_dir / "report.html"
    default.unlink()
    assert main(["report", str(run_dir)]) == 0 and default.is_file()
    assert capsys.readouterr().out.strip() == f"report: {default}"
    out = tmp_path / "r.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert out.read_text() == default.read_text()  # reproducible: the same files give the same page
