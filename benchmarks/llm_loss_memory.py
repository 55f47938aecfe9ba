"""Memory and time of the chunked token-level KD loss vs the full-logits reference (forward + backward).

Setup (SmolLM2-135M's head): hidden H = 576 for student and teacher, vocabulary V = 49152, N = B * T tokens
(all valid), divergence forward KL, float32, CPU.

* Memory: each (variant, N) runs in a fresh subprocess. After the inputs are built (hidden states, heads) the
  process resets its peak-RSS counter (writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM``, Linux >= 4.0)
  and records the current RSS; it then runs forward + backward twice and reports ``VmHWM - RSS_after_setup``:
  the extra resident memory the loss needs at its peak, including the gradient buffers. (Where clear_refs is
  not writable it falls back to ``ru_maxrss - RSS_after_setup``; setup allocates only the inputs, so the two
  agree.) PyTorch's CPU allocator returns large blocks to the OS on free, so RSS follows live tensors.
* Time: in this one process, variants interleaved, one warm-up each, then the median of ``--repeats`` runs
  (``time_ratio_N`` = median chunked / median reference). Other processes on a shared machine add noise; the
  JSON also holds every run, the minima, the median of the per-repeat (paired) ratios and the load average.
* max_grad_err: the largest absolute difference between chunked and reference gradients (student hidden
  states and head weight) and loss, at the smallest N.

Usage::

    python benchmarks/llm_loss_memory.py --json benchmarks/results/llm_loss_memory.json
    python benchmarks/llm_loss_memory.py --json /tmp/quick.json --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdistill.losses.lm import DEFAULT_CHUNK_SIZE, token_kd_loss  # noqa: E402
from kdistill.provenance import git_revision  # noqa: E402
from tests.test_llm_token_loss import token_kd_loss_reference  # noqa: E402  (the naive reference lives in tests)

HIDDEN = 576
VOCAB = 49152
VARIANTS = {"chunked": token_kd_loss, "reference": token_kd_loss_reference}


def make_inputs(n_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Student/teacher hidden states (1, N, H) and heads (V, H), scaled so logits have std ~ 2."""
    gen = torch.Generator().manual_seed(seed)
    scale = 2.0 / HIDDEN**0.5
    return {
        "student_hidden": torch.randn(1, n_tokens, HIDDEN, generator=gen).requires_grad_(True),
        "student_head": (torch.randn(VOCAB, HIDDEN, generator=gen) * scale).requires_grad_(True),
        "teacher_hidden": torch.randn(1, n_tokens, HIDDEN, generator=gen),
        "teacher_head": torch.randn(VOCAB, HIDDEN, generator=gen) * scale,
        "labels": torch.zeros(1, n_tokens, dtype=torch.long),
    }


def step(variant: str, inputs: dict[str, torch.Tensor], chunk_size: int) -> tuple[float, list[torch.Tensor]]:
    """One forward + backward; returns (loss, [grad student_hidden, grad student_head])."""
    for name in ("student_hidden", "student_head"):
        inputs[name].grad = None
    loss = VARIANTS[variant](
        inputs["student_hidden"],
        inputs["student_head"],
        inputs["teacher_hidden"],
        inputs["teacher_head"],
        inputs["labels"],
        chunk_size=chunk_size,
    )
    loss.backward()
    return float(loss.detach()), [inputs["student_hidden"].grad, inputs["student_head"].grad]


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def child(variant: str, n_tokens: int, chunk_size: int) -> None:
    """Run in a fresh process: print JSON with the peak extra RSS (bytes) of forward + backward."""
    inputs = make_inputs(n_tokens)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss"
    baseline = _proc_status_kib("VmRSS")
    for _ in range(2):
        step(variant, inputs, chunk_size)
    peak = _proc_status_kib("VmHWM") if method != "ru_maxrss" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_extra_bytes": (peak - baseline) * 1024, "method": method}))


def measure_memory(variant: str, n_tokens: int, chunk_size: int) -> dict:
    cmd = [sys.executable, __file__, "--_child", variant, str(n_tokens), "--chunk-size", str(chunk_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_time(n_tokens: int, chunk_size: int, repeats: int) -> dict[str, list[float]]:
    inputs = make_inputs(n_tokens)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for variant in VARIANTS:  # warm-up
        step(variant, inputs, chunk_size)
    for _ in range(repeats):
        for variant in VARIANTS:
            start = time.perf_counter()
            step(variant, inputs, chunk_size)
            times[variant].append(time.perf_counter() - start)
    return times


def grad_error(n_tokens: int, chunk_size: int) -> float:
    inputs = make_inputs(n_tokens)
    loss_c, grads_c = step("chunked", inputs, chunk_size)
    grads_c = [g.clone() for g in grads_c]
    loss_r, grads_r = step("reference", inputs, chunk_size)
    errs = [abs(loss_c - loss_r)] + [float((a - b).abs().max()) for a, b in zip(grads_c, grads_r, strict=True)]
    return max(errs)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="N in {256, 1024}, 1 repeat (a smoke run)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 5, quick 1)")
    parser.add_argument("--_child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        child(args._child[0], int(args._child[1]), args.chunk_size)
        return {}

    sizes = (256, 1024) if args.quick else (1024, 4096)
    repeats = args.repeats or (1 if args.quick else 5)
    result: dict = {
        "git_revision": git_revision(),
        "command": " ".join(["python", os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "hidden": HIDDEN,
        "vocab": VOCAB,
        "divergence": "forward_kl",
        "dtype": "float32",
        "chunk_size": args.chunk_size,
        "repeats": repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
    }
    result["load_average_at_start"] = os.getloadavg()
    rows = []
    for n in sizes:
        mem = {v: measure_memory(v, n, args.chunk_size) for v in VARIANTS}
        times = measure_time(n, args.chunk_size, repeats)
        med = {v: statistics.median(times[v]) for v in VARIANTS}
        result[f"mem_bytes_{n}"] = {v: mem[v]["peak_extra_bytes"] for v in VARIANTS}
        result[f"time_s_{n}"] = {v: times[v] for v in VARIANTS}
        result[f"time_median_s_{n}"] = med
        result[f"time_min_s_{n}"] = {v: min(times[v]) for v in VARIANTS}
        result[f"time_ratio_paired_median_{n}"] = statistics.median(
            c / r for c, r in zip(times["chunked"], times["reference"], strict=True)
        )
        result[f"mem_ratio_{n}"] = mem["chunked"]["peak_extra_bytes"] / mem["reference"]["peak_extra_bytes"]
        result[f"time_ratio_{n}"] = med["chunked"] / med["reference"]
        result["memory_method"] = mem["chunked"]["method"]
        rows.append((n, mem, med))
    result["max_grad_err"] = grad_error(sizes[0], args.chunk_size)
    result["load_average_at_end"] = os.getloadavg()

    print(f"token_kd_loss forward+backward, H={HIDDEN}, V={VOCAB}, chunk_size={args.chunk_size}, {repeats} repeats")
    print(f"{'N':>6} {'variant':>10} {'peak MiB':>10} {'median s':>10}")
    for n, mem, med in rows:
        for v in VARIANTS:
            print(f"{n:>6} {v:>10} {mem[v]['peak_extra_bytes'] / 2**20:>10.1f} {med[v]:>10.3f}")
        print(f"{n:>6} {'ratio':>10} {result[f'mem_ratio_{n}']:>10.3f} {result[f'time_ratio_{n}']:>10.3f}")
    print(f"max_grad_err = {result['max_grad_err']:.3g}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
