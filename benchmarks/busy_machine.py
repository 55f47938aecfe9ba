"""The demo on a busy machine: per-step time of its teacher and student stages at `train.threads` auto, 1 and all
cores, without and with one CPU-bound competing process, and the wall time of the whole demo, quiet and busy.

The competitor is a Python busy loop in a subprocess, started and stopped by this script. Each measurement runs in
a fresh child process with OMP_NUM_THREADS / MKL_NUM_THREADS removed from its environment (so `threads: auto`
calibrates instead of deferring to the user's setting). A stage's per-step time is the engine's wall time of
`--steps` steps over the steps (calibration steps included: they are what auto costs).

    python benchmarks/busy_machine.py --json benchmarks/results/busy_machine.json        # ~30 min on 2 cores
    python benchmarks/busy_machine.py --json /tmp/busy_quick.json --quick                 # a check, ~3 min

Keys: ``demo_quiet_s``, ``demo_busy_s``, ``demo_busy_over_quiet``, ``auto_vs_best_quiet``, ``auto_vs_best_busy``
(the worst stage: auto's per-step time over the better of 1 thread and all cores), ``step_ms``
(load -> stage -> setting -> ms per step), ``auto_threads`` (what auto chose), ``git``, ``command``, ``torch``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kdistill.provenance import git_revision  # noqa: E402
BUSY_LOOP = "while True:\n    pass\n"


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def child(stage: str, setting: str, steps: int) -> dict:
    """One stage of the demo for `steps` steps at `setting`, in this (fresh) process: ms per step."""
    from kdistill.config import parse_config
    from kdistill.data import load_data
    from kdistill.demo import DEMO_CONFIG
    from kdistill.distiller import Distiller, Term, terms_from_config
    from kdistill.schemes.common import model_from
    from kdistill.tasks.job import run_stage
    from kdistill.teachers.live import freeze

    raw = json.loads(json.dumps(DEMO_CONFIG))
    raw["data"]["transfer"]["size"] = 4000  # the step time does not depend on the transfer set's size
    cfg = parse_config(raw, "demo config")
    bundle = load_data(cfg.data)
    threads = setting if setting == "auto" else int(setting)
    teacher = model_from(cfg.teacher, bundle, cfg.seed + 101, "teacher")
    if stage == "teacher":
        train = cfg.teacher.train.model_copy(update={"steps": steps, "threads": threads})
        objective, data = Distiller(teacher, None, [Term("ce", "ce")]), bundle.train
    else:
        train = cfg.train.model_copy(update={"steps": steps, "threads": threads, "checkpoint_every": 0})
        terms = terms_from_config(cfg.distill.resolved_terms())
        objective = Distiller(model_from(cfg.student, bundle, cfg.seed + 202, "student"), freeze(teacher), terms)
        data = bundle.distill_set()
    _, result = run_stage(stage, objective, data, train, seed=0)
    return {"step_ms": 1000 * result["seconds"] / steps, "threads": result["threads"]["threads"],
            "events": result["threads"]["events"]}


def run_child(stage: str, setting: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", stage, setting, str(steps)], env=clean_env(),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_demo(quick: bool) -> float:
    """Wall seconds of `kdistill demo` (with --quick: the demo config with short stages, via `kdistill run`)."""
    kdistill = Path(sys.executable).with_name("kdistill")
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            import yaml

            from kdistill.demo import DEMO_CONFIG

            raw = json.loads(json.dumps(DEMO_CONFIG))
            raw["data"]["transfer"]["size"] = 2000
            raw["teacher"]["train"]["steps"] = 150
            raw["train"].update(steps=150, checkpoint_every=50)
            (Path(tmp) / "demo.yaml").write_text(yaml.safe_dump(raw))
            cmd = [str(kdistill), "run", str(Path(tmp) / "demo.yaml"), "--out", str(Path(tmp) / "run"),
                   "--no-progress"]
        else:
            cmd = [str(kdistill), "demo", "--out", str(Path(tmp) / "run"), "--no-progress"]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=clean_env(), check=True, capture_output=True)
        return time.perf_counter() - t0


class Competitor:
    """One CPU-bound process (a Python busy loop) for the duration of a `with` block."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=False)
    parser.add_argument("--quick", action="store_true", help="short stages and a short demo (a check, not a result)")
    parser.add_argument("--steps", type=int, default=None, help="steps per stage measurement (default 300; quick 30)")
    parser.add_argument("--child", nargs=3, metavar=("STAGE", "SETTING", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]))))
        return
    import torch

    steps = args.steps or (30 if args.quick else 300)
    cores = len(os.sched_getaffinity(0))
    settings = ["auto", "1"] + ([str(cores)] if cores > 1 else [])
    result = {"git": git_revision(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "torch": torch.__version__, "platform": platform.platform(), "cores": cores, "quick": args.quick,
              "steps_per_measurement": steps, "step_ms": {}, "auto_threads": {}}

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    for load in ("quiet", "busy"):
        competitor = Competitor() if load == "busy" else None
        try:
            if competitor:
                competitor.__enter__()
            for stage in ("teacher", "student"):
                for setting in settings:
                    r = run_child(stage, setting, steps)
                    result["step_ms"].setdefault(load, {}).setdefault(stage, {})[setting] = r["step_ms"]
                    if setting == "auto":
                        result["auto_threads"].setdefault(load, {})[stage] = r["threads"]
                    print(f"{load:5s} {stage:7s} threads={setting:4s} {r['step_ms']:8.2f} ms/step"
                          f"{'  (auto chose ' + str(r['threads']) + ')' if setting == 'auto' else ''}", flush=True)
                    save()
            result[f"demo_{load}_s"] = run_demo(args.quick)
            print(f"{load:5s} demo wall {result[f'demo_{load}_s']:.1f} s", flush=True)
            save()
        finally:
            if competitor:
                competitor.__exit__(None, None, None)
        by_stage = result["step_ms"][load]
        result[f"auto_vs_best_{load}"] = max(v["auto"] / min(t for s, t in v.items() if s != "auto")
                                             for v in by_stage.values())
        save()
    result["demo_busy_over_quiet"] = result["demo_busy_s"] / result["demo_quiet_s"]
    save()
    print(f"\nauto vs best: quiet {result['auto_vs_best_quiet']:.2f}x, busy {result['auto_vs_best_busy']:.2f}x; "
          f"demo quiet {result['demo_quiet_s']:.1f} s, busy {result['demo_busy_s']:.1f} s "
          f"({result['demo_busy_over_quiet']:.2f}x)")


if __name__ == "__main__":
    main()
