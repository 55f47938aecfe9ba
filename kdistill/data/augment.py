"""Random input augmentation (shifts and flips) that declares itself, so a teacher-output cache can react.

`AugmentedDataset` wraps an `ArrayDataset` and transforms the inputs of every batch: each sample is shifted by up
to ``max_shift`` positions along its spatial axes (zero fill) and, with ``flip``, mirrored along the last axis.
The transform of one sample is a deterministic function of ``(seed, index, aug_seed)``; every batch carries the
``aug_seed`` of each row. How ``aug_seed`` is drawn is what matters for caching teacher outputs:

- ``views=None``: a fresh ``aug_seed`` for every sample at every step (the usual random augmentation). The
  teacher's outputs are different every epoch, so no cache can hold them: the cache refuses, with an explanation.
- ``views=N``: ``aug_seed`` is drawn from ``0..N-1``: each sample has N fixed augmented views, and a cache stores
  the teacher's outputs of all N, looked up by ``(index, aug_seed)``.

The dataset declares this through its ``augmentation`` attribute (a dict of the settings, ``views`` included),
the hook that `kdistill.teachers.cache` reads; any dataset may declare one.
"""

from __future__ import annotations

from typing import Optional

import torch

from kdistill.data.arrays import ArrayDataset
from kdistill.errors import DataError

_MIX = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)


def _sample_hash(seed: int, index: torch.Tensor, aug_seed: torch.Tensor) -> torch.Tensor:
    """A well-mixed non-negative int64 per sample from (seed, index, aug_seed), in [0, 2^31)."""
    h = (index.long() * _MIX[0] + aug_seed.long() * _MIX[1] + seed * _MIX[2]) & 0x7FFFFFFF
    for _ in range(2):  # xorshift-multiply rounds (all in int64, kept below 2^31 so products never overflow)
        h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & 0x7FFFFFFF
    return h


def _shift(x: torch.Tensor, shift: torch.Tensor, dim: int) -> torch.Tensor:
    """Shift each sample of x along `dim` by its own amount (positive = towards higher indices), zero fill."""
    size = x.shape[dim]
    view = [1] * x.dim()
    view[dim] = size
    src = torch.arange(size).view(view) - shift.view([-1] + [1] * (x.dim() - 1))
    valid = (src >= 0) & (src < size)
    gathered = x.gather(dim, src.clamp(0, size - 1).expand_as(x))
    return torch.where(valid.expand_as(x), gathered, torch.zeros((), dtype=x.dtype))


def augment_inputs(x: torch.Tensor, index: torch.Tensor, aug_seed: torch.Tensor, *, max_shift: int = 0,
                   flip: bool = False, seed: int = 0) -> torch.Tensor:
    """The augmented inputs: per-sample shifts along the spatial axes (the last two of (N, C, H, W), the last one
    otherwise) by up to `max_shift`, and a mirror along the last axis when `flip`; deterministic per sample."""
    h = _sample_hash(seed, index, aug_seed)
    span = 2 * max_shift + 1
    dims = [x.dim() - 2, x.dim() - 1] if x.dim() == 4 else [x.dim() - 1]
    out = x
    if max_shift:
        for dim in dims:
            out = _shift(out, h % span - max_shift, dim)
            h = h // span
    if flip:
        mirror = (h % 2 == 1).view([-1] + [1] * (x.dim() - 1))
        out = torch.where(mirror, out.flip(-1), out)
    return out


class AugmentedDataset(torch.utils.data.Dataset):
    """An `ArrayDataset` whose inputs ``x`` are randomly shifted / flipped per batch (see the module docstring).

    ``batch(idx)`` draws the ``aug_seed`` of each row from the global torch RNG (the engine seeds it per rank and
    checkpoints it, so a resumed run draws the same); ``batch(idx, aug_seed=...)`` gives given views.
    """

    def __init__(self, base: ArrayDataset, *, max_shift: int = 0, flip: bool = False, views: Optional[int] = None,
                 seed: int = 0):
        if max_shift < 0:
            raise DataError(f"max_shift must be >= 0, got {max_shift}", where="data.augment.max_shift")
        if views is not None and views < 1:
            raise DataError(f"views must be >= 1 or unset, got {views}", where="data.augment.views")
        self.base = base
        self.name = f"{base.name}+augment"
        self.max_shift, self.flip, self.views, self.seed = max_shift, flip, views, seed
        self.tensors = base.tensors

    @property
    def augmentation(self) -> dict:
        return {"kind": "shift_flip", "max_shift": self.max_shift, "flip": self.flip, "seed": self.seed,
                "views": self.views}

    def __len__(self) -> int:
        return len(self.base)

    def fingerprint(self) -> str:
        return self.base.fingerprint()

    def batch(self, idx: torch.Tensor, aug_seed: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        out = self.base.batch(idx)
        if aug_seed is None:
            high = self.views if self.views else 2 ** 31 - 1
            aug_seed = torch.randint(high, (len(idx),))
        out["x"] = augment_inputs(out["x"], out["index"], aug_seed, max_shift=self.max_shift, flip=self.flip,
                                  seed=self.seed)
        out["aug_seed"] = aug_seed
        return out

    def __getitem__(self, i):
        row = self.batch(torch.as_tensor([i]))
        return {k: v[0] for k, v in row.items()}


def maybe_augment(dataset: ArrayDataset, augment_cfg, seed: int = 0):
    """The dataset wrapped in the configured augmentation (`data.augment`), or as is when none is set."""
    if augment_cfg is None:
        return dataset
    return AugmentedDataset(dataset, max_shift=augment_cfg.max_shift, flip=augment_cfg.flip,
                            views=augment_cfg.views, seed=seed)
