"""The batches of each optimizer step, on the device: fancy-indexed from an in-memory dataset (``data.batch``)
or read by a DataLoader (workers, pinned memory), in the `StepSampler`'s order from any step on, split into
micro-batches for gradient accumulation."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch

from kdistill.engine.sampler import StepSampler
from kdistill.train_config import TrainConfig


def step_batches(cfg: TrainConfig, device: torch.device, data, sampler: StepSampler, start: int,
                 collate_fn: Optional[Callable] = None,
                 prefetch: Optional[Callable] = None) -> Iterator[tuple[int, list]]:
    """Yield (step, micro-batches) from `start` to `cfg.steps`. `prefetch(host_batch) -> dict` (a cached
    teacher's) adds entries to each batch on the host, before the copy to the device (in the loader's workers
    if any)."""
    micro = cfg.batch_size // cfg.grad_accum
    pin = cfg.pin_memory and device.type == "cuda"
    layout = channels_last if cfg.channels_last else (lambda b: b)
    if hasattr(data, "batch"):
        for step in range(start, cfg.steps):
            idx = sampler.indices(step)
            batch = data.batch(idx)
            if prefetch is not None:
                batch.update(prefetch(batch))
            if pin:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            if cfg.grad_accum == 1:
                yield step, [layout(to_device(batch, device, pin))]
                continue
            yield step, [layout(to_device({k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}, device,
                                          pin)) for i in range(cfg.grad_accum)]
        return
    if prefetch is not None:
        collate_fn = PrefetchCollate(collate_fn or torch.utils.data.default_collate, prefetch)
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=MicroBatchPlan(sampler, start, cfg.steps, cfg.grad_accum),
        num_workers=cfg.num_workers, pin_memory=pin, collate_fn=collate_fn,
        persistent_workers=cfg.num_workers > 0)
    it = iter(loader)
    for step in range(start, cfg.steps):
        yield step, [layout(to_device(next(it), device, pin)) for _ in range(cfg.grad_accum)]


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors (also inside a dict) moved to `device`; a dict already all on the CPU is returned as is."""
    if device.type == "cpu" and isinstance(batch, dict) and all(
            torch.is_tensor(v) and v.device.type == "cpu" for v in batch.values()):
        return batch
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


def channels_last(batch: dict) -> dict:
    """4-D image inputs in channels-last memory layout (the layout the channels_last model's convolutions use)."""
    for key in ("x", "teacher_x", "student_x"):
        value = batch.get(key)
        if torch.is_tensor(value) and value.dim() == 4 and value.is_floating_point():
            batch[key] = value.contiguous(memory_format=torch.channels_last)
    return batch


class PrefetchCollate:
    """collate, then add the prefetched entries (runs in the DataLoader's workers; picklable)."""

    def __init__(self, collate: Callable, prefetch: Callable):
        self.collate, self.prefetch = collate, prefetch

    def __call__(self, items):
        batch = self.collate(items)
        batch.update(self.prefetch(batch))
        return batch


class MicroBatchPlan:
    """A batch sampler for DataLoader: the micro-batches of steps [start, steps) in the StepSampler's order."""

    def __init__(self, sampler: StepSampler, start: int, steps: int, accum: int):
        self.sampler, self.start, self.steps, self.accum = sampler, start, steps, accum

    def __iter__(self):
        micro = self.sampler.batch_size // self.accum
        for step in range(self.start, self.steps):
            idx = self.sampler.indices(step).tolist()
            for i in range(self.accum):
                yield idx[i * micro:(i + 1) * micro]

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accum
