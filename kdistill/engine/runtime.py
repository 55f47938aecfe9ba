"""The process-wide pieces of a training run: the Accelerator, the optimizer and its LR schedule, deterministic
algorithms, and the SIGINT/SIGTERM handler that turns a kill into a checkpoint."""

from __future__ import annotations

import math
import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import torch

from kdistill.train_config import DistributedConfig, TrainConfig

_ACCELERATOR = None


def get_accelerator(mixed_precision: str = "no", log_with: Sequence[str] = (), project_dir=None,
                    fsdp: Optional[DistributedConfig] = None):
    """One Accelerator per process (Accelerate keeps process-wide state); recreated if precision changes, or when
    experiment trackers (`log_with`, writing under `project_dir`) are asked for and differ from the current ones,
    or when the FSDP2 settings `fsdp` (`kdistill.engine.fsdp`) differ."""
    global _ACCELERATOR
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    key = (list(log_with), str(project_dir) if log_with else None)
    current = _ACCELERATOR
    sharding = fsdp.model_dump_json() if fsdp is not None else None
    if current is not None and current.mixed_precision == mixed_precision and \
            getattr(current, "_kdistill_fsdp", None) == sharding and (not log_with or getattr(current, "_kdistill_trackers", ([], None)) == key):
        return current
    if current is not None:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    # without a GPU, cpu=True lets `torchrun`/`accelerate launch` runs use DDP over gloo on the CPU
    options = {"log_with": list(log_with), "project_dir": str(project_dir)} if log_with else {}
    if fsdp is not None:
        from kdistill.engine.fsdp import make_fsdp_accelerator

        _ACCELERATOR = make_fsdp_accelerator(fsdp, **options)
    else:
        _ACCELERATOR = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), **options)
    _ACCELERATOR._kdistill_trackers = key
    _ACCELERATOR._kdistill_fsdp = sharding
    return _ACCELERATOR


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """The LR multiplier at each step: linear warm-up, then constant / cosine / linear decay / one-cycle."""
    total = cfg.steps
    warm = cfg.warmup_steps
    if cfg.schedule == "onecycle" and not warm:
        warm = max(1, int(0.3 * total))

    def fn(step: int) -> float:
        if warm and step < warm:
            start = 1 / 25 if cfg.schedule == "onecycle" else 0.0
            return start + (1 - start) * (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        progress = min(1.0, max(0.0, progress))
        if cfg.schedule == "linear":
            return 1.0 - progress
        floor = 1e-4 if cfg.schedule == "onecycle" else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """`cfg.optimizer` (sgd with Nesterov momentum when momentum > 0, adam, adamw) over the trainable `params`."""
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@contextmanager
def deterministic_mode(enabled: bool):
    """Deterministic algorithms (and no cuDNN benchmarking) inside the block when `enabled`; restored after."""
    if not enabled:
        yield
        return
    prev = torch.are_deterministic_algorithms_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)
        torch.backends.cudnn.benchmark = prev_bench


@contextmanager
def stop_on_signals(flag: dict):
    """SIGINT/SIGTERM set flag['signal'] (the loop checkpoints and stops at the step boundary)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        flag["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
