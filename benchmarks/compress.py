"""Compress and deploy, measured: quantization-aware KD, pruning and low-rank with KD vs CE recovery, width vs
depth students, the full pipeline (distil -> prune -> QAT -> int8 ONNX), and a MiniLM embedding student in int8.

Every row is a real kdistill run (`kdistill.tasks` through the same code as ``kdistill run``) with a ``compress:``
/ ``export:`` section; the variants of one seed start from that seed's distilled student (its
``student.safetensors`` copied into the variant's run directory, so the student stage is loaded, not retrained)
and one teacher trained once. Accuracy is measured on the full Fashion-MNIST test set (10,000 images) from each
artifact on its own runtime (the run's ``deployed`` rows). Latency and bytes: one final measurement in this
process of seed 0's artifacts side by side (`kdistill.evaluate.deploy.deployed_timing`: interleaved rounds, at 1
thread and at all cores, batch 1 and 32).

    python benchmarks/compress.py --json benchmarks/results/compress.json              # ~50 min on 2 cores
    python benchmarks/compress.py --quick --json /tmp/compress_quick.json               # a check, ~4 min

Headline keys (points: accuracy percentage points; ratios: new / reference): ``qat_int8_minus_fp32_points``,
``int8_bytes_ratio`` (QAT int8 ONNX / fp32 student ONNX), ``int8_ort_latency_ratio_b32`` (same, onnxruntime at
batch 32, 1 thread), ``prune_kd_minus_ce_points``, ``lowrank_kd_minus_ce_points``, ``pipeline_bytes_ratio_vs_teacher``
(pipeline int8 ONNX / teacher fp32 ONNX), ``pipeline_retention``, ``minilm_int8_spearman_drop``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kdistill.provenance import git_revision  # noqa: E402


def base_config(quick: bool) -> dict:
    steps = 300 if quick else 3000
    return {
        "seed": 0,
        "data": {"name": "fashion_mnist", **({"train_size": 5000, "test_size": 2000} if quick else {})},
        "teacher": {"name": "cnn2d", "kwargs": {"channels": [32, 64, 128]},
                    "train": {"steps": 300 if quick else 4000, "batch_size": 128, "lr": 0.003,
                              "schedule": "onecycle", "log_every": 100}},
        "student": {"name": "cnn2d", "kwargs": {"channels": [16, 32, 64]}},
        "distill": {"alpha": 0.9, "temperature": 4.0},
        "train": {"steps": steps, "batch_size": 128, "lr": 0.003, "schedule": "onecycle", "log_every": 100,
                  "checkpoint_every": steps},
        "baseline": False,
        "eval": {"latency_repeats": 3, "throughput_batch": 64},
    }


def recovery(quick: bool, objective: str = "kd") -> dict:
    return {"steps": 60 if quick else 800, "objective": objective, "lr": 0.001}


def variants(quick: bool) -> dict:
    """name -> config changes over the seed's KD run (compress / export sections, or another student)."""
    kd, ce = recovery(quick), recovery(quick, "ce")
    prune = {"target": 0.5, "of": "macs", "scope": "global", "importance": "l2"}
    low_rank = {"energy": 0.6}
    return {
        "qat": {"compress": [{"quantize": {"mode": "qat", "recovery": kd}}], "export": None},
        "prune_kd": {"compress": [{"prune": {**prune, "recovery": kd}}], "export": {"int8": []}},
        "prune_ce": {"compress": [{"prune": {**prune, "recovery": ce}}], "export": None},
        "lowrank_kd": {"compress": [{"low_rank": {**low_rank, "recovery": kd}}], "export": None},
        "lowrank_ce": {"compress": [{"low_rank": {**low_rank, "recovery": ce}}], "export": None},
        "pipeline": {"compress": [{"prune": {**prune, "recovery": kd}}, {"quantize": {"mode": "qat", "recovery": kd}}],
                     "export": None},
    }


def run_config(raw: dict, out: Path) -> dict:
    from kdistill.tasks import parse_any

    task, cfg = parse_any(raw, str(out))
    return task.run(cfg, out, progress=False, log=lambda line: print(f"    {line}", flush=True))


def row_of(summary: dict, name: str) -> dict:
    return next(r for r in summary["deployed"] if r["name"] == name)


