"""The embedded default job of `kdistill demo`: mnist1d, a 1-D CNN teacher, a 1-D CNN student 13x smaller.

The practical setting of distillation: few labels, many unlabeled inputs. The teacher (cnn1d, 64 channels, 4
blocks: 65.5k parameters, 1.47M FLOPs per sample) is trained on 1000 labelled mnist1d samples; the student (cnn1d,
16 channels, 4 blocks: 4.9k parameters and 98k FLOPs, 13x and 15x fewer; `tests/test_demo_claims.py` checks these
numbers) is trained twice with the same steps: on the 1000 labels alone (baseline), and with Hinton KD on the
labelled set plus a transfer set of 40000 unlabeled inputs drawn from the same generator with another seed,
labelled only by the teacher, whose outputs are computed once and cached (`teacher.cache`).

``python -m kdistill.demo --json FILE`` runs the demo as `kdistill demo` does and writes its measured numbers
(accuracies, parameters, FLOPs, ratios, wall time) with the git revision, command, torch version and threads:
``benchmarks/results/demo.json``, where the README's numbers come from.
"""

from kdistill.provenance import git_revision

DEMO_CONFIG = {
    "seed": 0,
    "data": {"name": "mnist1d", "train_size": 1000, "transfer": {"size": 40000, "seed": 1}},
    "teacher": {
        "name": "cnn1d",
        "kwargs": {"channels": 64, "depth": 4},
        "train": {"steps": 1500, "batch_size": 128, "lr": 0.003, "schedule": "onecycle", "log_every": 100},
        "cache": {"dtype": "float32"},
    },
    "student": {"name": "cnn1d", "kwargs": {"channels": 16, "depth": 4}},
    "distill": {"alpha": 0.9, "temperature": 2.0},
    "train": {"steps": 2000, "batch_size": 256, "lr": 0.003, "schedule": "onecycle", "log_every": 100,
              "checkpoint_every": 1000},
    "baseline": True,
}


def measure(json_path: str, out: str) -> dict:
    """Run the demo (as `kdistill demo --out OUT --no-progress`) and write its numbers to `json_path`."""
    import json
    import os
    import time
    from pathlib import Path

    import torch

    from kdistill.cli import main

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    code = main(["demo", "--out", out, "--no-progress"])
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(code)
    summary = json.loads((Path(out) / "summary.json").read_text())
    rows = {name: {k: summary[name][k] for k in ("accuracy", "params", "flops") if k in summary[name]}
            for name in ("teacher", "baseline", "student")}
    t, s, b = rows["teacher"], rows["student"], rows["baseline"]
    result = {
        "command": f"python -m kdistill.demo --json {json_path} --out {out}", "git_revision": git_revision(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
        "wall_seconds": seconds, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "config": DEMO_CONFIG, "models": rows,
        "param_ratio": t["params"] / s["params"], "flops_ratio": t["flops"] / s["flops"],
        "retention": s["accuracy"] / t["accuracy"], "kd_minus_scratch_points": 100 * (s["accuracy"] - b["accuracy"]),
        "train_threads": summary.get("train_threads"),
    }
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="run the demo and write its measured numbers as JSON")
    parser.add_argument("--json", required=True, help="e.g. benchmarks/results/demo.json")
    parser.add_argument("--out", default="runs/demo-measure", help="the run directory (must be new or the demo's)")
    args = parser.parse_args()
    r = measure(args.json, args.out)
    print(f"params {r['param_ratio']:.1f}x, FLOPs {r['flops_ratio']:.1f}x, retention {r['retention']:.3f}, "
          f"KD - scratch {r['kd_minus_scratch_points']:.1f} points, {r['wall_seconds']:.0f} s; written {args.json}")
