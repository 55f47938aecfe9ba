"""Contrastive representation distillation (CRD) with a fixed-size negative queue.

Tian, Krishnan & Isola 2020, "Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import WiringError

__all__ = ["CRDLoss"]

_WHERE = "kdistill.losses.CRDLoss"


class CRDLoss(nn.Module):
    """Contrastive representation distillation as an InfoNCE loss with a MoCo-style negative queue.

    CRD (Tian et al. 2020, Eqs. 10-19) maximizes a lower bound on the mutual information between teacher and
    student representations: the student embedding of sample ``i`` must pick out the teacher embedding of the
    same sample against negatives. Both sides go through their own linear embedding head followed by L2
    normalization (``g^S``, ``g^T`` in the paper)::

        v_s = normalize(W_s f_s),  v_t = normalize(W_t f_t)                            (B, embed_dim)
        L_s->t = -1/B sum_i log( exp(v_s_i . v_t_i / tau) / sum_{k in {i} u N_i} exp(v_s_i . k / tau) )
        L_t->s = same with the roles of student and teacher swapped                  (symmetric=True)
        loss   = (L_s->t + L_t->s) / 2        (or L_s->t alone when symmetric=False)

    Negatives ``N_i``: the queue of past **teacher** embeddings (for student anchors) -- plus, when
    ``in_batch_negatives=True`` (default), the teacher embeddings of the other samples in the batch. For the
    symmetric term the negatives are a second queue of past **student** embeddings (plus the other in-batch
    student embeddings), mirroring CRD's two-sided objective that contrasts against both memory banks.

    Differences from the paper, on purpose:

    * CRD keeps an ``N x d`` memory bank (one slot per *training example*, updated with momentum by sample
      index) and uses an NCE objective with 16384 sampled negatives. Here a fixed-size FIFO queue of the last
      ``queue_size`` embeddings (MoCo, He et al. 2020) replaces the bank, so memory does not grow with the
      dataset and no sample indices are needed; and the softmax (InfoNCE, van den Oord et al. 2018) form of
      the mutual-information bound is used instead of CRD's NCE critic with a constant normalizer.
    * ``momentum`` keeps its CRD role of smoothing the stored embeddings, but in MoCo form: the embeddings
      written to the queue are produced by exponential-moving-average copies of the two heads,
      ``W_key <- momentum * W_key + (1 - momentum) * W``, so queue entries drift slowly. ``momentum=0``
      enqueues the current heads' embeddings.

    Queue entries are detached, written after the loss is computed, and only in training mode
    (``module.train()``); in eval mode the queue is read but never changed. Queue state (``queue_teacher``,
    ``queue_student``, ``queue_ptr``, ``queue_count``) and the key heads are registered buffers / modules, so
    ``state_dict()`` checkpoints them. Until the queue fills, only its filled part is used.

    Args:
        student_dim: flattened feature size of the student tap (``f_s.flatten(1).shape[1]``).
        teacher_dim: flattened feature size of the teacher tap.
        embed_dim: embedding size of both heads (paper: 128).
        queue_size: number of stored negatives per queue (memory ``2 * queue_size * embed_dim`` floats).
        temperature: InfoNCE temperature ``tau`` (paper: 0.07).
        momentum: EMA factor of the key heads that produce queue entries, in ``[0, 1)`` (paper's memory
            momentum: 0.5).
        in_batch_negatives: also use the other samples of the batch as negatives.
        symmetric: add the teacher->student term (two-sided objective).

    Shapes:
        forward(student_features ``(B, *)``, teacher_features ``(B, *)``) -> scalar.
    """

    queue_teacher: Tensor
    queue_student: Tensor
    queue_ptr: Tensor
    queue_count: Tensor

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        embed_dim: int = 128,
        queue_size: int = 4096,
        temperature: float = 0.07,
        momentum: float = 0.5,
        in_batch_negatives: bool = True,
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        for arg, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim), ("embed_dim", embed_dim)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise WiringError(f"CRDLoss: {arg} must be a positive integer, got {value!r}", where=_WHERE,
                                  fix=f"set {arg} to the flattened feature size")
        if isinstance(queue_size, bool) or int(queue_size) != queue_size or queue_size < 0:
            raise WiringError(f"CRDLoss: queue_size must be an integer >= 0, got {queue_size!r}", where=_WHERE,
                              fix="use e.g. queue_size=4096")
        if not (float(temperature) > 0):
            raise WiringError(f"CRDLoss: temperature must be > 0, got {temperature!r}", where=_WHERE,
                              fix="use temperature=0.07 (the paper's value)")
        if not (0.0 <= float(momentum) < 1.0):
            raise WiringError(f"CRDLoss: momentum must be in [0, 1), got {momentum!r}", where=_WHERE,
                              fix="use momentum=0.5 (the paper's value)")
        if queue_size == 0 and not in_batch_negatives:
            raise WiringError("CRDLoss: no negatives (queue_size=0 and in_batch_negatives=False)", where=_WHERE,
                              fix="set queue_size > 0 or in_batch_negatives=True")
        self.student_dim = int(student_dim)
        self.teacher_dim = int(teacher_dim)
        self.embed_dim = int(embed_dim)
        self.queue_size = int(queue_size)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.in_batch_negatives = bool(in_batch_negatives)
        self.symmetric = bool(symmetric)

        self.embed_student = nn.Linear(self.student_dim, self.embed_dim)
        self.embed_teacher = nn.Linear(self.teacher_dim, self.embed_dim)
        self.key_student = copy.deepcopy(self.embed_student).requires_grad_(False)
        self.key_teacher = copy.deepcopy(self.embed_teacher).requires_grad_(False)

        self.register_buffer("queue_teacher", torch.zeros(self.queue_size, self.embed_dim))
        self.register_buffer("queue_student", torch.zeros(self.queue_size, self.embed_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, embed_dim={self.embed_dim}, "
            f"queue_size={self.queue_size}, temperature={self.temperature}, momentum={self.momentum}, "
            f"in_batch_negatives={self.in_batch_negatives}, symmetric={self.symmetric}"
        )

    def _flatten(self, role: str, x: Tensor, dim: int, head: nn.Linear) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
            desc = f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise WiringError(f"CRDLoss: {role} must be a float tensor of shape (B, *), got {desc}", where=_WHERE,
                              fix="pass the tapped feature tensor with a batch dimension")
        flat = x.flatten(1)
        if flat.shape[1] != dim:
            raise WiringError(
                f"CRDLoss: {role} shape {tuple(x.shape)} flattens to {flat.shape[1]} features, expected {dim}",
                where=_WHERE,
                fix=f"construct CRDLoss with {role.split('_')[0]}_dim={flat.shape[1]}",
            )
        return flat.to(head.weight.dtype)

    @staticmethod
    def _info_nce(anchor: Tensor, positive: Tensor, queue: Tensor | None, in_batch: bool, tau: float) -> Tensor:
        """Mean over the batch of -log softmax(logits)[positive] with anchors (B, d), positives (B, d)."""
        if in_batch:
            # positives on the diagonal, the other in-batch entries are negatives
            logits = anchor @ positive.t()
            target = torch.arange(anchor.shape[0], device=anchor.device)
        else:
            logits = (anchor * positive).sum(dim=1, keepdim=True)
            target = torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device)
        if queue is not None and queue.shape[0] > 0:
            logits = torch.cat([logits, anchor @ queue.t()], dim=1)
        return F.cross_entropy(logits / tau, target)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.momentum
        for online, key in ((self.embed_student, self.key_student), (self.embed_teacher, self.key_teacher)):
            for p, k in zip(online.parameters(), key.parameters()):
                k.mul_(m).add_(p.detach(), alpha=1.0 - m)

    @torch.no_grad()
    def _enqueue(self, keys_student: Tensor, keys_teacher: Tensor) -> None:
        size = self.queue_size
        if size == 0:
            return
        if keys_teacher.shape[0] > size:  # a batch larger than the queue: keep its last `size` entries
            keys_student, keys_teacher = keys_student[-size:], keys_teacher[-size:]
        n = keys_teacher.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % size
        self.queue_teacher[idx] = keys_teacher.to(self.queue_teacher.dtype)
        self.queue_student[idx] = keys_student.to(self.queue_student.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
        self.queue_count.copy_(torch.clamp(self.queue_count + n, max=size))

    def _filled(self, queue: Tensor) -> Tensor | None:
        # a copy: the queue is overwritten in place after the loss, before backward() runs
        count = int(self.queue_count)
        return queue[:count].detach().clone() if count > 0 else None

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """InfoNCE loss between student and teacher features of the same batch.

        Args:
            student_features: shape ``(B, *)`` flattening to ``student_dim``.
            teacher_features: shape ``(B, *)`` flattening to ``teacher_dim``; same ``B``.

        Returns:
            scalar loss (float32, or the heads' dtype).
        """
        f_s = self._flatten("student_features", student_features, self.student_dim, self.embed_student)
        f_t = self._flatten("teacher_features", teacher_features, self.teacher_dim, self.embed_teacher)
        if f_s.shape[0] != f_t.shape[0]:
            raise WiringError(
                f"CRDLoss: batch sizes differ, student shape {tuple(student_features.shape)} vs teacher shape "
                f"{tuple(teacher_features.shape)}",
                where=_WHERE,
                fix="feed the same batch to student and teacher",
            )
        v_s = F.normalize(self.embed_student(f_s), dim=1)
        v_t = F.normalize(self.embed_teacher(f_t), dim=1)
        tau = self.temperature
        loss = self._info_nce(v_s, v_t, self._filled(self.queue_teacher), self.in_batch_negatives, tau)
        if self.symmetric:
            loss_t = self._info_nce(v_t, v_s, self._filled(self.queue_student), self.in_batch_negatives, tau)
            loss = 0.5 * (loss + loss_t)
        if self.training:
            self._momentum_update()
            with torch.no_grad():
                k_s = F.normalize(self.key_student(f_s.detach()), dim=1)
                k_t = F.normalize(self.key_teacher(f_t.detach()), dim=1)
            self._enqueue(k_s, k_t)
        return loss


def simcse(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Unsupervised SimCSE (Gao, Yao & Chen 2021, "SimCSE: Simple Contrastive Learning of Sentence Embeddings",
    EMNLP 2021, arXiv:2104.08821, Eq. 1): two forward passes of the same sentences with different dropout masks
    are positives, the other sentences of the batch negatives::

        L = -1/B sum_i log( exp(cos(h_i, h'_i) / tau) / sum_j exp(cos(h_i, h'_j) / tau) )

    Args:
        view_a: ``(B, D)`` embeddings of the first pass.
        view_b: ``(B, D)`` embeddings of the second pass (same sentences, same order).
        temperature: ``tau`` (paper: 0.05).

    Returns:
        scalar.
    """
    if view_a.shape != view_b.shape or view_a.ndim != 2 or view_a.shape[0] < 2:
        raise WiringError(f"simcse: needs two (B, D) views of >= 2 sentences, got {tuple(view_a.shape)} and "
                          f"{tuple(view_b.shape)}", where="kdistill.losses.simcse",
                          fix="encode the same batch twice in train mode (dropout on)")
    dtype = torch.promote_types(view_a.dtype, torch.float32)
    a = F.normalize(view_a.to(dtype), dim=1)
    b = F.normalize(view_b.to(dtype), dim=1)
    logits = a @ b.T / float(temperature)
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))
