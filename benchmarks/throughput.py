"""Throughput of offline KD with and without the teacher-output cache, on one job, all in one process.

Job: Fashion-MNIST (60000 training images, 1x28x28, in memory), CNN teacher (`cnn2d` channels 32/64/128, ~93k
params), small student (`mlp` hidden 256/128), batch 256, AdamW, cosine schedule, objective
0.1 CE + 0.9 * T^2 KL (T = 4). The teacher's weights are its initialization: speed does not depend on their values.

Variants, timed in blocks of steps interleaved round-robin (the order rotates every round) so that load from other
processes on a shared machine affects all alike; the time of a block is its wall time / steps; reported numbers
are medians over rounds:

(a) ``hand``: a hand-written PyTorch loop: plain torch, the same models, the same data tensors fancy-indexed by a
    per-epoch permutation, the same optimizer / schedule / loss, teacher under ``torch.no_grad()``;
(b) ``live``: kdistill (`Engine.fit` on a `Distiller` with the live teacher);
(c) ``cached``: kdistill with the dense teacher cache (fp16 logits, built once before timing; build time reported);
(d) ``plain``: kdistill training the student alone (CE only, no teacher): the limit for (c).

For kdistill the time of a block is `Engine.fit`'s own loop time (its per-run setup: optimizer, dry run, excluded),
i.e. the steady-state cost of a step. ``scale``: the cached path (c) on the training set repeated 1x, 3x and 10x
(a new, larger dataset and a cache built for it; rows are copied from the 1x cache by a teacher callable that reads
it), interleaved the same way, as microseconds per sample.

Sizes: ``topk_bytes_per_token`` is measured on the files of a top-k cache (k = 32) of synthetic logits over a
V = 49152 vocabulary (SmolLM2's), 64 sequences x 128 tokens; ``dense_bytes_per_sample`` on the dense cache files.

    OMP_NUM_THREADS=1 python benchmarks/throughput.py --json benchmarks/results/throughput.json
    OMP_NUM_THREADS=1 python benchmarks/throughput.py --quick --json /tmp/throughput-quick.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdistill.config import TrainConfig  # noqa: E402
from kdistill.data import ArrayDataset, fashion_mnist  # noqa: E402
from kdistill.distiller import Distiller, LiveTeacher, Term  # noqa: E402
from kdistill.provenance import git_revision  # noqa: E402
from kdistill.engine import Engine  # noqa: E402
from kdistill.models import build_model  # noqa: E402
from kdistill.seeding import seeded_build  # noqa: E402
from kdistill.teachers import CacheSpec, build_cache  # noqa: E402

BATCH, LR, ALPHA, TEMP = 256, 1e-3, 0.9, 4.0
TEACHER = ("cnn2d", {"channels": [32, 64, 128]})
STUDENT = ("mlp", {"hidden": [256, 128]})


def model(spec, seed):
    return seeded_build(seed, lambda: build_model(spec[0], spec[1], input_shape=(1, 28, 28), num_classes=10))


def cosine(total):
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def train_cfg(steps):
    return TrainConfig(steps=steps, batch_size=BATCH, lr=LR, optimizer="adamw", schedule="cosine",
                       log_every=max(1, steps), checkpoint_every=0)


# -- (a) the hand-written loop -----------------------------------------------------------------------------------
class HandLoop:
    """What a user writes by hand. State (optimizer, data position) persists across blocks."""

    def __init__(self, student, teacher, x, y, total_steps):
        self.student, self.teacher, self.x, self.y = student, teacher.eval(), x, y
        self.opt = torch.optim.AdamW(student.parameters(), lr=LR)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, cosine(total_steps))
        self.step, self.per_epoch, self.perm = 0, len(x) // BATCH, None
        self.gen = torch.Generator().manual_seed(0)

    def run(self, steps):
        self.student.train()
        for _ in range(steps):
            pos = self.step % self.per_epoch
            if pos == 0:
                self.perm = torch.randperm(len(self.x), generator=self.gen)
            idx = self.perm[pos * BATCH:(pos + 1) * BATCH]
            xb, yb = self.x[idx], self.y[idx]
            with torch.no_grad():
                t = self.teacher(xb)
            s = self.student(xb)
            kd = F.kl_div(F.log_softmax(s / TEMP, 1), F.softmax(t / TEMP, 1), reduction="batchmean") * TEMP * TEMP
            loss = (1 - ALPHA) * F.cross_entropy(s, yb) + ALPHA * kd
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.step += 1


def kdistill_block(distiller, data, steps):
    res = Engine(train_cfg(steps), None, progress=False, log=lambda m: None).fit(distiller, data)
    return res["seconds"]


class RepeatOf:
    """A teacher callable for the repeated dataset: sample i is sample i % n of the base, so its outputs are the
    base cache's rows (copying them instead of re-running the teacher on identical inputs)."""

    def __init__(self, cached, n):
        self.cached, self.n = cached, n

    def fingerprint(self):
        return {"repeat_of": self.cached.key, "n": self.n}

    def __call__(self, batch):
        return self.cached({"index": batch["index"] % self.n})


