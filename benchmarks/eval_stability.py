"""`kdistill eval` on a busy machine: N consecutive evaluations of one run directory while one CPU-bound process
competes for the cores; the speedups and their deviation from the median.

    python benchmarks/eval_stability.py RUN_DIR --json benchmarks/results/eval_stability.json [--repeats 10]

RUN_DIR is a finished offline run (e.g. from `python -m kdistill.demo --out runs/demo-measure`). Each evaluation
runs `kdistill eval RUN_DIR` in a fresh process (as a user would) and reads the `eval-*.json` it writes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdistill.provenance import git_revision  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quiet", action="store_true", help="no competing process")
    args = parser.parse_args()
    busy = None if args.quiet else subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"])
    kdistill = Path(sys.executable).with_name("kdistill")
    rows = []
    try:
        for i in range(args.repeats):
            before = set(args.run_dir.glob("eval-*.json"))
            t0 = time.perf_counter()
            subprocess.run([str(kdistill), "eval", str(args.run_dir)], check=True, capture_output=True, text=True)
            new = sorted(set(args.run_dir.glob("eval-*.json")) - before)
            summary = json.loads(new[-1].read_text())
            rows.append({"speedup": summary["speedup"], "speedup_spread": summary.get("speedup_spread"),
                         "teacher_latency_ms": summary["teacher"]["latency_ms"],
                         "student_latency_ms": summary["student"]["latency_ms"],
                         "seconds": time.perf_counter() - t0, "file": new[-1].name})
            print(f"{i + 1:2d}: speedup {summary['speedup']:.3f}  teacher {summary['teacher']['latency_ms']:.3f} ms  "
                  f"student {summary['student']['latency_ms']:.3f} ms", flush=True)
    finally:
        if busy is not None:
            busy.terminate()
            busy.wait()
    speedups = [r["speedup"] for r in rows]
    median = statistics.median(speedups)
    worst = max(abs(s / median - 1) for s in speedups)
    result = {"git_revision": git_revision(), "command": " ".join(["python", *sys.argv]),
              "torch": __import__("torch").__version__, "python": platform.python_version(),
              "competing_process": not args.quiet, "repeats": args.repeats, "speedups": speedups,
              "median_speedup": median, "max_deviation_from_median": worst, "within_25_percent": worst <= 0.25,
              "rows": rows}
    args.json.write_text(json.dumps(result, indent=2))
    print(f"median speedup {median:.3f}, largest deviation {100 * worst:.1f} % "
          f"({'within' if worst <= 0.25 else 'outside'} +-25 %)")


if __name__ == "__main__":
    main()