def seed_runs(seed: int, quick: bool, out: Path, teacher_file: Path | None, result: dict) -> None:
    cfg = base_config(quick)
    cfg["seed"] = seed
    if teacher_file is not None:
        cfg["teacher"] = {"name": cfg["teacher"]["name"], "kwargs": cfg["teacher"]["kwargs"],
                          "weights": str(teacher_file)}
    kd_dir = out / f"kd-s{seed}"
    t0 = time.perf_counter()
    summary = run_config({**cfg, "export": {"int8": ["static", "dynamic"]}}, kd_dir)
    rows = result.setdefault("runs", {}).setdefault(f"s{seed}", {})
    rows["teacher"] = row_of(summary, "teacher")["accuracy"]
    rows["student_fp32"] = row_of(summary, "student")["accuracy"]
    rows["student_fp32_onnx"] = row_of(summary, "student.onnx")["accuracy"]
    rows["student_int8_ptq_static"] = row_of(summary, "student.int8-static.onnx")["accuracy"]
    rows["student_int8_ptq_dynamic"] = row_of(summary, "student.int8-dynamic.onnx")["accuracy"]
    rows["onnx_fp32_max_abs_diff"] = json.loads((kd_dir / "student.onnx.json").read_text())["max_abs_diff"]
    print(f"  seed {seed} kd: {time.perf_counter() - t0:.0f} s, student {100 * rows['student_fp32']:.2f} %", flush=True)
    for name, change in variants(quick).items():
        run_dir = out / f"{name}-s{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        for f in ("student.safetensors", "student.safetensors.sha256"):
            if not (run_dir / f).exists():
                shutil.copy2(kd_dir / f, run_dir / f)
        raw = copy.deepcopy(cfg)
        raw["teacher"] = {"name": cfg["teacher"]["name"], "kwargs": cfg["teacher"]["kwargs"],
                          "weights": str(teacher_file or kd_dir / "teacher.safetensors")}
        raw["compress"] = change["compress"]
        if change["export"] is not None:
            raw["export"] = change["export"]
        t0 = time.perf_counter()
        summary = run_config(raw, run_dir)
        last = {"qat": "quantize", "pipeline": "quantize"}.get(name, name.split("_")[0].replace("lowrank", "low_rank"))
        rows[name] = row_of(summary, last)["accuracy"]
        print(f"  seed {seed} {name}: {time.perf_counter() - t0:.0f} s, {100 * rows[name]:.2f} %", flush=True)
    for name, student in (("width_half", {"from_teacher": {"width": 0.5}}),
                          ("depth_half", {"from_teacher": {"depth": 0.5}})):
        raw = copy.deepcopy(cfg)
        raw["teacher"] = {"name": cfg["teacher"]["name"], "kwargs": cfg["teacher"]["kwargs"],
                          "weights": str(teacher_file or kd_dir / "teacher.safetensors")}
        raw["student"] = student
        t0 = time.perf_counter()
        summary = run_config(raw, out / f"{name}-s{seed}")
        rows[name] = row_of(summary, "student")["accuracy"] if summary.get("deployed") else summary["student"]["accuracy"]
        rows[f"{name}_params"] = summary["student"]["params"]
        print(f"  seed {seed} {name}: {time.perf_counter() - t0:.0f} s, {100 * rows[name]:.2f} %", flush=True)


def stats(values: list[float]) -> dict:
    from scipy import stats as st

    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    half = st.t.ppf(0.975, len(values) - 1) * std / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": len(values), "values": values}


def timing(out: Path, quick: bool) -> dict:
    """Seed 0's artifacts side by side: bytes on disk and latency at batch 1 and 32 (interleaved)."""
    import torch

    from kdistill.compress.export import OrtModel, export_onnx
    from kdistill.config import parse_config
    from kdistill.data import load_data
    from kdistill.evaluate.deploy import deployed_timing
    from kdistill.files import load_weights
    from kdistill.schemes.common import model_from

    cfg = parse_config(base_config(quick))
    bundle = load_data(cfg.data)
    teacher = model_from(cfg.teacher, bundle, 0, "teacher")
    teacher.load_state_dict(load_weights(out / "kd-s0" / "teacher.safetensors"))
    teacher_onnx = out / "teacher.onnx"
    if not teacher_onnx.is_file():
        export_onnx(teacher.eval(), bundle.test.tensors["x"][:4], teacher_onnx, where="teacher")
    student = model_from(cfg.student, bundle, 0, "student")
    student.load_state_dict(load_weights(out / "kd-s0" / "student.safetensors"))
    files = {"teacher_fp32_onnx": teacher_onnx, "student_fp32_onnx": out / "kd-s0" / "student.onnx",
             "student_int8_ptq_static": out / "kd-s0" / "student.int8-static.onnx",
             "student_int8_qat": out / "qat-s0" / "quantize.int8.onnx",
             "pruned_kd_fp32_onnx": out / "prune_kd-s0" / "prune.onnx",
             "pipeline_int8": out / "pipeline-s0" / "quantize.int8.onnx"}
    models = {"teacher_fp32_torch": teacher.eval(), "student_fp32_torch": student.eval(),
              **{name: OrtModel(path) for name, path in files.items()}}
    x = bundle.test.tensors["x"]
    measured = deployed_timing(models, x[:1], x[:32], threads="auto", repeats=20 if quick else 200)
    sizes = {name: m.file_bytes for name, m in models.items() if isinstance(m, OrtModel)}
    sizes["teacher_fp32_torch"] = (out / "kd-s0" / "teacher.safetensors").stat().st_size
    sizes["student_fp32_torch"] = (out / "kd-s0" / "student.safetensors").stat().st_size
    return {"timing": measured, "bytes": sizes, "torch_threads_default": torch.get_num_threads()}


