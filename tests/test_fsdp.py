"""FSDP2 (``train.distributed.kind: fsdp2``): two CPU processes (gloo) under torchrun train the same tiny LM
distillation job as one process, to the same weights; a run killed after a checkpoint resumes to the weights of an
unkilled run; bf16 with a whole teacher runs; bad settings are one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402

from kdistill.engine.fsdp import layer_classes  # noqa: E402
from kdistill.errors import ConfigError  # noqa: E402
from kdistill.train_config import DistributedConfig, TrainConfig  # noqa: E402

from tests.conftest import tiny_config  # noqa: E402
from tests.fsdp_job import run_encoder_job, run_job, run_task, tiny_llama  # noqa: E402

JOB = Path(__file__).with_name("fsdp_job.py")
PORT = 29531


def torchrun(out: Path, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(JOB.parents[1]), "KDISTILL_REPORT": "off"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(PORT),
           str(JOB), str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if expect_ok:
        first = [line for line in proc.stderr.splitlines() if line.startswith("[rank0]")]  # the root cause
        assert proc.returncode == 0, "\n".join(first[-40:]) + proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student.safetensors"))


@pytest.fixture(scope="module")
def unkilled(tmp_path_factory) -> Path:
    """The FSDP2 run (activation checkpointing, sharded teacher, 2 micro-batches per step), never interrupted;
    then, in the same processes, a stage in bf16 with a whole teacher, an encoder stage and a causal_lm task."""
    out = tmp_path_factory.mktemp("fsdp") / "unkilled"
    torchrun(out, "--set", "grad_accum=2", "--bf16-stage", "--encoder-stage", "--task")
    return out


def test_fsdp2_run_matches_one_process_with_the_same_global_batch(unkilled, tmp_path):
    ck = unkilled / "checkpoints" / "student" / "step-00000006"
    assert (ck / "sharded" / ".metadata").is_file() and not (ck / "model.safetensors").exists()
    run_job(str(tmp_path / "single"), world=1, overrides=["grad_accum=2"])
    one, two = weights(tmp_path / "single"), weights(unkilled)
    init = tiny_llama(2, seed=1).state_dict()  # the final file is a plain student: loads without distributed
    assert one.keys() == two.keys() == init.keys()
    for name in one:
        moved = (one[name] - init[name]).abs().max()
        assert moved > 1e-3, name  # trained
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)


def test_fsdp2_encoder_distillation_matches_one_process(unkilled, tmp_path):
    run_encoder_job(str(tmp_path), world=1)  # the projections built on the first batch come from process 0
    one, two = load_file(str(tmp_path / "encoder.safetensors")), load_file(str(unkilled / "encoder.safetensors"))
    assert one.keys() == two.keys() and not any("adapters" in k for k in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=2e-5, msg=name)


def test_causal_lm_task_under_fsdp2_matches_one_process(unkilled, tmp_path):
    """The whole job (top-k teacher cache, KD and CE stages, perplexities, export) with a sharded student."""
    one, two = run_task(str(tmp_path / "task"), world=1), json.loads((unkilled / "task" / "summary.json").read_text())
    assert two["objective"]["teacher"] == "cache" and (unkilled / "task" / "student" / "config.json").is_file()
    for key in ("teacher_ppl", "student_init_ppl", "student_kd_ppl", "student_ce_ppl"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    assert two["student_kd_ppl"] < two["student_init_ppl"]  # trained


def test_killed_fsdp2_run_resumes_to_the_unkilled_weights(unkilled, tmp_path):
    out = tmp_path / "killed"
    proc = torchrun(out, "--set", "grad_accum=2", "--kill-at", "4", expect_ok=False)
    assert proc.returncode != 0
    steps = sorted(p.name for p in (out / "checkpoints" / "student").iterdir())
    assert steps == ["step-00000003"] and not (out / "student.safetensors").exists()
    proc = torchrun(out, "--set", "grad_accum=2")
    assert "resumed_from 3" in proc.stdout
    resumed, reference = weights(out), weights(unkilled)
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-6, msg=name)


def test_fsdp2_bf16_with_a_whole_teacher_trains(unkilled):
    final = load_file(str(unkilled / "bf16.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in final.values())  # float32 masters
    init = tiny_llama(2, seed=1).state_dict()
    assert all((final[k] - init[k]).abs().max() > 1e-3 for k in init)
    lines = [yaml.safe_load(line) for line in (unkilled / "metrics.jsonl").read_text().splitlines()]
    kd = [r["terms"]["kd"] for r in lines if r.get("stage") == "bf16" and "terms" in r]
    assert len(kd) == 3 and all(0 < v < 10 for v in kd)


def test_fsdp2_without_a_launcher_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from kdistill.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = tmp_path / "c.yaml"
    cfg = tiny_config(train={"distributed": {"kind": "fsdp2"}}, data={"name": "mnist1d", "train_size": 128})
    cfg["teacher"]["train"]["steps"] = 1
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fsdp2" in err[0] and "train.distributed.kind" in err[0]
    assert "accelerate launch --num_processes" in err[0] and "torchrun" in err[0]


def test_settings_that_cannot_be_sharded_are_config_errors():
    dist = DistributedConfig(kind="fsdp2")
    with pytest.raises(ConfigError, match="no layer class.*layer_classes"):
        layer_classes(torch.nn.Sequential(torch.nn.Linear(4, 4)), dist, "student")
    with pytest.raises(ConfigError, match="no module of class Nope.*LlamaDecoderLayer"):
        layer_classes(tiny_llama(1, seed=0), DistributedConfig(kind="fsdp2", layer_classes=["Nope"]), "student")
    assert layer_classes(tiny_llama(1, seed=0), dist, "student") == ["LlamaDecoderLayer"]
    with pytest.raises(ValueError, match="fsdp2 cannot be combined with mixed_precision: bf16"):
        TrainConfig(distributed={"kind": "fsdp2"}, mixed_precision="bf16")
