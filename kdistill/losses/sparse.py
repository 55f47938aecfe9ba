"""Response losses against a *sparse* teacher: its top-k classes plus one bucket for the rest.

For a language model the teacher distribution has V ~ 50k-150k entries per token, too many to store for a whole
corpus; a teacher-output cache keeps only the top-k classes of each position. Dropping the rest of the mass would
make the target an unnormalized vector and the KL no longer a divergence, so the leftover probability is kept as
one extra "tail" bucket (as in top-k logit caches for LLM distillation)::

    teacher:  P~ = (P_{i_1}, ..., P_{i_k}, P_tail),   P_tail = 1 - sum_j P_{i_j}        (k + 1 buckets)
    student:  Q~ = (Q_{i_1}, ..., Q_{i_k}, Q_tail),   Q_tail = sum_{c not in top-k} Q_c

with ``P = softmax(teacher / T)`` and ``Q = softmax(student / T)``: the student's distribution is coarse-grained
onto the same k + 1 buckets (the top-k are the teacher's, per position). Any divergence of the response library
is then applied to ``(P~, Q~)``, which are proper distributions: ``KL(P~ || Q~) >= 0`` with equality iff the
bucket masses agree, and ``KL(P~ || Q~) <= KL(P || Q)`` (coarse-graining never increases an f-divergence). With
``k = V`` the tail is empty and every loss equals its dense version exactly.

The teacher side is a `SparseDistribution`: ``indices`` (top-k class ids), ``log_probs`` (their log P at the
temperature it was built with) and ``log_tail`` (log P_tail, ``-inf`` when the top-k hold all the mass). The
bucket probabilities depend on the temperature, so a sparse teacher serves only losses at its own temperature.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from kdistill.errors import WiringError
from kdistill.losses import response

__all__ = ["SPARSE_LOSSES", "SparseDistribution", "bucket_log_probs", "sparse_loss", "sparse_jsd", "sparse_kd",
           "sparse_kl", "sparse_skew_kl", "sparse_tvd"]


@dataclass
class SparseDistribution:
    """A teacher distribution kept as its top-k classes plus a tail bucket, per position.

    Attributes:
        indices: ``(*positions, k)`` integer class ids of the top-k classes.
        log_probs: ``(*positions, k)`` their log-probabilities ``log softmax(teacher / T)``.
        log_tail: ``(*positions,)`` ``log(1 - sum(exp(log_probs)))``, ``-inf`` when nothing is left.
        num_classes: the size V of the full distribution.
        temperature: the temperature ``T`` of ``log_probs`` and ``log_tail``.
    """

    indices: Tensor
    log_probs: Tensor
    log_tail: Tensor
    num_classes: int
    temperature: float = 1.0

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float = 1.0) -> "SparseDistribution":
        """Keep the top-k classes of ``softmax(logits / T)`` and the log of the mass left over."""
        num_classes = logits.shape[-1]
        if not 1 <= k <= num_classes:
            raise WiringError(f"top-k needs 1 <= k <= {num_classes} classes, got k={k}",
                              where="kdistill.losses.sparse", fix=f"choose k between 1 and {num_classes}")
        log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
        top, idx = log_p.topk(k, dim=-1)
        if k == num_classes:
            log_tail = torch.full(top.shape[:-1], float("-inf"), dtype=top.dtype, device=top.device)
        else:
            # the rest as a logsumexp over the classes outside the top-k: accurate even when the tail is tiny
            # (1 - sum(top-k) would cancel catastrophically)
            rest = log_p.scatter(-1, idx, float("-inf"))
            log_tail = torch.logsumexp(rest, dim=-1)
        return cls(idx, top, log_tail, num_classes, float(temperature))

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """The shape of the dense distribution it stands for: ``(*positions, num_classes)``."""
        return torch.Size((*self.log_tail.shape, self.num_classes))

    @property
    def dtype(self) -> torch.dtype:
        return self.log_probs.dtype

    @property
    def device(self) -> torch.device:
        return self.log_probs.device

    def to(self, device: Any) -> "SparseDistribution":
        return SparseDistribution(self.indices.to(device), self.log_probs.to(device), self.log_tail.to(device),
                                  self.num_classes, self.temperature)

    def bucket_log_probs(self) -> Tensor:
        """``(*positions, k + 1)``: the teacher's log-probabilities of the top-k buckets, then the tail's."""
        dtype = torch.promote_types(self.log_probs.dtype, torch.float32)
        return torch.cat([self.log_probs.to(dtype), self.log_tail.to(dtype).unsqueeze(-1)], dim=-1)

    def dense_log_probs(self) -> Tensor:
        """The full ``(*positions, V)`` log-probabilities with the tail mass spread evenly over the other classes
        (for inspection and tests; losses never need it)."""
        rest = self.num_classes - self.k
        fill = (self.log_tail.float() - math.log(rest)) if rest else torch.full_like(self.log_tail.float(), -math.inf)
        out = fill.unsqueeze(-1).expand(*self.shape).clone()
        return out.scatter(-1, self.indices.long(), self.log_probs.float())


def _check(name: str, student_logits: Tensor, teacher: SparseDistribution, temperature: float) -> float:
    if not isinstance(teacher, SparseDistribution):
        raise WiringError(f"{name}: the teacher must be a SparseDistribution, got {type(teacher).__name__}",
                          where=f"kdistill.losses.sparse.{name}", fix="use the dense loss for a tensor of logits")
    if not isinstance(student_logits, Tensor) or not student_logits.is_floating_point():
        raise WiringError(f"{name}: student logits must be a floating-point tensor",
                          where=f"kdistill.losses.sparse.{name}", fix="pass the model's output logits")
    if tuple(student_logits.shape) != tuple(teacher.shape):
        raise WiringError(f"{name}: student logits shape {tuple(student_logits.shape)} != the sparse teacher's "
                          f"dense shape {tuple(teacher.shape)}", where=f"kdistill.losses.sparse.{name}",
                          fix="student and teacher need the same positions and number of classes")
    t = float(temperature)
    if not math.isclose(t, teacher.temperature, rel_tol=1e-6):
        raise WiringError(f"{name}: the sparse teacher holds probabilities at temperature {teacher.temperature:g} "
                          f"but the loss uses temperature {t:g}", where=f"kdistill.losses.sparse.{name}",
                          fix="rebuild the top-k cache for this temperature (its buckets depend on it), or use a "
                              "dense cache")
    return t


def bucket_log_probs(student_logits: Tensor, indices: Tensor, temperature: float = 1.0) -> Tensor:
    """The student's log-probabilities on the teacher's k + 1 buckets, ``(*positions, k + 1)``::

        log Q~_j    = log Q_{i_j}                                 j = 1..k
        log Q~_tail = logsumexp_{c not in top-k} (s_c / T) - logsumexp_c (s_c / T)

    computed in float32 at least; the tail is ``-inf`` (with a zero gradient) when ``k = V``.
    """
    log_q = torch.log_softmax(student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
                              / temperature, dim=-1)
    indices = indices.long()
    top = log_q.gather(-1, indices)
    if indices.shape[-1] == log_q.shape[-1]:
        tail = torch.full_like(top[..., :1], float("-inf"))
    else:
        tail = torch.logsumexp(log_q.scatter(-1, indices, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([top, tail], dim=-1)


def _buckets(name: str, student_logits: Tensor, teacher: SparseDistribution, temperature: float):
    t = _check(name, student_logits, teacher, temperature)
    log_q = bucket_log_probs(student_logits, teacher.indices, t)
    log_p = teacher.bucket_log_probs().to(log_q.dtype)
    return log_q, log_p, t


# The bucket vectors are normalized log-probabilities, so the dense losses at temperature 1 (a log_softmax of a
# normalized log-probability vector is itself) compute exactly the divergence between the bucket distributions.

def sparse_kl(student_logits: Tensor, teacher: SparseDistribution, temperature: float = 1.0, reverse: bool = False,
              *, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """``KL(P~ || Q~)`` (or ``KL(Q~ || P~)`` with ``reverse=True``) on the k + 1 buckets; no ``T^2`` factor."""
    log_q, log_p, _ = _buckets("sparse_kl", student_logits, teacher, temperature)
    return response.kl(log_q, log_p, 1.0, reverse, mask=mask, reduction=reduction)


def sparse_kd(student_logits: Tensor, teacher: SparseDistribution, temperature: float = 4.0, *,
              mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Hinton KD on the buckets: ``T^2 * KL(P~ || Q~)`` (equals `kd` when ``k = V``)."""
    log_q, log_p, t = _buckets("sparse_kd", student_logits, teacher, temperature)
    return response.kl(log_q, log_p, 1.0, mask=mask, reduction=reduction) * (t * t)


