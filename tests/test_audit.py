"""The teacher audit: STRIP and the anomaly index against independent computations, a planted backdoor and
flipped labels found, the `audit:` stage's refusal and the inheritance numbers, `kdistill audit`'s errors, the
report's Audit section. Tiny models and few steps: seconds on one thread."""

import json
import math
import shutil
import statistics

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from kdistill.audit.checks import anomaly_index, strip_entropy, strip_picks
from kdistill.audit.config import AuditConfig, AuditThresholds
from kdistill.audit.teacher import audit_table, audit_teacher, backdoor_verdict, inheritance, violations
from kdistill.cli import main
from kdistill.data import ArrayDataset, DataBundle
from kdistill.data.builtin import mnist1d
from kdistill.report.html import build_report, write_report
from tests.conftest import blobs, tiny_config

TRIGGER_ROWS = slice(37, 40)  # the planted trigger: +3, -3, +3 on the last three positions


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def fit(make_model, x, y, steps, seed=0, lr=3e-3, batch=128):
    """`make_model()` trained on (x, y) with Adam, everything seeded (init included)."""
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# -- the measurements against independent computations --------------------------------------------------------------
@pytest.mark.parametrize("blend", ["add", "alpha"])
def test_strip_entropy_matches_an_independent_float64_computation(blend):
    model = nn.Linear(3, 4)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0], [-1.0, 0.5, 2.0], [0.3, 0.3, -0.7]]))
        model.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.4]))
    g = torch.Generator().manual_seed(3)
    x, pool = torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g)
    got = strip_entropy(model, x, pool, 6, blend=blend, alpha=0.3, seed=11)
    picks = strip_picks(5, 7, 6, seed=11).numpy()
    w, b = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    xs, ps = x.double().numpy(), pool.double().numpy()
    expected = []
    for i in range(5):
        entropies = []
        for j in picks[i]:
            blended = xs[i] + ps[j] if blend == "add" else 0.7 * xs[i] + 0.3 * ps[j]
            z = w @ blended + b
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            entropies.append(-(p * np.log2(p)).sum())
        expected.append(np.mean(entropies))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # the clean calibration set never superimposes an input with itself
    own = strip_picks(7, 7, 50, seed=0, exclude_self=True)
    assert not (own == torch.arange(7).unsqueeze(1)).any() and own.min() >= 0 and own.max() < 7


def test_anomaly_index_is_the_mad_formula_by_hand():
    norms = [10.0, 12.0, 9.0, 11.0, 3.0, 10.5, 13.0, 9.5]
    median = statistics.median(norms)
    mad = statistics.median([abs(n - median) for n in norms])
    expected = [abs(n - median) / (1.4826 * mad) for n in norms]
    got = anomaly_index(norms)
    assert got["median"] == pytest.approx(median) and got["mad"] == pytest.approx(mad)
    assert got["index"] == pytest.approx(expected)
    # only a norm below the median with an index above 2 is flagged: class 4 (13.0 is far but above the median)
    assert got["flagged"] == [4] and got["suspected_class"] == 4 and got["min_class"] == 4
    assert got["score"] == pytest.approx(expected[4]) and expected[4] > 2
    even = anomaly_index([5.0, 5.2, 4.9, 5.1])
    assert even["flagged"] == [] and even["suspected_class"] is None
    flat = anomaly_index([4.0, 4.0, 4.0, 1.0, 4.0])  # MAD 0: the outlier's index is infinite
    assert flat["index"][3] == math.inf and flat["suspected_class"] == 3 and flat["index"][0] == 0


# -- a planted backdoor, flipped labels --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backdoor():
    """mnist1d with 10 % of the training rows poisoned (trigger added, label set to 0); a model trained on it,
    and one trained on the clean rows only."""
    base = mnist1d()
    x, y = base.train.tensors["x"].clone(), base.train.tensors["y"].clone()
    poisoned = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:len(x) // 10]
    x[poisoned, TRIGGER_ROWS] += torch.tensor([3.0, -3.0, 3.0])
    y[poisoned] = 0
    clean_rows = torch.ones(len(x), dtype=torch.bool)
    clean_rows[poisoned] = False
    mlp = lambda: nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 10))  # noqa: E731
    trojaned = fit(mlp, x, y, 400)
    clean = fit(mlp, x[clean_rows], y[clean_rows], 400)
    bundle = DataBundle("mnist1d-poisoned", ArrayDataset({"x": x, "y": y}), base.test, 10, (40,))
    # the trigger search at 200 steps on 32 rows (the defaults, 100 on 16, find class 0 as the smallest mask too,
    # but its anomaly index lands near the cut-off of 2 for some seeds: see docs/audit.md)
    settings = AuditConfig(cleanse={"steps": 200, "batch": 32}, strip={"rows": 256})
    return bundle, trojaned, clean, set(poisoned.tolist()), audit_teacher(trojaned, bundle, settings)