def interleave(variants: dict, rounds: int, log) -> dict[str, list[float]]:
    """variants: name -> (fn() -> seconds, steps). Returns name -> per-step seconds of each round."""
    names = list(variants)
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn, steps = variants[name]
            times[name].append(fn() / steps)
        log(f"round {r + 1}/{rounds}: " + "  ".join(f"{n} {times[n][-1] * 1e3:.2f} ms" for n in names))
    return times


def topk_bytes(tmp: Path, k: int = 32, vocab: int = 49152, seqs: int = 64, tokens: int = 128) -> dict:
    class SyntheticLM:
        def fingerprint(self):
            return {"synthetic": vocab}

        def __call__(self, batch):
            g = torch.Generator().manual_seed(int(batch["index"][0]))
            return {"logits": torch.randn(len(batch["index"]), tokens, vocab, generator=g) * 3}

    data = ArrayDataset({"x": torch.zeros(seqs, 1)}, "synthetic-tokens")
    build_cache(SyntheticLM(), data, tmp / "topk", CacheSpec(kind="topk", k=k, batch_size=8))
    files = sorted((tmp / "topk" / "shards").rglob("*.npy"))
    payload = sum(np.load(f, mmap_mode="r").nbytes for f in files)
    on_disk = sum(f.stat().st_size for f in files)
    return {"k": k, "vocab": vocab, "tokens": seqs * tokens, "index_dtype": str(np.load(files[0], mmap_mode="r").dtype),
            "payload_bytes_per_token": payload / (seqs * tokens), "file_bytes_per_token": on_disk / (seqs * tokens),
            "limit_4k_plus_8": 4 * k + 8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 6000-image subset and fewer rounds (a smoke run)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--cache-dir", type=Path, default=None, help="where to build the caches (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rounds = args.rounds or (3 if args.quick else 12)
    live_steps, fast_steps = (4, 20) if args.quick else (6, 40)
    log = lambda m: print(m, flush=True)  # noqa: E731

    bundle = fashion_mnist()
    x, y = bundle.train.tensors["x"], bundle.train.tensors["y"]
    if args.quick:
        x, y = x[:6000].clone(), y[:6000].clone()
    data = ArrayDataset({"x": x, "y": y}, "fashion_mnist")
    tmp = Path(tempfile.mkdtemp(prefix="kd-throughput-", dir=args.cache_dir))
    try:
        teacher = model(TEACHER, 1)
        terms = [Term("ce", "ce", 1 - ALPHA), Term("kd", "kd", ALPHA, params={"temperature": TEMP})]
        t0 = time.perf_counter()
        cached = build_cache(LiveTeacher(teacher), data, tmp / "dense", CacheSpec(kind="dense", dtype="float16",
                                                                               batch_size=512))
        build_s = time.perf_counter() - t0
        dense_files = sorted((tmp / "dense" / "shards").rglob("*.npy"))
        dense_bytes = sum(np.load(f, mmap_mode="r").nbytes for f in dense_files) / len(data)
        log(f"dense cache: {len(data)} samples in {build_s:.1f}s, {dense_bytes:.1f} bytes/sample")

        total = rounds * max(live_steps, fast_steps) * 4
        hand = HandLoop(model(STUDENT, 2), teacher, x, y, total)
        d_live = Distiller(model(STUDENT, 2), LiveTeacher(teacher), terms)
        d_cached = Distiller(model(STUDENT, 2), cached, terms)
        d_plain = Distiller(model(STUDENT, 2), None, [Term("ce", "ce")])

        def hand_block():
            t = time.perf_counter()
            hand.run(live_steps)
            return time.perf_counter() - t

        # one warm-up block each (allocator, lazy optimizer state), not recorded
        hand_block(), kdistill_block(d_live, data, 2), kdistill_block(d_cached, data, 2)
        kdistill_block(d_plain, data, 2)
        log("(a) hand-written vs (b) kdistill live teacher, interleaved")
        ab = interleave({"hand": (hand_block, live_steps),
                         "live": (lambda: kdistill_block(d_live, data, live_steps), live_steps)}, rounds, log)
        log("(c) kdistill dense cache vs (d) kdistill student alone, interleaved")
        cd = interleave({"cached": (lambda: kdistill_block(d_cached, data, fast_steps), fast_steps),
                         "plain": (lambda: kdistill_block(d_plain, data, fast_steps), fast_steps)}, rounds, log)
        med = {n: statistics.median(v) for n, v in {**ab, **cd}.items()}
        paired = {"overhead_ratio": statistics.median(b / a for a, b in zip(ab["hand"], ab["live"])),
                  "cache_ratio": statistics.median(c / d for c, d in zip(cd["cached"], cd["plain"]))}

        log("scale: the cached path at 1x, 3x, 10x the data")
        scaled = {1: (data, cached)}
        for mult in (3, 10):
            big = ArrayDataset({"x": x.repeat(mult, 1, 1, 1), "y": y.repeat(mult)}, f"fashion_mnist-x{mult}")
            scaled[mult] = (big, build_cache(RepeatOf(cached, len(data)), big, tmp / f"dense-x{mult}",
                                             CacheSpec(kind="dense", dtype="float16", batch_size=4096)))
        students = {m: Distiller(model(STUDENT, 2), c, terms) for m, (_, c) in scaled.items()}
        for m, (ds, _) in scaled.items():
            kdistill_block(students[m], ds, 2)
        sc = interleave({f"x{m}": ((lambda m=m: kdistill_block(students[m], scaled[m][0], fast_steps)), fast_steps)
                         for m in scaled}, rounds, log)
        scale = [{"data_multiple": m, "samples": len(scaled[m][0]),
                  "us_per_sample": statistics.median(sc[f"x{m}"]) / BATCH * 1e6} for m in scaled]
        scaled.clear(), students.clear()  # free the repeated datasets
        sizes = topk_bytes(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base_us = scale[0]["us_per_sample"]
    result = {
        "git_revision": git_revision(),
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python " + " ".join(sys.argv),
        "job": {"data": "fashion_mnist", "train_samples": len(x), "teacher": TEACHER, "student": STUDENT,
                "batch_size": BATCH, "objective": f"{1 - ALPHA:.1f} CE + {ALPHA} T^2 KL, T={TEMP}",
                "teacher_weights": "initialization (speed does not depend on values)"},
        "overhead_ratio": med["live"] / med["hand"],
        "cache_ratio": med["cached"] / med["plain"],
        "cache_speedup": med["live"] / med["cached"],
        "dense_bytes_per_sample": dense_bytes,
        "topk_bytes_per_token": sizes["payload_bytes_per_token"],
        "topk": sizes,
        "scale": scale,
        "scale_max_deviation": max(abs(s["us_per_sample"] / base_us - 1) for s in scale),
        "paired_ratios_median": paired,
        "ms_per_step_median": {n: v * 1e3 for n, v in med.items()},
        "ms_per_step_all": {n: [t * 1e3 for t in v] for n, v in {**ab, **cd, **sc}.items()},
        "cache_build": {"seconds": build_s, "samples_per_s": len(x) / build_s},
        "rounds": rounds, "steps_per_block": {"hand/live": live_steps, "cached/plain/scale": fast_steps},
        "threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "loadavg": os.getloadavg(),
    }
    print()
    print(f"{'variant':34s} {'ms/step':>9s}")
    for name, label in (("hand", "(a) hand-written loop, live"), ("live", "(b) kdistill, live teacher"),
                        ("cached", "(c) kdistill, dense cache"), ("plain", "(d) kdistill, student alone")):
        print(f"{label:34s} {med[name] * 1e3:9.2f}")
    print(f"overhead_ratio b/a = {result['overhead_ratio']:.3f}   cache_ratio c/d = {result['cache_ratio']:.3f}   "
          f"cache_speedup b/c = {result['cache_speedup']:.2f}x")
    print("scale (cached): " + "  ".join(f"{s['data_multiple']}x {s['us_per_sample']:.1f} us/sample" for s in scale)
          + f"   max deviation {result['scale_max_deviation'] * 100:.1f}%")
    print(f"dense bytes/sample {dense_bytes:.1f}   top-k bytes/token {sizes['payload_bytes_per_token']:.2f} "
          f"(k={sizes['k']}, V={sizes['vocab']}, limit {sizes['limit_4k_plus_8']})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
