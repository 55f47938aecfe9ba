"""A DeepInversion transfer set: `synthesize_batch` run batch by batch, cached on disk (`SynthesisCache`).

With the adaptive term (``compete_weight > 0``, Adaptive DeepInversion) a synthesis student is trained between
batches (``student_steps`` KD steps, T = 4, Adam 1e-3, on every input synthesised so far), so each new batch is
pushed toward inputs where that student still disagrees with the teacher. As in the paper, the student that
competes during synthesis is the one being distilled; here it is a separate copy (built by `student_factory`),
and the run's student stage then trains a fresh student on the finished set (so the set can be cached and reused).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.datafree.cache import SynthesisCache, synthesis_key
from kdistill.datafree.inversion import synthesize_batch

__all__ = ["deepinversion_set"]


def _kd_steps(student: nn.Module, teacher: nn.Module, x: torch.Tensor, steps: int, optimizer, *, seed: int,
              batch_size: int = 128, temperature: float = 4.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    student.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=generator)
        with torch.no_grad():
            t = teacher(x[idx])
        s = student(x[idx])
        loss = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                        reduction="batchmean") * temperature ** 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    student.eval()


def deepinversion_set(teacher: nn.Module, input_shape, num_classes: int, settings, *, seed: int, folder: Path,
                      student_factory: Optional[Callable[[], nn.Module]] = None,
                      log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(x, targets, info)``: ``settings.batches`` DeepInversion batches, reused from / saved to the cache file in
    `folder` keyed by the teacher's weights and the settings. `info` holds the file, the batches made now and the
    seconds spent."""
    adaptive = settings.compete_weight > 0
    if adaptive and student_factory is None:
        raise ValueError("adaptive DeepInversion needs a student_factory")
    key = synthesis_key(teacher, input_shape, num_classes, "deepinversion", settings.model_dump(mode="json"), seed)
    cache = SynthesisCache(folder, key)
    teacher.eval()
    student = optimizer = None
    if adaptive:
        student = student_factory()
        optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    start = time.perf_counter()

    def make_batch(i: int, xs: list, ys: list):
        if adaptive and xs:
            _kd_steps(student, teacher, torch.cat(xs), settings.student_steps, optimizer, seed=seed + 7919 * i)
        last: dict = {}
        x, y = synthesize_batch(teacher, input_shape, num_classes, settings, seed=seed * 100003 + i,
                                student=student if adaptive else None,
                                on_step=lambda step, terms: last.update(terms) if step == settings.steps - 1 else None)
        with torch.no_grad():
            hit = float((teacher(x).argmax(-1) == y).float().mean())
        parts = ", ".join(f"{k} {float(v.detach()):.3g}" for k, v in last.items())
        log(f"synthesis: batch {i + 1}/{settings.batches} ({parts}; teacher predicts the target for "
            f"{100 * hit:.0f} %) {time.perf_counter() - start:.0f} s")
        return x, y

    if adaptive:  # the synthesis student must see the stored batches to continue a partial set the same way
        xs, _ = cache.load()
        for i in range(1, len(xs)):
            _kd_steps(student, teacher, torch.cat(xs[:i]), settings.student_steps, optimizer, seed=seed + 7919 * i)
    x, y, made = cache.build(settings.batches, make_batch, log=log)
    return x, y, {"file": str(cache.path), "batches_made": made, "seconds": round(time.perf_counter() - start, 1),
                  "key": key}