def int8_by_width(out: Path, quick: bool) -> dict:
    """How the int8 gain depends on model size: cnn2d at three widths (freshly initialised; latency and bytes do
    not depend on the weights' values), fp32 ONNX against static int8 ONNX (calibrated on 8 training batches),
    onnxruntime, interleaved, at batch 1 and 32."""
    import torch

    from kdistill.compress.export import OrtModel, export_onnx
    from kdistill.compress.onnx_int8 import quantize_onnx
    from kdistill.config import parse_config
    from kdistill.data import load_data
    from kdistill.evaluate.deploy import deployed_timing
    from kdistill.models.zoo import CNN2d

    bundle = load_data(parse_config(base_config(quick)).data)
    x = bundle.train.tensors["x"]
    rows, models = {}, {}
    for channels in ([8, 16, 32], [16, 32, 64], [32, 64, 128]):
        torch.manual_seed(0)
        name = "x".join(map(str, channels))
        fp32 = export_onnx(CNN2d((1, 28, 28), 10, channels).eval(), x[:4], out / "width" / f"{name}.onnx")
        int8 = quantize_onnx(fp32, out / "width" / f"{name}.int8-static.onnx", "static",
                             calibration=[x[i * 64:(i + 1) * 64] for i in range(8)])
        models[f"{name}_fp32"], models[f"{name}_int8"] = OrtModel(fp32), OrtModel(int8)
        rows[name] = {"params": sum(p.numel() for p in CNN2d((1, 28, 28), 10, channels).parameters()),
                      "bytes_fp32": fp32.stat().st_size, "bytes_int8": int8.stat().st_size}
    measured = deployed_timing(models, x[:1], x[:32], threads="auto", repeats=20 if quick else 100)
    at = measured["by_threads"][str(measured["primary_threads"])]
    for name, row in rows.items():
        row["bytes_ratio"] = row["bytes_int8"] / row["bytes_fp32"]
        for b in ("b1", "b32"):
            row[f"latency_ratio_{b}"] = at[f"{name}_int8"][f"latency_ms_{b}"] / at[f"{name}_fp32"][f"latency_ms_{b}"]
    return {"rows": rows, "timing": measured}


def minilm(out: Path, quick: bool) -> dict:
    """The MiniLM sentence-embedding student (examples/minilm.yaml at a reduced budget) exported to ONNX, fp32
    and int8 dynamic: Spearman against the teacher, bytes, latency (the run's deployed rows)."""
    from kdistill.tasks import load_any

    sets = ["data.max_train=192", "data.max_heldout=60", "data.max_probe=150", "data.heldout_tweets=150",
            "data.max_length=32", "train.steps=12", "train.batch_size=16", "train.warmup_steps=2"] if quick else \
        ["data.max_train=6000", "data.max_heldout=500", "data.max_length=64", "train.steps=600",
         "train.batch_size=32", "train.warmup_steps=30"]
    sets += ["scratch.objective=none", "eval.latency_repeats=10", "export.int8=[dynamic]"]
    task, cfg = load_any(ROOT / "examples" / "minilm.yaml", sets)
    summary = task.run(cfg, out / "minilm", progress=False, log=lambda line: print(f"    {line}", flush=True))
    rows = {r["name"]: r for r in summary["deployed"]}
    fp32, int8 = rows["student.onnx"], rows["student.int8-dynamic.onnx"]
    return {"overrides": sets, "rows": summary["deployed"], "spearman_fp32_torch": rows["student"]["spearman"],
            "spearman_fp32_onnx": fp32["spearman"], "spearman_int8": int8["spearman"],
            "spearman_drop": fp32["spearman"] - int8["spearman"], "bytes_ratio": int8["bytes"] / fp32["bytes"],
            "latency_ratio_b1": int8["latency_ms_b1"] / fp32["latency_ms_b1"],
            "latency_ratio_b32": int8["latency_ms_b32"] / fp32["latency_ms_b32"]}