def sparse_jsd(student_logits: Tensor, teacher: SparseDistribution, beta: float = 0.5, temperature: float = 1.0, *,
               mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Generalized Jensen-Shannon divergence of `kdistill.losses.jsd` on the buckets."""
    log_q, log_p, _ = _buckets("sparse_jsd", student_logits, teacher, temperature)
    return response.jsd(log_q, log_p, beta, 1.0, mask=mask, reduction=reduction)


def sparse_skew_kl(student_logits: Tensor, teacher: SparseDistribution, alpha: float = 0.1, reverse: bool = False,
                   temperature: float = 1.0, *, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Skew KL of `kdistill.losses.skew_kl` on the buckets."""
    log_q, log_p, _ = _buckets("sparse_skew_kl", student_logits, teacher, temperature)
    return response.skew_kl(log_q, log_p, alpha, reverse, 1.0, mask=mask, reduction=reduction)


def sparse_tvd(student_logits: Tensor, teacher: SparseDistribution, temperature: float = 1.0, *,
               mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Total variation distance on the buckets (a lower bound of the dense TVD)."""
    log_q, log_p, _ = _buckets("sparse_tvd", student_logits, teacher, temperature)
    return response.tvd(log_q, log_p, 1.0, mask=mask, reduction=reduction)


# the registry name of a dense loss -> its sparse-teacher version
SPARSE_LOSSES: dict[str, Callable[..., Tensor]] = {
    "kd": sparse_kd,
    "kl": sparse_kl,
    "jsd": sparse_jsd,
    "skew_kl": sparse_skew_kl,
    "tvd": sparse_tvd,
}


def sparse_loss(loss: str, student_logits: Tensor, teacher: SparseDistribution, params: Mapping[str, Any]) -> Tensor:
    """Call the sparse version of the registry loss `loss` (the distiller routes a sparse teacher value here)."""
    fn = SPARSE_LOSSES.get(loss)
    if fn is None:
        raise WiringError(f"loss '{loss}' needs the full teacher distribution, but the teacher gives only its top-k "
                          f"classes", fix=f"use a dense teacher cache, or one of {', '.join(SPARSE_LOSSES)}")
    return fn(student_logits, teacher, **params)


def loss_temperature(loss: str, params: Mapping[str, Any]) -> float:
    """The temperature a registry loss will use with these params (its default when not given)."""
    if "temperature" in params:
        return float(params["temperature"])
    fn = SPARSE_LOSSES.get(loss) or response.__dict__.get(loss)
    if fn is None:
        return 1.0
    default = inspect.signature(fn).parameters.get("temperature")
    return float(default.default) if default is not None else 1.0
