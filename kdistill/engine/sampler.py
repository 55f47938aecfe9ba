"""The data order as a pure function of (seed, epoch, step): resumable mid-epoch with no saved iterator.

Each epoch is a permutation drawn from a generator seeded by (seed, epoch); the global batch of
`batch_size * world_size` rows is split so that rank r takes rows [r*batch_size, (r+1)*batch_size).
The last incomplete global batch of an epoch is dropped so every step has the same size on every rank.

With ``lengths`` (length grouping, for variable-length text whose padding is trimmed per batch), the epoch's
permutation is cut into mega-batches of `GROUP_BATCHES` global batches; each mega-batch is sorted by length
(longest first, ties in permutation order) and cut into global batches, and the order of all the epoch's batches
is shuffled by the same (seed, epoch) generator. Every sample is still seen once per epoch and the order is still
a pure function of (seed, epoch, step); batches hold sentences of similar lengths, so less padding is computed.
"""

from __future__ import annotations

import torch

from kdistill.errors import DataError


GROUP_BATCHES = 50  # global batches per length-sorted mega-batch


class StepSampler:
    def __init__(self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, name: str = "data", lengths: torch.Tensor | None = None):
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
        if lengths is not None:
            lengths = torch.as_tensor(lengths).reshape(-1)
            if len(lengths) != num_samples:
                raise DataError(f"dataset '{name}': {len(lengths)} lengths for {num_samples} samples",
                                where="train.group_by_length", fix="give one length per sample")
        self.lengths = lengths
        self._epoch = None
        self._perm = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.num_samples, generator=g)
            else:
                g = None
                self._perm = torch.arange(self.num_samples)
            if self.lengths is not None:
                self._perm = self._group(self._perm, g)
            self._epoch = epoch
        return self._perm

    def _group(self, perm: torch.Tensor, g) -> torch.Tensor:
        """`perm` rearranged into global batches of similar lengths (module docstring); the dropped tail stays
        last."""
        global_batch = self.batch_size * self.world_size
        used = self.steps_per_epoch * global_batch
        body, tail = perm[:used], perm[used:]
        size = GROUP_BATCHES * global_batch
        chunks = []
        for start in range(0, used, size):
            mega = body[start:start + size]
            order = torch.sort(self.lengths[mega], descending=True, stable=True).indices
            chunks.append(mega[order])
        batches = torch.cat(chunks).view(self.steps_per_epoch, global_batch)
        if g is not None:
            batches = batches[torch.randperm(self.steps_per_epoch, generator=g)]
        return torch.cat([batches.reshape(-1), tail])

    def indices(self, step: int) -> torch.Tensor:
        """This rank's sample indices for optimizer step `step` (0-based, counted from the run start)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        start = pos * self.batch_size * self.world_size + self.rank * self.batch_size
        return perm[start:start + self.batch_size]

    def position(self, step: int) -> dict:
        epoch, pos = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": pos, "steps_per_epoch": self.steps_per_epoch}


def sample_lengths(data) -> torch.Tensor:
    """Per-sample lengths for `train.group_by_length`: the row sums of the dataset's ``attention_mask``."""
    tensors = getattr(data, "tensors", None)
    mask = tensors.get("attention_mask") if isinstance(tensors, dict) else None
    if mask is None:
        raise DataError(f"train.group_by_length needs per-sample lengths, but dataset "
                        f"'{getattr(data, 'name', 'data')}' has no 'attention_mask'", where="train.group_by_length",
                        fix="set group_by_length: false, or use a tokenized text dataset (x + attention_mask)")
    return mask.reshape(len(mask), -1).sum(1)