def headline(result: dict) -> None:
    runs = list(result["runs"].values())

    def diff(a: str, b: str) -> dict:
        return stats([100 * (r[a] - r[b]) for r in runs])

    def mean_of(key: str) -> dict:
        return stats([100 * r[key] for r in runs])

    result["rows"] = {key: mean_of(key) for key in runs[0] if not key.endswith(("_params", "_diff"))}
    result["qat_int8_minus_fp32"] = diff("qat", "student_fp32")
    result["ptq_static_minus_fp32"] = diff("student_int8_ptq_static", "student_fp32")
    result["prune_kd_minus_ce"] = diff("prune_kd", "prune_ce")
    result["lowrank_kd_minus_ce"] = diff("lowrank_kd", "lowrank_ce")
    result["width_minus_depth"] = diff("width_half", "depth_half")
    result["qat_int8_minus_fp32_points"] = result["qat_int8_minus_fp32"]["mean"]
    result["prune_kd_minus_ce_points"] = result["prune_kd_minus_ce"]["mean"]
    result["lowrank_kd_minus_ce_points"] = result["lowrank_kd_minus_ce"]["mean"]
    result["pipeline_retention"] = statistics.fmean(r["pipeline"] / r["teacher"] for r in runs)
    t = result["deploy"]
    one = str(t["timing"]["primary_threads"])
    at = t["timing"]["by_threads"][one]
    result["int8_bytes_ratio"] = t["bytes"]["student_int8_qat"] / t["bytes"]["student_fp32_onnx"]
    result["int8_ort_latency_ratio_b32"] = at["student_int8_qat"]["latency_ms_b32"] / \
        at["student_fp32_onnx"]["latency_ms_b32"]
    result["pipeline_bytes_ratio_vs_teacher"] = t["bytes"]["pipeline_int8"] / t["bytes"]["teacher_fp32_onnx"]
    result["pipeline_latency_ratio_vs_teacher_b32"] = at["pipeline_int8"]["latency_ms_b32"] / \
        at["teacher_fp32_onnx"]["latency_ms_b32"]
    result["pipeline_latency_ratio_vs_teacher_b1"] = at["pipeline_int8"]["latency_ms_b1"] / \
        at["teacher_fp32_onnx"]["latency_ms_b1"]
    if "minilm" in result:
        result["minilm_int8_spearman_drop"] = result["minilm"]["spearman_drop"]


def pareto_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result["deploy"]
    at = t["timing"]["by_threads"][str(t["timing"]["primary_threads"])]
    acc_key = {"teacher_fp32_onnx": "teacher", "teacher_fp32_torch": "teacher", "student_fp32_torch": "student_fp32",
               "student_fp32_onnx": "student_fp32_onnx", "student_int8_ptq_static": "student_int8_ptq_static",
               "student_int8_qat": "qat", "pruned_kd_fp32_onnx": "prune_kd", "pipeline_int8": "pipeline"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, key in acc_key.items():
        acc = result["rows"][key]["mean"]
        axes[0].scatter(t["bytes"][name] / 1e3, acc)
        axes[0].annotate(name, (t["bytes"][name] / 1e3, acc), fontsize=7)
        axes[1].scatter(at[name]["latency_ms_b32"], acc)
        axes[1].annotate(name, (at[name]["latency_ms_b32"], acc), fontsize=7)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("file bytes on disk (kB, log)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel(f"latency at batch 32, {t['timing']['primary_threads']} thread(s) (ms, log)")
    for ax in axes:
        ax.set_ylabel("Fashion-MNIST top-1 % (mean of seeds)")
        ax.grid(alpha=0.3)
    fig.suptitle("kdistill compress: accuracy vs size and latency")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="run directories (default runs/bench-compress[-quick])")
    parser.add_argument("--no-minilm", action="store_true", help="skip the MiniLM part")
    args = parser.parse_args()
    import torch

    out = args.out or ROOT / "runs" / ("bench-compress-quick" if args.quick else "bench-compress")
    result = {"git_revision": git_revision(), "command": " ".join(["python", "benchmarks/compress.py", *sys.argv[1:]]),
              "torch": torch.__version__, "cores": len(os.sched_getaffinity(0)), "quick": args.quick,
              "config": base_config(args.quick), "variants": variants(args.quick)}

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")

    for seed in range(args.seeds):
        seed_runs(seed, args.quick, out, None if seed == 0 else out / "kd-s0" / "teacher.safetensors", result)
        save()
    result["deploy"] = timing(out, args.quick)
    save()
    result["int8_by_width"] = int8_by_width(out, args.quick)
    save()
    if not args.no_minilm:
        result["minilm"] = minilm(out, args.quick)
        save()
    headline(result)
    pareto_plot(result, args.json.with_suffix(".png"))
    save()
    keys = ["qat_int8_minus_fp32_points", "int8_bytes_ratio", "int8_ort_latency_ratio_b32", "prune_kd_minus_ce_points",
            "lowrank_kd_minus_ce_points", "pipeline_bytes_ratio_vs_teacher", "pipeline_retention",
            "minilm_int8_spearman_drop"]
    for key in keys:
        print(f"{key:34s} {result.get(key)}")


if __name__ == "__main__":
    main()
