"""Engine overhead: the same offline KD job run by a hand-written PyTorch loop and by the kdistill engine.

Same models (the demo's 1-D CNN teacher and MLP student), same data (mnist1d + transfer set, in memory), same
batch size, optimizer, LR schedule, loss (Hinton KD: (1-a) CE + a T^2 KL) and data order. Both run in this one
process, interleaved in blocks (hand, engine, hand, engine, ...), so machine load affects both alike. Each block
is a fresh run of `--steps` steps (the engine's per-run setup is included in its time); the per-step time of a
block is its wall time / steps, and the reported numbers are medians over `--repeats` blocks.

    python benchmarks/overhead.py --json benchmarks/results/overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from kdistill.config import TrainConfig, parse_config
from kdistill.data import mnist1d
from kdistill.demo import DEMO_CONFIG
from kdistill.distiller import Distiller, Term
from kdistill.provenance import git_revision
from kdistill.engine import Engine, StepSampler, lr_lambda
from kdistill.models import build_model
from kdistill.seeding import seeded_build


def build(cfg_model, seed):
    return seeded_build(seed, lambda: build_model(cfg_model.name, cfg_model.kwargs, input_shape=(40,), num_classes=10))


def handwritten(student, teacher, x, y, train: TrainConfig, alpha: float, temp: float, seed: int) -> None:
    """The loop a user would write by hand, with the same data order and schedule as the engine."""
    opt = torch.optim.AdamW(student.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train))
    sampler = StepSampler(len(x), train.batch_size, seed=seed)
    teacher.eval()
    student.train()
    for step in range(train.steps):
        idx = sampler.indices(step)
        xb, yb = x[idx], y[idx]
        with torch.inference_mode():
            t = teacher(xb)
        t = t.clone()
        s = student(xb)
        labelled = yb != -100
        ce = F.cross_entropy(s[labelled], yb[labelled]) if labelled.any() else s.sum() * 0
        kd = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), reduction="batchmean",
                      log_target=True) * temp * temp
        loss = (1 - alpha) * ce + alpha * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write results to this file")
    ap.add_argument("--steps", type=int, default=200, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=7, help="timed blocks per variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a few short blocks (smoke test)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: this process's CPU time (robust on a shared machine; use with --threads 1); "
                         "wall: elapsed time")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 10, 2
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cfg = parse_config(DEMO_CONFIG)
    bundle = mnist1d(seed=42, transfer_size=cfg.data.transfer.size, transfer_seed=1001)
    data = bundle.distill_set()
    x, y = data.tensors["x"], data.tensors["y"]
    train = cfg.train.model_copy(update={"steps": args.steps, "checkpoint_every": 0, "log_every": 50})
    alpha, temp = cfg.distill.alpha, cfg.distill.temperature
    teacher = build(cfg.teacher, 1)

    def run_hand() -> float:
        student = build(cfg.student, 2)
        t0 = clock()
        handwritten(student, teacher, x, y, train, alpha, temp, seed=3)
        return (clock() - t0) / args.steps

    def run_engine() -> float:
        student = build(cfg.student, 2)
        d = Distiller(student, teacher, [Term("ce", "ce", 1 - alpha), Term("kd", "kd", alpha,
                                                                           params={"temperature": temp})])
        t0 = clock()
        Engine(train, None, seed=3, progress=False).fit(d, data)
        return (clock() - t0) / args.steps

    run_hand(), run_engine()  # warm-up (allocator, kernels, accelerate state)
    hand, engine = [], []
    for _ in range(args.repeats):
        hand.append(run_hand())
        engine.append(run_engine())
    h, e = statistics.median(hand), statistics.median(engine)
    result = {
        "overhead_ratio": e / h,
        "handwritten_ms_per_step": h * 1000,
        "engine_ms_per_step": e * 1000,
        "handwritten_ms_all": [v * 1000 for v in hand],
        "engine_ms_all": [v * 1000 for v in engine],
        "steps_per_block": args.steps,
        "repeats": args.repeats,
        "batch_size": train.batch_size,
        "threads": args.threads,
        "clock": args.clock,
        "job": "mnist1d+transfer, cnn1d teacher -> mlp student, Hinton KD (demo models)",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
        "git_revision": git_revision(),
    }
    print(f"{'variant':<14}{'ms/step (median)':>18}")
    print(f"{'hand-written':<14}{h * 1000:>18.3f}")
    print(f"{'kdistill':<14}{e * 1000:>18.3f}")
    print(f"overhead_ratio = {e / h:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
