"""One objective from the config: terms on taps, each logged by name in metrics.jsonl, weight warm-up, tap errors,
and the example config run through `kdistill run`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from kdistill.cli import main
from kdistill.config import parse_config
from kdistill.data.builtin import FASHION_MNIST_DIR
from kdistill.distiller import Term, split_taps
from kdistill.errors import ConfigError, TapError
from kdistill.schemes.offline import run

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist_methods.yaml"
NEEDS_FASHION_MNIST = pytest.mark.skipif(
    not all((Path(FASHION_MNIST_DIR) / f"{part}-ubyte.gz").is_file()
            for part in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")),
    reason=f"needs the Fashion-MNIST files of the Debian package dataset-fashion-mnist in {FASHION_MNIST_DIR} "
           "(apt-get install dataset-fashion-mnist)")


def records(run_dir: Path, stage: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == stage and "terms" in r]


def test_weight_warmup_is_linear_then_constant():
    term = Term("dkd", "dkd", weight=2.0, warmup_steps=4)
    assert [term.weight_at(s) for s in range(7)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0]
    assert [Term("kd", "kd", weight=0.7).weight_at(s) for s in (0, 5, 10_000)] == [0.7, 0.7, 0.7]


def test_taps_are_split_by_the_side_that_reads_them():
    terms = [Term("ce", "ce"), Term("hint", "hint", student="s", teacher="t"),
             Term("sp", "sp", student="both", teacher="both")]
    student, teacher = split_taps(terms, {"s": "features", "t": "layer3", "both": "pool", "unused": "x"})
    assert student == {"s": "features", "both": "pool"}
    assert teacher == {"t": "layer3", "both": "pool"}


def test_terms_from_config_are_logged_by_name_with_the_warmup_ramp(tmp_path):
    # kd_a and kd_b are the same loss on the same forward; kd_b's weight ramps over 4 steps, so in every
    # per-step record kd_b / kd_a = min(step / 4, 1) exactly. A hint pairs the student's hidden layer (B, 16)
    # with the teacher's flattened maps (B, 80) through a linear adapter.
    cfg = tiny_config(
        baseline=False, data={"train_size": 512, "transfer": {"size": 0}},
        distill={"taps": {"s_hidden": "2", "t_flat": "flatten"},
                 "terms": [{"name": "ce", "loss": "ce", "weight": 0.5},
                           {"name": "kd_a", "loss": "kd", "params": {"temperature": 2.0}},
                           {"name": "kd_b", "loss": "kd", "params": {"temperature": 2.0}, "warmup_steps": 4},
                           {"name": "hint", "loss": "hint", "weight": 0.1, "student": "s_hidden",
                            "teacher": "t_flat"}]},
        train={"steps": 6, "batch_size": 32, "log_every": 1, "checkpoint_every": 0})
    run(parse_config(cfg), tmp_path, progress=False, log=lambda m: None)
    recs = records(tmp_path, "student")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for r in recs:
        assert set(r["terms"]) == {"ce", "kd_a", "kd_b", "hint"}
        assert r["terms"]["kd_b"] / r["terms"]["kd_a"] == pytest.approx(min(r["step"] / 4, 1.0), rel=1e-5)
        assert r["loss"] == pytest.approx(sum(r["terms"].values()), rel=1e-6)
        assert r["terms"]["hint"] > 0
    # the teacher stage logs its own single term
    assert set(records(tmp_path, "teacher")[-1]["terms"]) == {"ce"}


def test_unknown_tap_path_is_a_tap_error_naming_close_modules_before_any_training(tmp_path):
    cfg = tiny_config(data={"train_size": 512, "transfer": {"size": 0}}, distill={"taps": {"t_maps": "featres"},
                               "terms": [{"loss": "ce"}, {"loss": "at", "student": "t_maps", "teacher": "t_maps"}]})
    with pytest.raises(TapError) as err:
        run(parse_config(cfg), tmp_path, progress=False, log=lambda m: None)
    msg = str(err.value)
    assert "featres" in msg and "closest: features" in msg and "\n" not in msg
    assert not (tmp_path / "teacher.safetensors").exists()  # it failed fast


def test_term_on_an_undefined_tap_is_a_one_line_config_error(tmp_path, capsys):
    cfg = tiny_config(distill={"taps": {"t_maps": "features"},
                               "terms": [{"loss": "ce"}, {"loss": "hint", "student": "logits", "teacher": "t_map"}]})
    with pytest.raises(ConfigError, match=r"distill: terms\[1\]\.teacher: tap 't_map' is not defined.*"
                                          r"did you mean 't_maps'"):
        parse_config(copy.deepcopy(cfg))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdistill: error:") and "t_map" in err and len(err.splitlines()) == 1


@NEEDS_FASHION_MNIST
def test_example_config_runs_through_the_cli(tmp_path, monkeypatch):
    """examples/fashion_mnist_methods.yaml with a tiny budget: every term trains and is logged by name."""
    from kdistill.data import ArrayDataset
    from kdistill.schemes import common

    def small_test_set(data_cfg):  # evaluating a ResNet on all 10000 test images would dominate the test's time
        bundle = load_data(data_cfg)
        bundle.test = ArrayDataset({k: v[:256] for k, v in bundle.test.tensors.items()}, bundle.test.name)
        return bundle

    load_data = common.load_data
    monkeypatch.setattr(common, "load_data", small_test_set)
    cfg = yaml.safe_load(EXAMPLE.read_text())
    parse_config(copy.deepcopy(cfg))  # the example itself is valid as shipped
    cfg["data"]["train_size"] = 256
    cfg["teacher"]["train"].update(steps=4, batch_size=32, log_every=2)
    cfg["train"].update(steps=4, batch_size=32, log_every=2, checkpoint_every=2)
    cfg["distill"]["terms"][2]["warmup_steps"] = 2
    cfg["eval"] = {"latency_repeats": 1, "throughput_batch": 8}
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    recs = records(out, "student")
    assert [r["step"] for r in recs] == [2, 4]
    assert all(set(r["terms"]) == {"ce", "kd", "hint", "crd"} for r in recs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compression"] > 10
    # the student file is the plain student: no adapter / CRD keys
    from safetensors.torch import load_file
    keys = set(load_file(str(out / "student.safetensors")))
    assert keys and not any(k.startswith(("adapters", "loss_modules", "student.")) for k in keys)
    ckpt_keys = set(load_file(str(sorted((out / "checkpoints" / "student").iterdir())[-1] / "model.safetensors")))
    assert {"adapters.hint.weight", "loss_modules.crd.embed_student.weight"} <= ckpt_keys
