"""Cost of a model: parameters, bytes of the saved weights, FLOPs per sample, CPU latency and throughput."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from kdistill.outputs import call_model


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


@torch.no_grad()
def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 50, warmup: int = 5) -> float:
    """Median wall time of one batch-1 forward on the CPU, in milliseconds."""
    return _median_time(model, example[:1], repeats, warmup) * 1000


@torch.no_grad()
def throughput(model: nn.Module, example: torch.Tensor, batch: int = 256, repeats: int = 10,
               warmup: int = 2) -> float:
    """Samples per second at batch `batch` (median of repeats)."""
    x = example[:1].expand(batch, *example.shape[1:]).contiguous()
    return batch / _median_time(model, x, repeats, warmup)


def _median_time(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> float:
    was = model.training
    model.eval()
    for _ in range(warmup):
        call_model(model, x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call_model(model, x)
        times.append(time.perf_counter() - t0)
    model.train(was)
    return statistics.median(times)


def cost_report(model: nn.Module, example: torch.Tensor, *, latency_repeats: int = 50,
                throughput_batch: int = 256) -> dict:
    model = model.cpu()
    example = example.cpu()
    return {"params": param_count(model), "bytes": weight_bytes(model), "flops": flops_per_sample(model, example),
            "latency_ms": latency_ms(model, example, latency_repeats),
            "throughput": throughput(model, example, throughput_batch)}
