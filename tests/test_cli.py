import json

import pytest
import yaml

from kdistill.cli import main
from kdistill.demo import DEMO_CONFIG
from kdistill.config import parse_config

from tests.conftest import tiny_config


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_wrong_config_field_is_one_line_exit_2(tmp_path, capsys):
    cfg = tiny_config(train={"steps": 20, "optimiser": "adam"})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli(["run", str(path), "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "train.optimiser" in lines[0] and "unknown field" in lines[0]
    assert "Traceback" not in err


def test_bad_value_names_field_and_allowed_values(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(train={"schedule": "triangle"})))
    code, _, err = run_cli(["run", str(path)], capsys)
    assert code == 2 and "train.schedule" in err and "'cosine'" in err and len(err.strip().splitlines()) == 1


def test_bad_yaml_and_missing_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("teacher: [unclosed\n")
    code, _, err = run_cli(["run", str(path)], capsys)
    assert code == 2 and "YAML syntax error" in err
    code, _, err = run_cli(["run", str(tmp_path / "none.yaml")], capsys)
    assert code == 2 and "not found" in err


def test_demo_config_is_valid_and_meets_size_constraints():
    cfg = parse_config(DEMO_CONFIG)
    from kdistill.data import mnist1d
    from kdistill.evaluate import flops_per_sample, param_count
    from kdistill.models import build_model
    import torch

    t = build_model(cfg.teacher.name, cfg.teacher.kwargs, input_shape=(40,), num_classes=10)
    s = build_model(cfg.student.name, cfg.student.kwargs, input_shape=(40,), num_classes=10)
    x = torch.randn(1, 40)
    assert param_count(s) < param_count(t) and flops_per_sample(s, x) < flops_per_sample(t, x)


def test_run_writes_run_dir_and_rerun_resumes(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config()))
    out_dir = tmp_path / "run"
    code, out, err = run_cli(["run", str(path), "--out", str(out_dir), "--no-progress"], capsys)
    assert code == 0, err
    assert "student, KD" in out and "compression" in out
    for name in ("config.yaml", "metrics.jsonl", "student.safetensors", "teacher.safetensors",
                 "baseline.safetensors", "summary.json"):
        assert (out_dir / name).is_file(), name
    summary = json.loads((out_dir / "summary.json").read_text())
    for model in ("teacher", "student", "baseline"):
        assert {"accuracy", "params", "bytes", "flops", "latency_ms", "throughput"} <= set(summary[model])
    assert summary["compression"] > 1 and summary["retention"] > 0
    # the written config reproduces the run: running it on the same directory finds every stage done
    code, out, err = run_cli(["run", str(out_dir / "config.yaml"), "--out", str(out_dir), "--no-progress"], capsys)
    assert code == 0 and "done earlier" in out
    # eval re-measures the directory
    code, out, err = run_cli(["eval", str(out_dir)], capsys)
    assert code == 0 and "student, KD" in out


def test_rerun_with_other_config_is_refused(tmp_path, capsys):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(tiny_config()))
    b.write_text(yaml.safe_dump(tiny_config(seed=7)))
    assert run_cli(["run", str(a), "--out", str(tmp_path / "r"), "--no-progress"], capsys)[0] == 0
    code, _, err = run_cli(["run", str(b), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "different config" in err
