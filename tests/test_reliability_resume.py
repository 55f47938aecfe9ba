"""Exact resume: a run killed at any moment (SIGKILL in any stage, SIGTERM, SIGINT, a kill during a checkpoint
write or between a stage's last checkpoint and its weights file) and run again ends with the same bytes as an
uninterrupted run: weights files of every stage and metrics.jsonl (deterministic mode, `train.deterministic`)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kdistill.cli import main
from kdistill.engine.checkpoint import list_checkpoints, step_of

from tests import reliability_models
from tests.reliability_support import (REPO, STEPS, WEIGHTS, cli_command, cli_env, config, digest, leftovers,
                                       run_inprocess, run_subprocess, write_config, write_idx_dataset)

SEED = 20240611  # the kill points are drawn from this seed (printed in failure messages)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (in this process): its weights digests and metrics lines."""
    folder = tmp_path_factory.mktemp("reference")
    cfg = write_config(folder, config(write_idx_dataset(folder / "data")))
    reliability_models.reset_counts()
    assert main(["run", str(cfg), "--out", str(folder / "run"), "--no-progress"]) == 0
    run = folder / "run"
    return {"config": cfg, "dir": run, "weights": {w: digest(run / w) for w in WEIGHTS},
            "metrics": training_lines(run / "metrics.jsonl")}


def training_lines(path: Path) -> str:
    """metrics.jsonl without the thread-count records: those describe the process (its OMP_NUM_THREADS, which
    differs between the in-process reference and the CLI subprocesses), not the training."""
    return "".join(line + "\n" for line in path.read_text().splitlines() if '"event": "threads' not in line)


def assert_same_as_reference(run_dir: Path, reference: dict, context: str) -> None:
    for w in WEIGHTS:
        assert digest(run_dir / w) == reference["weights"][w], f"{w} differs ({context})"
    assert training_lines(run_dir / "metrics.jsonl") == reference["metrics"], f"metrics.jsonl differs ({context})"
    assert leftovers(run_dir) == [], context


def latest_step(run_dir: Path, stage: str) -> int:
    found = list_checkpoints(run_dir / "checkpoints" / stage)
    return step_of(found[-1]) if found else 0


