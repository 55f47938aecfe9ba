"""Top-k teacher cache vs dense teacher cache: does a student trained from top-k targets end up as good?

Setting (all offline, CPU): a byte-level language model on the Wikipedia articles shipped with gensim's test data
(`kdistill.data.text.wiki_articles`), vocabulary V = 256 (UTF-8 bytes), blocks of 64 tokens predicting the next
byte; 10% of the articles held out (whole articles). Teacher: a tiny Llama (`transformers.LlamaForCausalLM`,
hidden 128, 3 layers, ~0.7M params) trained on the labels. Students: a smaller Llama (hidden 64, 2 layers,
~0.14M params), same init and data order for every variant, trained by pure distillation (forward KL, T = 1,
no label term, so the targets are all the student learns from) from:

- ``dense``: a dense cache (all 256 log-probabilities per token, fp16);
- ``top{k}``: a top-k cache (k log-probabilities + the tail bucket, fp16 values, uint16 indices, fp32 tail), with
  the k + 1 bucket KL of `kdistill.losses.sparse`;
- ``labels``: for reference, the same student trained on the labels alone (CE).

Reported: held-out loss (mean next-byte cross-entropy, nats) and next-byte accuracy of each model; the relative
loss difference of each top-k student to the dense one; bytes per token of each cache (from its files).

Everything is resumable (engine checkpoints, resumable cache builds): if a command is stopped, run it again.

    OMP_NUM_THREADS=1 python benchmarks/topk_quality.py --json benchmarks/results/topk_quality.json
    OMP_NUM_THREADS=1 python benchmarks/topk_quality.py --quick --json /tmp/topk-quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdistill.config import TrainConfig  # noqa: E402
from kdistill.data import ArrayDataset  # noqa: E402
from kdistill.data.text import lm_blocks, split_by_article, wiki_articles  # noqa: E402
from kdistill.provenance import git_revision  # noqa: E402
from kdistill.distiller import Distiller, LiveTeacher, Term  # noqa: E402
from kdistill.engine import Engine  # noqa: E402
from kdistill.engine.checkpoint import load_weights, save_weights  # noqa: E402
from kdistill.teachers import CacheSpec, build_cache  # noqa: E402

VOCAB, BLOCK = 256, 64


class ByteTokenizer:
    """UTF-8 bytes as token ids (V = 256), with the call signature `lm_blocks` uses."""

    eos_token_id = None

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}


def llama(hidden, layers, intermediate, heads, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                            num_hidden_layers=layers, num_attention_heads=heads,
                                            num_key_value_heads=heads, max_position_embeddings=BLOCK,
                                            tie_word_embeddings=False))


def teacher_model():
    return llama(128, 3, 384, 4, seed=1)


def student_model():
    return llama(64, 2, 192, 4, seed=2)


def datasets(train_blocks: int, heldout_blocks: int):
    train_articles, held_articles = split_by_article(wiki_articles(), 0.1, seed=0)
    tok = ByteTokenizer()

    def make(articles, limit, name):
        blocks = lm_blocks(articles, tok, BLOCK + 1)[:limit]
        return ArrayDataset({"x": blocks[:, :-1].contiguous(), "y": blocks[:, 1:].contiguous()}, name)

    return make(train_articles, train_blocks, "wiki-bytes"), make(held_articles, heldout_blocks, "wiki-bytes-heldout")


@torch.no_grad()
def heldout(model, data, batch=64):
    model.eval()
    x, y = data.tensors["x"], data.tensors["y"]
    loss, correct, n = 0.0, 0, 0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch]).logits.float()
        loss += float(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y[i:i + batch].reshape(-1),
                                                        reduction="sum"))
        correct += int((logits.argmax(-1) == y[i:i + batch]).sum())
        n += y[i:i + batch].numel()
    return {"loss": loss / n, "accuracy": correct / n}


def train(name, work, model, teacher, terms, data, steps, lr, log):
    path = work / f"{name}.safetensors"
    if path.is_file():
        model.load_state_dict(load_weights(path))
        log(f"[{name}] done earlier: loaded {path}")
        return model
    cfg = TrainConfig(steps=steps, batch_size=16, lr=lr, schedule="cosine", warmup_steps=min(100, steps // 10),
                      clip_grad_norm=1.0, log_every=max(1, steps // 10), checkpoint_every=max(1, steps // 6))
    t0 = time.perf_counter()
    Engine(cfg, work, stage=name, seed=3, progress=True, log=log).fit(Distiller(model, teacher, terms), data)
    save_weights(path, model.state_dict())
    log(f"[{name}] trained in {time.perf_counter() - t0:.0f}s")
    return model


def cache_bytes_per_token(directory: Path, tokens: int) -> float:
    return sum(np.load(f, mmap_mode="r").nbytes for f in (directory / "shards").rglob("*.npy")) / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default runs/topk_quality[-quick])")
    ap.add_argument("--k", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--stop-after", choices=["teacher", "caches", "students"], default="students",
                    help="stop after this stage (to keep each command short; run again to continue)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    quick = args.quick
    work = args.work or Path("runs") / ("topk_quality-quick" if quick else "topk_quality")
    work.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    train_blocks, held_blocks = (800, 100) if quick else (20000, 2000)
    teacher_steps, student_steps = (40, 40) if quick else (1500, 2000)

    train_ds, held_ds = datasets(train_blocks, held_blocks)
    log(f"data: {len(train_ds)} train blocks, {len(held_ds)} held-out blocks of {BLOCK} bytes")
    teacher = train("teacher", work, teacher_model(), None, [Term("ce", "ce")], train_ds, teacher_steps, 3e-3, log)
    teacher.eval()
    if args.stop_after == "teacher":
        return

    caches, sizes, build_s = {}, {}, {}
    tokens = len(train_ds) * BLOCK
    for variant in ["dense"] + [f"top{k}" for k in args.k]:
        spec = CacheSpec(kind="dense") if variant == "dense" else \
            CacheSpec(kind="topk", k=int(variant[3:]), temperature=1.0)
        t0 = time.perf_counter()
        caches[variant] = build_cache(LiveTeacher(teacher), train_ds, work / f"cache-{variant}",
                                      CacheSpec(**{**spec.__dict__, "batch_size": 64}), progress=True, log=log)
        build_s[variant] = time.perf_counter() - t0
        sizes[variant] = cache_bytes_per_token(work / f"cache-{variant}", tokens)
        log(f"cache {variant}: {sizes[variant]:.1f} bytes/token")
    if args.stop_after == "caches":
        return

    results = {"teacher": heldout(teacher, held_ds)}
    kd = [Term("kd", "kd", 1.0, params={"temperature": 1.0})]
    for variant, cached in caches.items():
        student = train(f"student-{variant}", work, student_model(), cached, kd, train_ds, student_steps, 3e-3, log)
        results[f"student-{variant}"] = heldout(student, held_ds)
        log(f"student-{variant}: {results[f'student-{variant}']}")
    labels = train("student-labels", work, student_model(), None, [Term("ce", "ce")], train_ds, student_steps,
                   3e-3, log)
    results["student-labels"] = heldout(labels, held_ds)

    dense = results["student-dense"]
    compare = {v: {"loss_rel_diff": results[f"student-{v}"]["loss"] / dense["loss"] - 1,
                   "accuracy_diff_points": 100 * (results[f"student-{v}"]["accuracy"] - dense["accuracy"])}
               for v in caches if v != "dense"}
    out = {
        "git_revision": git_revision(),
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python " + " ".join(sys.argv),
        "setting": {"data": "gensim test Wikipedia, UTF-8 bytes (V=256), 10% of articles held out",
                    "block": BLOCK, "train_blocks": len(train_ds), "heldout_blocks": len(held_ds),
                    "teacher": "Llama hidden 128, 3 layers, trained on labels", "student": "Llama hidden 64, 2 layers",
                    "objective": "pure KD: forward KL at T=1 (no label term)", "teacher_steps": teacher_steps,
                    "student_steps": student_steps, "batch_size": 16, "k": args.k},
        "heldout": results,
        "vs_dense": compare,
        "cache_bytes_per_token": sizes,
        "cache_build_seconds": build_s,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
    }
    print()
    print(f"{'model':22s} {'held-out loss':>14s} {'next-byte acc %':>16s}")
    for name, r in results.items():
        print(f"{name:22s} {r['loss']:14.4f} {100 * r['accuracy']:16.2f}")
    for v, c in compare.items():
        print(f"{v} vs dense: loss {100 * c['loss_rel_diff']:+.2f}%, accuracy {c['accuracy_diff_points']:+.2f} points, "
              f"cache {sizes[v]:.0f} vs {sizes['dense']:.0f} bytes/token")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