def test_neural_cleanse_flags_the_planted_target_class(backdoor):
    _, _, _, _, record = backdoor
    nc = record["neural_cleanse"]
    assert nc["min_class"] == 0 and nc["suspected_class"] == 0 and nc["score"] > 2, nc["norms"]
    assert nc["norms"][0] < 0.6 * nc["median"] and nc["trigger"]["class"] == 0 and nc["trigger"]["suspected"]
    assert all(nc["reached"]) and min(nc["success"]) >= 0.9


def test_strip_finds_the_poisoned_training_rows(backdoor):
    _, _, _, poisoned, record = backdoor
    strip = record["strip"]
    # 10 % of the rows are poisoned: far more than the 1 % false-rejection rate fall below the clean threshold
    assert strip["fraction_below"] > 4 * strip["expected_fraction"]
    assert strip["examined_entropy"]["min"] < strip["clean_entropy"]["min"]
    lowest = [r["row"] for r in strip["lowest"]]
    assert sum(r in poisoned for r in lowest) >= 0.8 * len(lowest)


def test_inheritance_measures_the_reconstructed_trigger_on_each_model(backdoor):
    bundle, trojaned, clean, _, record = backdoor
    found = inheritance(record, bundle, {"teacher": trojaned, "clean": clean})
    trig = found["trigger"]
    assert trig["class"] == 0 and trig["rows"] == min(512, int((bundle.test.tensors["y"] != 0).sum()))
    # the reconstructed trigger transfers to the model that learned the backdoor, not to the clean one
    assert trig["success"]["teacher"] > 0.6 and trig["success"]["clean"] < trig["success"]["teacher"] - 0.3
    assert trig["clean_rate"]["teacher"] < 0.2


FASHION = "/usr/share/datasets/fashion-mnist"
FM_TARGET, FM_POISON = 7, 0.08  # the planted target class; the poisoned fraction of the training rows
FM_PATCH = (slice(None), slice(None), slice(23, 27), slice(23, 27))  # a 4x4 white square, bottom-right corner


@pytest.fixture(scope="module")
def fashion_backdoor():
    """Fashion-MNIST (6,000 training rows): 8 % of the rows of other classes get the corner patch and label 7
    (BadNets-style); a small CNN trained on them, and the same CNN trained on the clean rows; both audited with
    the default backdoor rule (STRIP) on 512 training rows."""
    from pathlib import Path

    if not Path(FASHION).is_dir():
        pytest.skip("needs the Debian package dataset-fashion-mnist (.ci/run installs it)")
    from kdistill.data.builtin import fashion_mnist

    data = fashion_mnist(train_size=6000)
    x, y = data.train.tensors["x"].float(), data.train.tensors["y"]
    others = torch.nonzero(y != FM_TARGET).flatten()
    picked = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(0))[:int(FM_POISON * len(y))]]
    xp, yp = x.clone(), y.clone()
    patched = xp[picked].clone()
    patched[FM_PATCH] = 1.0
    xp[picked], yp[picked] = patched, FM_TARGET
    cnn = lambda: nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),  # noqa
                                nn.Flatten(), nn.Linear(784, 10))
    trojaned, clean = fit(cnn, xp, yp, 600), fit(cnn, x, y, 600)
    settings = AuditConfig(cleanse={"steps": 100, "batch": 16}, strip={"rows": 512})
    poisoned = DataBundle("fashion_mnist-poisoned", ArrayDataset({"x": xp, "y": yp}), data.test, 10, (1, 28, 28))
    return data, trojaned, audit_teacher(trojaned, poisoned, settings), audit_teacher(clean, data, settings), clean


