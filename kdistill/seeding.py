"""Seeding helpers on the ground floor: seeds are passed, never set globally behind the caller's back."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Callable, TypeVar

import numpy as np
import torch

T = TypeVar("T")


@contextmanager
def preserved_global_rng():
    """Run a block that reseeds numpy/python global RNGs without changing the caller's RNG state."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def seeded_build(seed: int, build: Callable[[], T]) -> T:
    """`build()` with torch's RNG seeded to `seed` (a model's initial weights), the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
