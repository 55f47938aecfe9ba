"""Cross-tokenizer distillation demo: SmolLM2-135M (byte-level BPE, 49152 tokens) teaches a small causal LM that
uses the BERT WordPiece tokenizer of all-MiniLM-L6-v2 (30522 tokens, uncased).

Three students from the same initial weights, same windows, same order and the same number of steps:

* ``ce``: next-token cross-entropy on the student's own tokens only;
* ``uld``: CE + ``uld_weight`` x span-aligned ULD (sorted L1 of the next-token distributions, Boizard et al. 2024);
* ``gold``: CE + ``gold_weight`` x GOLD-style loss (sorted L1 of merged span distributions) + its exact-match
  JSD on the tokens both vocabularies share (the hybrid).

The teacher's top-k span values are computed once on the training windows (cached on disk) and shared by every
student and seed. The measure is held-out bits per character: the student's next-token NLL in bits summed over
held-out Wikipedia windows (articles never trained on) divided by their number of characters; the teacher's own
bits per character on the same text is the reference.

    python benchmarks/cross_tokenizer.py --json benchmarks/results/cross_tokenizer.json
    python benchmarks/cross_tokenizer.py --quick --json /tmp/cross_tokenizer_quick.json       # a check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdistill.data.arrays import ArrayDataset  # noqa: E402
from kdistill.llm.config import LMRunConfig  # noqa: E402
from kdistill.llm.cross_distiller import ColumnTeacher, CrossTokenizerDistiller, bits_per_char  # noqa: E402
from kdistill.llm.cross_distiller import precompute_teacher  # noqa: E402
from kdistill.llm.cross_job import cross_corpus, load_student_tokenizer, scratch_student  # noqa: E402
from kdistill.llm.cross_tokenizer_align import build_vocab_map  # noqa: E402
from kdistill.llm.hf import load_smollm2  # noqa: E402
from kdistill.objective import Term  # noqa: E402
from kdistill.provenance import git_revision  # noqa: E402
from kdistill.tasks.job import run_stage  # noqa: E402
from kdistill.train_config import TrainConfig  # noqa: E402

# sized for ~25 minutes at one thread on a shared 2-core machine (the teacher's forward passes dominate)
FULL = dict(train_windows=128, heldout_windows=32, block_size=64, steps=60, batch_size=8, seeds=[0, 1, 2], k=128)
QUICK = dict(train_windows=16, heldout_windows=8, block_size=64, steps=6, batch_size=4, seeds=[0], k=64)
LR, ULD_WEIGHT, GOLD_WEIGHT, MATCHED_WEIGHT = 5e-3, 1.0, 1.0, 1.0


def arms() -> dict[str, list[Term]]:
    ce = Term("ce", "ce", 1.0)
    return {"ce": [ce], "uld": [ce, Term("uld", "uld", ULD_WEIGHT)],
            "gold": [ce, Term("gold", "gold", GOLD_WEIGHT, params={"matched_weight": MATCHED_WEIGHT,
                                                                     "matched_divergence": "jsd", "beta": 0.5})]}


def teacher_columns(teacher, train, vocab_map, k: int, cache: Path, log) -> dict:
    key = f"{train.fingerprint()}-k{k}-shared{len(vocab_map)}"
    path = cache / f"cross-tokenizer-{key}.safetensors"
    if path.is_file():
        from kdistill.files import load_weights

        log(f"teacher values reused: {path}")
        return load_weights(path)
    from kdistill.files import save_weights

    t0 = time.perf_counter()
    columns = precompute_teacher(teacher, train, k=k, vocab_map=vocab_map, matched_k=k, batch_size=8, log=None)
    log(f"teacher values: {time.perf_counter() - t0:.0f} s for {len(train)} windows")
    cache.mkdir(parents=True, exist_ok=True)
    save_weights(path, {name: value.contiguous() for name, value in columns.items()})
    return columns


def summary_of(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values), "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/kdistill-cross-tokenizer-cache"))
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    result = {"git_revision": git_revision(),
              "command": " ".join(["python", "benchmarks/cross_tokenizer.py", *sys.argv[1:]]),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "quick": args.quick, "plan": plan,
              "lr": LR, "uld_weight": ULD_WEIGHT, "gold_weight": GOLD_WEIGHT, "matched_weight": MATCHED_WEIGHT}
    cfg = LMRunConfig.model_validate({
        "task": "causal_lm", "student": {"tokenizer": "minilm", "size": {"hidden_size": 128, "num_layers": 2,
                                                                         "num_heads": 4, "intermediate_size": 512}},
        "data": {"block_size": plan["block_size"], "heldout_fraction": 0.1, "max_train_blocks": plan["train_windows"],
                 "max_heldout_blocks": plan["heldout_windows"]},
        "distill": {"terms": [{"loss": "ce"}, {"loss": "uld"}]}})
    teacher, teacher_tok = load_smollm2()
    teacher.eval()
    student_tok = load_student_tokenizer(cfg, teacher_tok)
    log("models loaded")
    corpus = cross_corpus(cfg, teacher_tok, student_tok)
    vocab_map = build_vocab_map(teacher_tok, student_tok)
    log(f"corpus {corpus['info']}, shared tokens {len(vocab_map)}")
    train, heldout = corpus["train"], corpus["heldout"]
    columns = teacher_columns(teacher, train, vocab_map, plan["k"], args.cache, log)
    data = ArrayDataset({**{k: v for k, v in train.tensors.items() if k != "index"}, **columns}, "train")
    t0 = time.perf_counter()
    result["bpc_teacher"] = bits_per_char(teacher, heldout, side="teacher")
    log(f"teacher held-out bpc {result['bpc_teacher']:.3f} ({time.perf_counter() - t0:.0f} s)")
    teacher_vocab = int(teacher.config.vocab_size)
    del teacher
    result.update(corpus=corpus["info"], shared_tokens=len(vocab_map), student_vocab=len(student_tok),
                  teacher_vocab=teacher_vocab)
    train_cfg = TrainConfig(steps=plan["steps"], batch_size=plan["batch_size"], lr=LR, schedule="cosine",
                            warmup_steps=max(1, plan["steps"] // 20), weight_decay=0.0, clip_grad_norm=1.0,
                            log_every=max(1, plan["steps"] // 10), threads=1)
    per_seed: dict[str, list[float]] = {name: [] for name in arms()}
    seconds: dict[str, list[float]] = {name: [] for name in arms()}
    init = []
    for seed in plan["seeds"]:
        seed_cfg = cfg.model_copy(update={"seed": seed})
        init.append(bits_per_char(scratch_student(seed_cfg, student_tok), heldout))
        for name, terms in arms().items():
            student = scratch_student(seed_cfg, student_tok)
            distiller = CrossTokenizerDistiller(student, ColumnTeacher() if name != "ce" else None, terms,
                                                teacher_vocab=teacher_vocab, vocab_map=vocab_map)
            t0 = time.perf_counter()
            trained, _ = run_stage(name, distiller, data, train_cfg, seed=seed + 3, run_dir=None, progress=False,
                                   log=lambda m: None)
            seconds[name].append(time.perf_counter() - t0)
            per_seed[name].append(bits_per_char(trained, heldout))
            log(f"seed {seed} {name}: held-out bpc {per_seed[name][-1]:.4f} ({seconds[name][-1]:.0f} s)")
            result.update({f"bpc_{n}": statistics.fmean(v) for n, v in per_seed.items() if v})
            result.update(per_seed={n: list(v) for n, v in per_seed.items()}, steps=plan["steps"],
                          seeds=plan["seeds"][:len(per_seed["ce"])])
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.with_suffix(".partial.json").write_text(json.dumps(result, indent=2))
    result["bpc_init"] = summary_of(init)
    result["stats"] = {name: summary_of(values) for name, values in per_seed.items()}
    result["train_seconds"] = {name: summary_of(values) for name, values in seconds.items()}
    result["paired_difference_vs_ce"] = {
        name: summary_of([a - b for a, b in zip(per_seed[name], per_seed["ce"])]) for name in ("uld", "gold")}
    result["acceptance"] = {"target": "held-out bpc of the ULD or GOLD student < the CE-only student (mean of seeds)",
                            "met": min(result["bpc_uld"], result["bpc_gold"]) < result["bpc_ce"]}
    result["seconds_total"] = time.perf_counter() - t_start
    args.json.write_text(json.dumps(result, indent=2))
    args.json.with_suffix(".partial.json").unlink(missing_ok=True)
    print(f"{'arm':<6} {'held-out bits/char (mean ± std over seeds)':>44}")
    for name in arms():
        s = result["stats"][name]
        print(f"{name:<6} {s['mean']:>34.4f} ± {s['std']:.4f}")
    print(f"teacher {result['bpc_teacher']:.4f}; initial student {result['bpc_init']['mean']:.4f}; "
          f"acceptance met: {result['acceptance']['met']}")


if __name__ == "__main__":
    main()