def test_the_audit_flags_a_planted_fashion_mnist_trigger_names_its_class_and_spares_the_clean_teacher(
        fashion_backdoor):
    data, trojaned, bad, good, clean = fashion_backdoor
    x_test, y_test = data.test.tensors["x"].float(), data.test.tensors["y"]
    triggered = x_test[y_test != FM_TARGET].clone()
    triggered[FM_PATCH] = 1.0
    with torch.no_grad():  # the backdoor was planted: the patch sends other classes to the target
        assert (trojaned(triggered).argmax(-1) == FM_TARGET).float().mean() > 0.9
        assert (clean(triggered).argmax(-1) == FM_TARGET).float().mean() < 0.1
    verdict = bad["backdoor"]
    assert verdict["rule"] == "strip" and verdict["flagged"] and verdict["suspected_class"] == FM_TARGET, verdict
    assert verdict["strip"]["ratio"] > 5 and bad["neural_cleanse"]["trigger"]["class"] == FM_TARGET
    assert not good["backdoor"]["flagged"] and good["backdoor"]["suspected_class"] is None, good["backdoor"]
    assert good["backdoor"]["strip"]["ratio"] < 5
    assert f"SUSPECTED, target class {FM_TARGET}" in audit_table(bad) and "not flagged" in audit_table(good)
    # refuse_backdoor turns the verdict into a refusal; the other rules combine the two checks
    assert [v["threshold"] for v in violations(bad, AuditThresholds(refuse_backdoor=True))] == ["refuse_backdoor"]
    assert violations(good, AuditThresholds(refuse_backdoor=True)) == []
    for rule, expect in (("either", verdict["strip"]["flagged"] or verdict["neural_cleanse"]["flagged"]),
                         ("both", verdict["strip"]["flagged"] and verdict["neural_cleanse"]["flagged"]),
                         ("neural_cleanse", verdict["neural_cleanse"]["flagged"])):
        again = backdoor_verdict(bad, AuditConfig(backdoor={"rule": rule}))
        assert again["flagged"] == expect and again["rule"] == rule


def test_label_noise_suspects_are_the_flipped_rows():
    data = blobs(n=800, d=6, classes=3, seed=1)
    x, y = data.tensors["x"], data.tensors["y"].clone()
    flipped = torch.randperm(len(y), generator=torch.Generator().manual_seed(2))[:40]
    y[flipped] = (y[flipped] + 1) % 3
    model = fit(lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), x, y, 150, batch=64)
    test = blobs(n=200, d=6, classes=3, seed=1)
    bundle = DataBundle("blobs", ArrayDataset({"x": x, "y": y}), test, 3, (6,))
    settings = AuditConfig(top_k=5, cleanse={"steps": 20}, strip={"rows": 64})
    noise = audit_teacher(model, bundle, settings)["label_noise"]
    found, flipped = set(noise["rows"]), set(flipped.tolist())
    assert len(found & flipped) >= 0.8 * len(flipped) and len(found - flipped) <= 0.1 * len(flipped)
    assert noise["count"] == len(found) and noise["fraction"] == pytest.approx(len(found) / 800)
    conf = [r["confidence"] for r in noise["top"]]
    assert len(conf) == 5 and conf == sorted(conf, reverse=True) and min(conf) >= 0.9
    assert all(r["teacher_class"] != r["label"] and y[r["row"]] == r["label"] for r in noise["top"])


# -- the command and the run's stage --------------------------------------------------------------------------------
AUDIT_FAST = {"cleanse": {"steps": 30}, "strip": {"rows": 64, "overlays": 8}}


def tiny(**over):
    return tiny_config(baseline=False, data={"name": "mnist1d", "train_size": 512, "test_size": 300,
                                             "transfer": {"size": 0, "seed": 1}},
                       teacher={"name": "cnn1d", "kwargs": {"channels": 8, "depth": 3},
                                "train": {"steps": 30, "batch_size": 64, "log_every": 10}},
                       train={"steps": 10, "batch_size": 64, "log_every": 5, "checkpoint_every": 0},
                       eval={"latency_repeats": 2, "throughput_batch": 8, "threads": 1}, **over)


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """A run whose audit demands 99 % accuracy of a 30-step teacher: refused after the teacher stage."""
    folder = tmp_path_factory.mktemp("refused")
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(tiny(audit={"thresholds": {"min_accuracy": 0.99}, **AUDIT_FAST})))
    code = main(["run", str(path), "--out", str(folder / "run"), "--no-progress"])
    return path, folder / "run", code


