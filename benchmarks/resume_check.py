"""Acceptance check of exact resume on the real demo job: SIGKILL, re-run, identical bytes.

1. `kdistill demo --out DIR/demo` writes the demo's resolved ``config.yaml`` first thing; once the file exists the
   demo process is stopped (only its config is needed). The config is used as written, with one change:
   ``train.deterministic: true``.
2. Reference: ``kdistill run DIR/config.yaml --out DIR/uninterrupted`` runs to the end in one process.
3. Interrupted: ``kdistill run DIR/config.yaml --out DIR/interrupted`` is killed with SIGKILL once in every stage
   (teacher, baseline, student) at a seeded random moment: after a seeded random metrics line of that stage
   shows, plus a seeded random delay of 0-3 s (so it lands anywhere: a step, a checkpoint write, an evaluation).
   After each kill the same command runs again (a fresh process, which resumes); the last run finishes.
4. The weights files of every stage (``student.safetensors`` is the acceptance criterion), their SHA-256, and
   metrics.jsonl are compared byte for byte.

    OMP_NUM_THREADS=1 python benchmarks/resume_check.py --json benchmarks/results/resume_check.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdistill.provenance import git_revision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = ("teacher", "baseline", "student")
WEIGHTS = tuple(f"{s}.safetensors" for s in STAGES)


def kdistill(*args) -> list[str]:
    return [sys.executable, "-m", "kdistill.cli", *map(str, args)]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def demo_config(work: Path) -> Path:
    """The config.yaml that `kdistill demo --out DIR` writes, with train.deterministic: true."""
    demo_dir = work / "demo"
    proc = subprocess.Popen(kdistill("demo", "--out", demo_dir, "--no-progress"), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    written = demo_dir / "config.yaml"
    deadline = time.monotonic() + 600
    while not written.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    if not written.is_file():
        raise SystemExit("kdistill demo did not write config.yaml")
    cfg = yaml.safe_load(written.read_text())
    cfg["train"]["deterministic"] = True
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def logged_steps(cfg: dict, stage: str) -> list[int]:
    train = cfg["teacher"]["train"] if stage == "teacher" and cfg["teacher"].get("train") else cfg["train"]
    every, steps = train["log_every"], train["steps"]
    return list(range(every, steps, every))


def logged(metrics: Path, stage: str) -> list[int]:
    steps = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("stage") == stage and "loss" in rec:
                steps.append(int(rec["step"]))
    return steps


def run_to_end(config: Path, out: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(kdistill("run", config, "--out", out, "--no-progress"), cwd=REPO, env=env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout


def run_and_kill(config: Path, out: Path, stage: str, step: int, delay: float) -> dict:
    """Start the run, wait until metrics.jsonl shows `stage` at `step`, wait `delay` s, SIGKILL."""
    metrics = out / "metrics.jsonl"
    target = f'"stage": "{stage}", "step": {step},'
    log = out.parent / f"kill-{stage}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(kdistill("run", config, "--out", out, "--no-progress"), cwd=REPO, env=env(),
                                stdout=fh, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if metrics.is_file() and target in metrics.read_text():
                time.sleep(delay)
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait()
    seconds = time.perf_counter() - t0
    last = {}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # the torn line a kill may leave
            last = rec
    return {"stage": stage, "after_step_logged": step, "delay_s": round(delay, 3), "seconds": round(seconds, 1),
            "killed": proc.returncode == -signal.SIGKILL, "last_metrics_record": {k: last.get(k) for k in
                                                                                   ("stage", "step")},
            "output": [line for line in log.read_text().splitlines() if "resumed" in line or "done earlier" in line
                       or "warning" in line]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--seed", type=int, default=2024, help="seed of the kill points")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kdistill-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    try:
        config = demo_config(work)
        cfg = yaml.safe_load(config.read_text())
        print(f"config: demo config as written by `kdistill demo`, train.deterministic: true ({config})", flush=True)

        reference_s, _ = run_to_end(config, work / "uninterrupted")
        print(f"uninterrupted run: {reference_s:.0f} s", flush=True)

        kills = []
        interrupted_s = 0.0
        for stage in STAGES:
            # a step this stage has not logged yet (a killed run may have logged past its last checkpoint)
            done = max(logged(work / "interrupted" / "metrics.jsonl", stage), default=0)
            candidates = [s for s in logged_steps(cfg, stage) if s > done]
            if not candidates:
                print(f"stage {stage} already finished: no kill", flush=True)
                continue
            step = rng.choice(candidates)
            delay = rng.uniform(0.0, 3.0)
            kill = run_and_kill(config, work / "interrupted", stage, step, delay)
            interrupted_s += kill["seconds"]
            kills.append(kill)
            print(f"SIGKILL in stage {stage}: {delay:.2f} s after step {step} was logged; killed={kill['killed']}",
                  flush=True)
        final_s, final_out = run_to_end(config, work / "interrupted")
        interrupted_s += final_s
        resumes = [line for kill in kills for line in kill["output"]] + \
            [line for line in final_out.splitlines() if "resumed" in line or "done earlier" in line]

        rows = []
        for name in WEIGHTS + ("metrics.jsonl",):
            a, b = digest(work / "uninterrupted" / name), digest(work / "interrupted" / name)
            rows.append({"file": name, "uninterrupted_sha256": a, "interrupted_sha256": b, "identical": a == b})
        print(f"\n{'file':22} {'uninterrupted':16} {'interrupted':16} identical")
        for r in rows:
            print(f"{r['file']:22} {r['uninterrupted_sha256'][:16]} {r['interrupted_sha256'][:16]} {r['identical']}")
        student_ok = rows[2]["identical"] and rows[2]["uninterrupted_sha256"] != "missing"
        print(f"\nstudent.safetensors byte-identical after {sum(k['killed'] for k in kills)} SIGKILLs: {student_ok}")
        result = {
            "git_revision": git_revision(),
            "command": "OMP_NUM_THREADS=1 python benchmarks/resume_check.py" +
                       (f" --json {args.json}" if args.json else "") + f" --seed {args.seed}",
            "config": cfg,
            "config_change": "train.deterministic: true (the only change to the demo's config.yaml)",
            "kills": kills,
            "resume_log": resumes,
            "files": rows,
            "student_identical": student_ok,
            "all_identical": all(r["identical"] for r in rows),
            "seconds": {"uninterrupted": round(reference_s, 1), "interrupted_total": round(interrupted_s, 1)},
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "omp_num_threads": env()["OMP_NUM_THREADS"], "cpus": os.cpu_count(),
                        "load_average": os.getloadavg()},
        }
        import torch

        result["machine"]["torch"] = torch.__version__
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        if not student_ok:
            raise SystemExit(1)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
