"""Cost of a model: parameters, bytes of the saved weights, FLOPs per sample, CPU latency and throughput.

Latency and throughput are measured so that they hold on a shared machine (`measure_cost`):

* at a fixed, recorded thread count: ``threads="auto"`` measures at 1 thread and at all the cores of the process
  (both reported; the first is the headline number: it is what stays stable when another process runs), an
  integer at that count only; the caller's count is restored afterwards;
* after a warm-up at each thread count;
* in rounds: each round times every model in turn (the order rotates from round to round), so a load spike hits
  all models alike, and a ratio of two models is taken round by round (`round_ratio`);
* reported as the median over the rounds with the spread (`spread`: the range over the median); a spread over
  `SPREAD_WARNING` adds a line to ``warnings``.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence, Union

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from kdistill.outputs import call_model

ROUNDS = 7  # rounds per measurement (at most; fewer when the repeats are fewer)
MIN_ROUNDS = 3  # rounds measured even past the time budget
BUDGET_S = 5.0  # seconds per measurement (one kind, one thread count) after which no new round starts
SPREAD_WARNING = 0.25


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Size of the model's state dict serialized as safetensors (what `student.safetensors` takes on disk)."""
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    return len(safetensors_bytes(tensors))


@torch.no_grad()
def flops_per_sample(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass at batch 1, counted by `torch.utils.flop_counter` (a multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        call_model(model, example[:1])
    model.train(was)
    return int(counter.get_total_flops())


def measurement_threads(setting: Union[str, int] = "auto") -> list[int]:
    """The thread counts a measurement uses: 'auto' = [1, all cores of this process] (one entry on one core)."""
    if setting != "auto":
        return [int(setting)]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return sorted({1, cores})


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to `count` inside the block, the caller's restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _eval_mode(models: Mapping[str, nn.Module]) -> Iterator[None]:
    was = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        yield
    finally:
        for name, m in models.items():
            m.train(was[name])


@torch.no_grad()
def timed_rounds(models: Mapping[str, nn.Module], x: torch.Tensor, *, repeats: int, warmup: int = 3,
                 rounds: int = ROUNDS, budget_s: float = BUDGET_S) -> dict[str, list[float]]:
    """{name: seconds of one forward on `x`, per round}: `warmup` untimed calls per model, then up to `rounds`
    rounds (at least `MIN_ROUNDS` or `repeats`, whichever is fewer; no new round after `budget_s`), each timing
    every model in turn (order rotated per round) over ``repeats // rounds`` calls and keeping the fastest."""
    rounds = max(1, min(rounds, repeats))
    calls = max(1, repeats // rounds)
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with _eval_mode(models):
        for name in names:
            for _ in range(warmup):
                call_model(models[name], x)
        start = time.perf_counter()
        for r in range(rounds):
            if r >= min(MIN_ROUNDS, rounds) and time.perf_counter() - start > budget_s:
                break
            for name in names[r % len(names):] + names[:r % len(names)]:
                best = float("inf")
                for _ in range(calls):
                    t0 = time.perf_counter()
                    call_model(models[name], x)
                    best = min(best, time.perf_counter() - t0)
                times[name].append(best)
    return times


def spread(values: Sequence[float]) -> float:
    """The range of repeated measurements over their median, without the most extreme value at each end when
    there are 5 or more (one descheduled round must not make a measurement look unstable); 0 for one value."""
    ordered = sorted(values)
    if len(ordered) >= 5:
        ordered = ordered[1:-1]
    med = statistics.median(values)
    return (ordered[-1] - ordered[0]) / med if med > 0 else 0.0


def round_ratio(cost: dict, numerator: str, denominator: str, threads: int, kind: str = "latency_ms") -> dict:
    """The ratio numerator / denominator of `kind`, round by round (both were timed in the same rounds):
    {"ratio": median, "spread": spread}."""
    at = cost["by_threads"][str(threads)]
    ratios = [a / b for a, b in zip(at[numerator][f"{kind}_rounds"], at[denominator][f"{kind}_rounds"])]
    return {"ratio": statistics.median(ratios), "spread": spread(ratios)}


def measure_cost(models: Mapping[str, nn.Module], example: torch.Tensor, *, threads: Union[str, int] = "auto",
                 latency_repeats: int = 50, throughput_batch: int = 256, throughput_repeats: int = 10) -> dict:
    """Batch-1 latency (ms) and throughput (samples/s) of `models`, on the CPU, interleaved per round, at each
    count of `measurement_threads(threads)`.

    Returns ``{"threads": [counts], "primary_threads": counts[0], "by_threads": {str(count): {name:
    {"latency_ms", "latency_spread", "latency_ms_rounds", "throughput", "throughput_spread",
    "throughput_rounds"}}}, "warnings": [lines]}``.
    """
    models = {name: m.cpu() for name, m in models.items()}
    x1 = example[:1].cpu()
    xb = x1.expand(throughput_batch, *x1.shape[1:]).contiguous()
    counts = measurement_threads(threads)
    out = {"threads": counts, "primary_threads": counts[0], "by_threads": {}, "warnings": []}
    for count in counts:
        with torch_threads(count):
            lat = timed_rounds(models, x1, repeats=latency_repeats)
            thr = timed_rounds(models, xb, repeats=throughput_repeats, warmup=1)
        at = out["by_threads"][str(count)] = {}
        for name in models:
            lat_ms = [t * 1000 for t in lat[name]]
            rate = [throughput_batch / t for t in thr[name]]
            at[name] = {"latency_ms": statistics.median(lat_ms), "latency_spread": spread(lat_ms),
                        "latency_ms_rounds": lat_ms, "throughput": statistics.median(rate),
                        "throughput_spread": spread(rate), "throughput_rounds": rate}
    unstable = sorted(((at[name][f"{kind}_spread"], f"{name} {kind} at {count} thread(s)")
                       for count, at in out["by_threads"].items() for name in models
                       for kind in ("latency", "throughput")), reverse=True)
    unstable = [(value, what) for value, what in unstable if value > SPREAD_WARNING]
    if unstable:
        out["warnings"].append(
            f"warning: {len(unstable)} cost measurement(s) vary more than {100 * SPREAD_WARNING:.0f}% between rounds "
            f"(worst: {unstable[0][1]}, {100 * unstable[0][0]:.0f}%): another process is probably using the CPU; "
            f"the 1-thread numbers are the steadier ones")
    return out


@torch.no_grad()
def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 50, warmup: int = 5,
               threads: Union[str, int] = 1) -> float:
    """Median wall time of one batch-1 forward on the CPU, in milliseconds, at `threads` threads."""
    with torch_threads(measurement_threads(threads)[0]):
        return statistics.median(timed_rounds({"m": model}, example[:1], repeats=repeats, warmup=warmup)["m"]) \
            * 1000


@torch.no_grad()
def throughput(model: nn.Module, example: torch.Tensor, batch: int = 256, repeats: int = 10, warmup: int = 2,
               threads: Union[str, int] = 1) -> float:
    """Samples per second at batch `batch` (median of the rounds), at `threads` threads."""
    x = example[:1].expand(batch, *example.shape[1:]).contiguous()
    with torch_threads(measurement_threads(threads)[0]):
        return batch / statistics.median(timed_rounds({"m": model}, x, repeats=repeats, warmup=warmup)["m"])


def static_cost(model: nn.Module, example: torch.Tensor) -> dict:
    """What does not need a clock: parameters, bytes of the weights, FLOPs per sample."""
    model = model.cpu()
    return {"params": param_count(model), "bytes": weight_bytes(model), "flops": flops_per_sample(model, example.cpu())}


def headline(cost: dict, name: str) -> dict:
    """One model's measured numbers at the primary thread count, plus every count's, for a summary row."""
    primary = cost["by_threads"][str(cost["primary_threads"])][name]
    return {"latency_ms": primary["latency_ms"], "latency_spread": primary["latency_spread"],
            "throughput": primary["throughput"], "cost_threads": cost["primary_threads"],
            "by_threads": {count: {k: v for k, v in at[name].items() if not k.endswith("rounds")}
                           for count, at in cost["by_threads"].items()}}


def cost_report(model: nn.Module, example: torch.Tensor, *, latency_repeats: int = 50,
                throughput_batch: int = 256, threads: Union[str, int] = "auto") -> dict:
    """Static cost plus the measured latency and throughput of one model (`measure_cost`, `headline`)."""
    cost = measure_cost({"model": model}, example, threads=threads, latency_repeats=latency_repeats,
                        throughput_batch=throughput_batch)
    return {**static_cost(model, example), **headline(cost, "model"), "warnings": cost["warnings"]}