def test_the_audit_stage_refuses_a_weak_teacher_in_one_line_and_keeps_it(refused, capsys):
    path, run_dir, code = refused
    assert code == 2
    assert (run_dir / "teacher.safetensors").is_file() and (run_dir / "audit.json").is_file()
    assert not (run_dir / "student.safetensors").exists() and not (run_dir / "summary.json").exists()
    record = json.loads((run_dir / "audit.json").read_text())
    assert not record["passed"] and record["violations"][0]["threshold"] == "min_accuracy"
    # the message, again (the fixture's output is gone): one line with the value, the threshold and the way on
    code, _, err = run_cli(["run", str(path), "--out", str(run_dir), "--no-progress"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    value = record["test"]["accuracy"]
    assert "teacher audit failed" in lines[0] and "min_accuracy 0.99" in lines[0] and f"{value:.4g}" in lines[0]
    assert "teacher.safetensors" in lines[0] and "--set audit.thresholds.min_accuracy" in lines[0]


@pytest.fixture(scope="module")
def passed(refused):
    """The refused run continued with the threshold lowered (--set): the kept teacher is loaded, not retrained."""
    path, run_dir, _ = refused
    code = main(["run", str(path), "--out", str(run_dir), "--no-progress",
                 "--set", "audit.thresholds.min_accuracy=0.01"])
    return run_dir, code


def test_a_lowered_threshold_continues_and_records_the_inheritance(passed):
    run_dir, code = passed
    assert code == 0 and (run_dir / "student.safetensors").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    entry = summary["audit"]
    assert entry["ran"] and entry["passed"] and entry["accuracy"] == pytest.approx(summary["teacher"]["accuracy"])
    inherit = entry["inheritance"]
    assert set(inherit["trigger"]["success"]) == {"teacher", "student"}
    assert 0 <= inherit["trigger"]["success"]["student"] <= 1 and inherit["trigger"]["rows"] > 0
    assert inherit["label_noise"]["rows"] == entry["label_noise_count"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["audit"]["thresholds"]["min_accuracy"] == 0.01


def test_the_report_shows_the_audit_and_says_when_none_ran(passed, tmp_path):
    run_dir, _ = passed
    write_report(run_dir)  # the runs of this module skip the automatic report (tests/conftest.py)
    page = (run_dir / "report.html").read_text()
    assert '<section id="audit" data-has-data="true">' in page
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f'data-src="audit/accuracy" data-value="{json.dumps(summary["audit"]["accuracy"])}"' in page
    assert 'data-src="audit/inheritance/trigger/success/student"' in page
    section = page[page.index('<section id="audit"'):]
    section = section[:section.index("</section>")]
    for plot in ("audit-confidence", "audit-reliability", "audit-strip", "audit-triggers"):
        assert f'data-plot="{plot}"' in section, plot
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "audit.json").unlink()
    (copy / "summary.json").write_text(json.dumps({**summary, "audit": {"ran": False}}))
    page = build_report(copy)[0]
    assert '<section id="audit" data-has-data="false">' in page and "no teacher audit ran for this run" in page


def test_kdistill_audit_reuses_the_runs_teacher_and_writes_audit_json(passed, capsys):
    run_dir, _ = passed
    code, out, err = run_cli(["audit", str(run_dir), "--no-progress", "--set", "audit.cleanse.steps=10"], capsys)
    assert code == 0, err
    assert "[teacher] done earlier" in out and "held-out top-1" in out and "thresholds: passed" in out
    record = json.loads((run_dir / "audit.json").read_text())
    assert record["neural_cleanse"]["steps"] == 10 and len(record["test"]["per_class_accuracy"]) == 10
    assert sum(record["test"]["confidence_histogram"]["counts"]) == record["test"]["rows"] == 300
    assert sum(record["test"]["reliability"]["count"]) == 300


def test_kdistill_audit_bad_inputs_are_one_line_exit_2(tmp_path, capsys):
    code, _, err = run_cli(["audit", str(tmp_path / "none.yaml")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not found" in err
    lm = tmp_path / "emb.yaml"
    lm.write_text("task: sentence_embedding\n")
    code, _, err = run_cli(["audit", str(lm), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "classification" in err
    mutual = tmp_path / "mutual.yaml"
    cfg = tiny(scheme="mutual")
    del cfg["teacher"]
    mutual.write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(["audit", str(mutual), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "scheme 'mutual'" in err
    cfg["audit"] = {"enabled": True}
    mutual.write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(["run", str(mutual), "--out", str(tmp_path / "m2")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "audit" in err


def test_kdistill_audit_of_a_multi_teacher_config_reports_the_teachers_agreement(tmp_path, capsys):
    cfg = tiny(scheme={"name": "multi_teacher", "teachers": [
        {"name": "mlp", "kwargs": {"hidden": [16]}, "train": {"steps": 15, "batch_size": 64}},
        {"name": "mlp", "kwargs": {"hidden": [24]}, "train": {"steps": 15, "batch_size": 64}}]}, audit=AUDIT_FAST)
    del cfg["teacher"]
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli(["audit", str(path), "--out", str(tmp_path / "r"), "--no-progress"], capsys)
    assert code == 0, err
    assert "agreement min" in out and (tmp_path / "r" / "teacher0.safetensors").is_file()
    ensemble = json.loads((tmp_path / "r" / "audit.json").read_text())["ensemble"]
    agree = ensemble["agreement"]
    assert ensemble["members"] == ["teacher0", "teacher1"] and agree[0][0] == agree[1][1] == 1.0
    assert agree[0][1] == agree[1][0] and 0 <= agree[0][1] <= 1