def kill_when_logged(proc: subprocess.Popen, metrics: Path, stage: str, step: int, timeout: float = 120) -> None:
    """SIGKILL `proc` from outside as soon as metrics.jsonl shows `stage` at `step`."""
    target = f'"stage": "{stage}", "step": {step},'
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.is_file() and target in metrics.read_text():
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_killed_in_every_stage_then_resumed_is_bit_identical(tmp_path, reference, capsys):
    """One run, interrupted three times at seeded random steps, each time resumed by a new process:
    SIGKILL in the teacher stage (sent by the process to itself in a step), SIGTERM (a preemption) in the
    baseline stage, then SIGKILL from outside as soon as a random student step is logged (it lands wherever the
    process is: a step, an evaluation, a checkpoint write)."""
    rng = random.Random(SEED)
    run_dir = tmp_path / "run"
    cfg = reference["config"]
    kills = []
    # 1) the teacher stage: SIGKILL in the forward of its k-th step
    k = rng.randint(2, STEPS - 1)
    kills.append(("teacher", "SIGKILL", k))
    proc = run_subprocess("run", cfg, "--out", run_dir, "--no-progress", KDISTILL_TEST_KILL=f"teacher:{k}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (run_dir / "teacher.safetensors").exists() and latest_step(run_dir, "teacher") == (k - 1) // 4 * 4
    # 2) the baseline stage (the first student-role model trained in the process): SIGTERM at its k-th step; the
    # teacher stage resumes first
    k = rng.randint(1, STEPS - 1)
    kills.append(("baseline", "SIGTERM", k))
    proc = run_subprocess("run", cfg, "--out", run_dir, "--no-progress", KDISTILL_TEST_KILL=f"student:{k}:SIGTERM")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "[teacher] resumed from" in proc.stdout and (run_dir / "teacher.safetensors").is_file()
    assert proc.stderr.strip().splitlines()[-1] == (
        f"kdistill: stopped by SIGTERM at step {k} of stage 'baseline'; a checkpoint was written: "
        f"resume with: kdistill run {run_dir}"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and latest_step(run_dir, "baseline") == k
    # 3) the student stage: SIGKILL from outside once a random student step shows in metrics.jsonl
    k = rng.randint(1, 20)
    kills.append(("student", "external SIGKILL", k))
    proc = subprocess.Popen(cli_command("run", run_dir, "--no-progress"), cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_when_logged(proc, run_dir / "metrics.jsonl", "student", k)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill ({kills})"
    assert (run_dir / "baseline.safetensors").is_file() and not (run_dir / "student.safetensors").exists()
    # 4) the last run finishes
    code, out, err = run_inprocess(["run", cfg, "--out", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert_same_as_reference(run_dir, reference, f"interruptions {kills}")


def test_sigint_checkpoints_exits_130_and_prints_the_resume_command(tmp_path, reference, capsys):
    """Ctrl-C at a student step (in this process): a checkpoint at that step, one line naming the command that
    resumes, exit 130; that command then ends where the uninterrupted run ends."""
    run_dir = tmp_path / "run"
    k = random.Random(SEED + 1).randint(1, STEPS - 1)
    os.environ["KDISTILL_TEST_KILL"] = f"student:{STEPS + k}:SIGINT"  # after the 30 baseline steps
    try:
        code, out, err = run_inprocess(["run", reference["config"], "--out", run_dir, "--no-progress"], capsys)
    finally:
        del os.environ["KDISTILL_TEST_KILL"]
    assert code == 128 + signal.SIGINT
    assert err.strip() == (f"kdistill: stopped by SIGINT at step {k} of stage 'student'; a checkpoint was written: "
                           f"resume with: kdistill run {run_dir}")
    assert latest_step(run_dir, "student") == k and not (run_dir / "student.safetensors").exists()
    code, out, err = run_inprocess(["run", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert f"[student] resumed from {run_dir / 'checkpoints' / 'student' / f'step-{k:08d}'}" in out
    assert_same_as_reference(run_dir, reference, f"SIGINT at student step {k}")


def copy_run(reference: dict, dest: Path) -> Path:
    shutil.copytree(reference["dir"], dest)
    return dest


def test_kill_after_the_last_checkpoint_before_the_weights_file(tmp_path, reference, capsys):
    """A kill between a stage's final checkpoint and its weights file: the stage resumes at its last step."""
    run_dir = copy_run(reference, tmp_path / "run")
    for name in ("student.safetensors", "summary.json"):
        (run_dir / name).unlink()
    code, out, err = run_inprocess(["run", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert f"resumed from {run_dir / 'checkpoints' / 'student' / f'step-{STEPS:08d}'}" in out
    assert_same_as_reference(run_dir, reference, "kill before student.safetensors")


def test_kill_during_a_checkpoint_write_and_a_torn_metrics_line(tmp_path, reference, capsys):
    """State after a kill in the middle of writing the student's final checkpoint: a half-written ``.tmp``
    folder (truncated weights, no meta.json), no weights file, and a torn last line in metrics.jsonl."""
    run_dir = copy_run(reference, tmp_path / "run")
    ckpts = run_dir / "checkpoints" / "student"
    final = ckpts / f"step-{STEPS:08d}"
    half = final.with_name(final.name + ".tmp")
    final.rename(half)
    (half / "meta.json").unlink()
    model = half / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    (run_dir / "student.safetensors").unlink()
    (run_dir / "summary.json").unlink()
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    last_student = max(i for i, line in enumerate(lines) if '"stage": "student"' in line)
    metrics.write_text("\n".join(lines[:last_student]) + "\n" + lines[last_student][:37])  # torn mid-record
    code, out, err = run_inprocess(["run", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert "[student] resumed from" in out and "step-00000028" in out
    assert_same_as_reference(run_dir, reference, "kill during a checkpoint write")


def test_damaged_newest_checkpoint_falls_back_and_still_ends_identical(tmp_path, reference, capsys):
    run_dir = copy_run(reference, tmp_path / "run")
    newest = run_dir / "checkpoints" / "student" / f"step-{STEPS:08d}"
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in a weight
    (newest / "model.safetensors").write_bytes(bytes(data))
    (run_dir / "student.safetensors").unlink()
    code, out, err = run_inprocess(["run", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert "model.safetensors checksum mismatch" in out and "falling back" in out
    assert "resumed from" in out and "step-00000028" in out
    assert "Traceback" not in out + err
    assert_same_as_reference(run_dir, reference, "damaged newest checkpoint")


def test_damaged_stage_weights_file_is_recreated_from_its_checkpoint(tmp_path, reference, capsys):
    run_dir = copy_run(reference, tmp_path / "run")
    (run_dir / "teacher.safetensors").write_bytes((run_dir / "teacher.safetensors").read_bytes()[:-40])
    code, out, err = run_inprocess(["run", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert "warning: cannot read weights" in out and "re-creating it" in out
    assert_same_as_reference(run_dir, reference, "truncated teacher.safetensors")
    assert json.loads((run_dir / "summary.json").read_text())["student"]["accuracy"] > 0


# -- environment faults ---------------------------------------------------------------------------------------
def test_an_out_directory_that_cannot_be_created_is_one_line(tmp_path, reference, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    code, out, err = run_inprocess(["run", reference["config"], "--out", tmp_path / "file" / "run"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"kdistill: error: cannot create the run directory {tmp_path / 'file' / 'run'}: Not a directory: "
        "choose a writable --out directory"]


@pytest.fixture
def small_disk(tmp_path):
    """A 8 MiB tmpfs (root only): a disk that can really fill up and be made read-only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """Fill the file system of `folder` up to `leave` free bytes."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free - leave
    with open(filler, "wb") as fh:
        while free > 0:
            n = min(free, 1 << 20)
            try:
                fh.write(b"\0" * n)
                fh.flush()
            except OSError:
                break
            free -= n
    return filler


def test_full_then_read_only_disk_fail_in_one_line_and_lose_nothing(small_disk, reference, capsys):
    from kdistill.engine.checkpoint import verify

    run_dir = small_disk / "run"
    cfg = reference["config"]
    os.environ["KDISTILL_TEST_KILL"] = "student:9:SIGINT"  # stop in the baseline stage at step 9
    try:
        code, out, err = run_inprocess(["run", cfg, "--out", run_dir, "--no-progress"], capsys)
    finally:
        del os.environ["KDISTILL_TEST_KILL"]
    assert code == 128 + signal.SIGINT, err
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    checkpoints = [c for stage in ("teacher", "baseline") for c in list_checkpoints(run_dir / "checkpoints" / stage)]
    # the disk fills up: a little room for metrics lines, none for a checkpoint
    filler = fill(small_disk, leave=48 * 1024)
    code, out, err = run_inprocess(["run", run_dir, "--no-progress"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"kdistill: error: cannot write checkpoint {run_dir / 'checkpoints' / 'baseline'}"
                               f"/step-00000014: No space left on device: free disk space"), err
    assert "Traceback" not in err
    assert all(verify(c) is None for c in checkpoints) and leftovers(run_dir) == []
    filler.unlink()
    # the disk becomes read-only
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    code, out, err = run_inprocess(["run", run_dir, "--no-progress"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Read-only file system" in lines[0] and "Traceback" not in err, err
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    for path, data in before.items():  # every checkpoint file and weights file of before is there, unchanged
        if path.name != "metrics.jsonl":
            assert path.read_bytes() == data, path
    # with room again, the same command finishes the run as if nothing had happened
    code, out, err = run_inprocess(["run", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert_same_as_reference(run_dir, reference, "full disk, then read-only disk")
