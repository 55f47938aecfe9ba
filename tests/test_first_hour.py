"""The first hour of a new user (issue 20), one section per item: CLI misuse, import paths, a reused run folder,
changed settings on resume, checkpointing in every stage, checksums and a teacher at chance, the Python API with
numpy data, progress. The README's own blocks are run by tests/test_readme.py."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import kdistill
from kdistill import models
from kdistill.cli import main
from kdistill.data import ArrayDataset, load_data
from kdistill.engine.checkpoint import list_checkpoints, step_of
from kdistill.errors import ConfigError, DataError
from kdistill.files import save_weights
from kdistill.progress import Progress, run_plan

from tests.conftest import tiny_config
from tests.reliability_support import (MODELS, REPO, cli_command, cli_env, config, digest, run_inprocess,
                                       run_subprocess, write_config, write_idx_dataset)


# -- 1. command-line misuse: usage and one line, exit 2 (0 for --version), never a traceback ---------------------
MISUSE = [[], ["run"], ["run", "x.yaml", "--bogus"], ["frobnicate"], ["eval"], ["run", "x.yaml", "--out"],
          ["cache"], ["cache", "frobnicate"], ["run", "x.yaml", "--set"]]


@pytest.mark.parametrize("argv", MISUSE, ids=lambda a: " ".join(a) or "(none)")
def test_cli_misuse_is_usage_and_one_line_exit_2(argv):
    proc = subprocess.run(cli_command(*argv), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdistill: error:")]
    assert len(errors) == 1 and "Usage:" in proc.stderr + proc.stdout, proc.stderr


def test_cli_version_and_help_exit_0():
    proc = subprocess.run(cli_command("--version"), cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"kdistill {version('kdistill')}", proc.stderr
    proc = subprocess.run(cli_command("run", "--help"), cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and "--restart-stage" in proc.stdout and "Traceback" not in proc.stderr


def test_typer_is_pinned_to_the_tested_range():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    typer = next(Requirement(d) for d in deps if d.startswith("typer"))
    assert typer.specifier and version("typer") in typer.specifier and "0.12" not in typer.specifier
    assert not typer.specifier.contains("1.0")  # an untested major version is not allowed in


# -- 3. import paths: the working directory and the config file's folder -----------------------------------------
FACTORY = "from kdistill.models import MLP\n\ndef build(input_shape, num_classes):\n    return MLP(input_shape, num_classes, (8,))\n"


@pytest.fixture
def clean_imports(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(models, "CONFIG_FOLDERS", [])
    yield
    for name in [m for m in sys.modules if m.startswith("fh_")]:
        del sys.modules[name]


def test_a_model_module_in_the_working_directory_imports(tmp_path, monkeypatch, clean_imports):
    (tmp_path / "fh_cwd_pkg").mkdir()
    (tmp_path / "fh_cwd_pkg" / "__init__.py").write_text("")
    (tmp_path / "fh_cwd_pkg" / "models.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    model = models.build_model("fh_cwd_pkg.models:build", input_shape=(40,), num_classes=10)
    assert model(torch.zeros(2, 40)).shape == (2, 10)


def test_a_model_module_next_to_the_config_imports(tmp_path, monkeypatch, clean_imports):
    from kdistill.tasks import load_any

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "fh_beside.py").write_text(FACTORY)
    path = tmp_path / "configs" / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(student={"name": "fh_beside:build"})))
    monkeypatch.chdir(REPO)
    _, cfg = load_any(path)
    assert models.build_model(cfg.student.name, input_shape=(40,), num_classes=10) is not None


def test_a_missing_module_says_where_it_looked(tmp_path, monkeypatch, clean_imports):
    monkeypatch.chdir(tmp_path)
    models.add_config_folder(tmp_path / "cfgs")
    with pytest.raises(ConfigError) as err:
        models.build_model("fh_nowhere.models:build", where="student")
    text = str(err.value)
    assert "fh_nowhere" in text and str(tmp_path) in text and str(tmp_path / "cfgs") in text and "PYTHONPATH" in text
    (tmp_path / "fh_broken.py").write_text("import fh_not_installed_dependency\n")
    with pytest.raises(ConfigError, match="importing 'fh_broken' from .* failed: No module named 'fh_not_installed_dependency'"):
        models.build_model("fh_broken:build", where="student")


# -- 4. / 6. a folder whose run never trained is reused; changed settings are refused or restart a stage ----------
def test_a_folder_whose_run_failed_before_training_is_reused(tmp_path, capsys):
    out = tmp_path / "run"
    bad = write_config(tmp_path, tiny_config(student={"name": "tests.reliability_models:wrong_classes"}))
    code, _, err = run_inprocess(["run", bad, "--out", out, "--no-progress"], capsys)
    assert code == 2 and (out / "config.yaml").is_file() and "Traceback" not in err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(tiny_config()))
    code, stdout, err = run_inprocess(["run", good, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    assert "never started training" in stdout and (out / "summary.json").is_file()


def test_changed_steps_are_refused_then_restart_or_fresh(tmp_path, capsys):
    out, path = tmp_path / "run", tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config()))
    assert run_inprocess(["run", path, "--out", out, "--no-progress"], capsys)[0] == 0
    teacher = digest(out / "teacher.safetensors")
    code, _, err = run_inprocess(["run", path, "--out", out, "--set", "train.steps=30"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "train.steps: 20 -> 30" in err and "--restart-stage" in err and "--fresh" in err
    code, stdout, err = run_inprocess(["run", path, "--out", out, "--set", "train.steps=30", "--restart-stage",
                                       "student", "--no-progress"], capsys)
    assert code == 0, err
    assert "[teacher] done earlier" in stdout and "[baseline] done earlier" in stdout and "kept" in stdout
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in steps if r.get("stage") == "student") == 30
    assert max(r["step"] for r in steps if r.get("stage") == "baseline") == 20
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 30
    code, _, err = run_inprocess(["run", path, "--out", out, "--restart-stage", "nosuch"], capsys)
    assert code == 2 and "student" in err
    code, stdout, err = run_inprocess(["run", path, "--out", out, "--fresh", "--no-progress"], capsys)
    assert code == 0 and "done earlier" not in stdout, err
    assert digest(out / "teacher.safetensors") == teacher  # same config, same seeds: the same teacher again


# -- 5. every stage checkpoints: SIGKILL loses at most checkpoint_every steps ---------------------------------------
EVERY = 4


@pytest.fixture(scope="module")
def kill_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("killcfg")
    cfg = config(write_idx_dataset(folder / "data"))
    cfg["teacher"]["train"] = {"steps": 30, "batch_size": 32}  # no checkpoint_every: inherited from train
    cfg["train"]["checkpoint_every"] = EVERY
    return write_config(folder, cfg)


@pytest.mark.parametrize("stage,role,step", [("teacher", "teacher", 19), ("baseline", "student", 14),
                                             ("student", "student", 30 + 23)])
def test_sigkill_in_any_stage_loses_at_most_checkpoint_every(kill_config, tmp_path, capsys, stage, role, step):
    run_dir = tmp_path / "run"
    proc = run_subprocess("run", kill_config, "--out", run_dir, "--no-progress", KDISTILL_TEST_KILL=f"{role}:{step}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["teacher"]["train"]["checkpoint_every"] == EVERY
    done = step - 1 - (30 if stage == "student" else 0)  # steps of the stage finished before the kill
    found = list_checkpoints(run_dir / "checkpoints" / stage)
    assert found and not (run_dir / f"{stage}.safetensors").exists()
    saved = step_of(found[-1])
    assert 0 <= done - saved < EVERY
    code, out, err = run_inprocess(["run", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert f"[{stage}] resumed from" in out and f"(step {saved})" in out


# -- 9. checksums, a teacher at chance, eval of an unfinished run ----------------------------------------------
def test_a_bit_flipped_stage_file_is_caught_and_recreated(tmp_path, capsys):
    out, path = tmp_path / "run", tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config()))
    assert run_inprocess(["run", path, "--out", out, "--no-progress"], capsys)[0] == 0
    good = digest(out / "teacher.safetensors")
    data = bytearray((out / "teacher.safetensors").read_bytes())
    data[-5] ^= 0x10  # one bit of a weight
    (out / "teacher.safetensors").write_bytes(bytes(data))
    code, stdout, err = run_inprocess(["run", path, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    assert "does not match the SHA-256" in stdout and digest(out / "teacher.safetensors") == good
    # a user's teacher.weights with a .sha256 beside it is checked too
    (out / "teacher.safetensors").write_bytes(bytes(data))
    other = tmp_path / "other.yaml"
    cfg = tiny_config()
    cfg["teacher"] = {**cfg["teacher"], "weights": str(out / "teacher.safetensors")}
    cfg["teacher"].pop("train")
    other.write_text(yaml.safe_dump(cfg))
    code, _, err = run_inprocess(["run", other, "--out", tmp_path / "r2", "--no-progress"], capsys)
    assert code == 2 and "SHA-256" in err and len(err.strip().splitlines()) == 1


def test_a_teacher_at_chance_is_reported_or_refused(tmp_path, capsys):
    from kdistill.config import parse_config
    from kdistill.schemes.common import model_from

    cfg = tiny_config()
    parsed = parse_config(cfg)
    untrained = model_from(parsed.teacher, load_data(parsed.data), 5, "teacher")
    with torch.no_grad():
        for p in untrained.parameters():
            p.zero_()  # constant logits: predicts one class everywhere
    weights = tmp_path / "untrained.safetensors"
    save_weights(weights, untrained.state_dict())
    cfg["teacher"] = {**cfg["teacher"], "weights": str(weights)}
    cfg["teacher"].pop("train")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run_inprocess(["run", path, "--out", tmp_path / "r", "--no-progress", "--weak-teacher",
                                  "refuse"], capsys)
    assert code == 2 and "chance level" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r" / "baseline.safetensors").exists()  # refused before the student stages
    code, stdout, err = run_inprocess(["run", path, "--out", tmp_path / "r", "--no-progress"], capsys)
    assert code == 0 and "warning: the teacher scores" in stdout and "chance level" in stdout, err


def test_eval_of_an_unfinished_run_says_how_to_resume(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    code, _, err = run_inprocess(["eval", out], capsys)
    assert code == 2 and "not finished" in err and f"resume with: kdistill run {out}" in err


# -- 8. the Python API: numpy arrays of any float dtype, the same run directory, summary and table as the CLI ----
def test_api_on_numpy_float64_matches_the_cli(tmp_path, capsys):
    from kdistill.config import parse_config
    from kdistill.schemes.common import STUDENT_SEED, TEACHER_SEED, model_from

    raw = tiny_config()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert run_inprocess(["run", path, "--out", tmp_path / "cli", "--no-progress"], capsys)[0] == 0
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())

    cfg = parse_config(raw)
    bundle = load_data(cfg.data)
    teacher = model_from(cfg.teacher, bundle, cfg.seed + TEACHER_SEED, "teacher")
    student = model_from(cfg.student, bundle, cfg.seed + STUDENT_SEED, "student")
    as64 = {part: (ds.tensors["x"].numpy().astype(np.float64), ds.tensors["y"].numpy().astype(np.int32))
            for part, ds in (("train", bundle.train), ("test", bundle.test))}
    before = digest_state(student)
    result = kdistill.distill(teacher, student, as64["train"], test=as64["test"],
                              transfer=bundle.transfer.tensors["x"].numpy().astype(np.float64), out=tmp_path / "api",
                              train_teacher=True, teacher_train=raw["teacher"]["train"], alpha=0.9, temperature=2.0,
                              progress=False, eval_options=raw["eval"], **raw["train"])
    assert digest_state(student) == before  # the caller's model is not trained in place
    for name in ("teacher", "baseline", "student"):
        assert result.summary[name]["accuracy"] == cli[name]["accuracy"], name
        assert digest(tmp_path / "api" / f"{name}.safetensors") == digest(tmp_path / "cli" / f"{name}.safetensors")
    assert set(result.summary) == set(cli) and "student, KD" in result.table
    api_files = {p.name for p in (tmp_path / "api").iterdir()}
    assert api_files == {p.name for p in (tmp_path / "cli").iterdir()}
    code, _, err = run_inprocess(["run", tmp_path / "api"], capsys)  # an API run dir is not a CLI config
    assert code == 2 and "kdistill.distill" in err


def digest_state(model) -> list:
    return [v.detach().numpy().tobytes() for v in model.state_dict().values()]


def test_numpy_inputs_convert_or_fail_in_one_clear_line():
    ds = ArrayDataset({"x": np.zeros((4, 3), dtype=np.float64), "y": np.array([0.0, 1.0, 2.0, 1.0])})
    assert ds.tensors["x"].dtype == torch.float32 and ds.tensors["y"].dtype == torch.int64
    assert ds.batch(torch.tensor([1, 2]))["y"].tolist() == [1, 2]
    with pytest.raises(DataError, match="class indices"):
        ArrayDataset({"x": np.zeros((2, 3)), "y": np.array([0.5, 1.0])})
    with pytest.raises(DataError, match="LabelEncoder"):
        ArrayDataset({"x": np.zeros((2, 3)), "y": np.array(["cat", "dog"])})
    with pytest.raises(DataError, match="cannot convert inputs of dtype"):
        ArrayDataset({"x": np.array([["a", "b"], ["c", "d"]], dtype=object)})


# -- 10. progress: stage, step, rate, the stage's and the run's ETA; the label is not rich markup ----------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_name_the_stage_rate_and_both_etas():
    stream = io.StringIO()
    with run_plan({"teacher": 100, "student": 300}):
        with Progress(100, "[teacher] train", stream=stream) as bar:
            for _ in range(100):
                bar.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 20  # at least every 5 % in a piped log (it was every 10 %)
    assert lines[0].startswith("[teacher] train (stage 1/2): step 5/100, ")
    assert all("steps/s" in line and "ETA" in line and "run ETA" in line for line in lines)


def test_progress_bar_on_a_terminal_keeps_the_stage_label():
    stream = _Terminal()
    with Progress(10, "[teacher] train", stream=stream) as bar:
        bar.update(10)
    assert "[teacher] train" in stream.getvalue()
