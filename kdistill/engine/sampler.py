"""The data order as a pure function of (seed, epoch, step): resumable mid-epoch with no saved iterator.

Each epoch is a permutation drawn from a generator seeded by (seed, epoch); the global batch of
`batch_size * world_size` rows is split so that rank r takes rows [r*batch_size, (r+1)*batch_size).
The last incomplete global batch of an epoch is dropped so every step has the same size on every rank.
"""

from __future__ import annotations

import torch

from kdistill.errors import DataError


class StepSampler:
    def __init__(self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, name: str = "data"):
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise DataError(f"dataset '{name}' has {num_samples} samples, fewer than one batch of {global_batch} "
                            f"({batch_size} x {world_size} processes)", where="train.batch_size",
                            fix=f"use batch_size <= {max(1, num_samples // world_size)}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.steps_per_epoch = num_samples // global_batch
        self._epoch = None
        self._perm = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.num_samples, generator=g)
            else:
                self._perm = torch.arange(self.num_samples)
            self._epoch = epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """This rank's sample indices for optimizer step `step` (0-based, counted from the run start)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        start = pos * self.batch_size * self.world_size + self.rank * self.batch_size
        return perm[start:start + self.batch_size]

    def position(self, step: int) -> dict:
        epoch, pos = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": pos, "steps_per_epoch": self.steps_per_epoch}
