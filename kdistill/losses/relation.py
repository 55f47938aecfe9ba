"""Relation-based distillation losses: match how samples in a batch relate to each other.

Every function takes ``(student_embeddings, teacher_embeddings)`` of shape ``(B, *)``; each is flattened to
``(B, D_s)`` / ``(B, D_t)`` and the dimensions may differ (only relations between samples are compared).
Computation in float32 at least (half inputs are upcast). The teacher is not detached (gradients flow to it
if it requires grad; it need not). Bad input raises :class:`kdistill.errors.WiringError`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import WiringError
from kdistill.losses.feature import _check_batch, _check_tensor, _upcast, _where

__all__ = ["rkd_distance", "rkd_angle", "similarity_preserving", "pkt", "correlation_congruence"]

_CC_KERNELS = ("gaussian", "bilinear")


def _flat_pair(name: str, student: Tensor, teacher: Tensor, min_batch: int) -> tuple[Tensor, Tensor]:
    _check_tensor(name, "student_embeddings", student, 2, "(B, D) or (B, *)")
    _check_tensor(name, "teacher_embeddings", teacher, 2, "(B, D) or (B, *)")
    _check_batch(name, student, teacher, min_batch)
    return _upcast(student).flatten(1), _upcast(teacher).flatten(1)


def _normalized_distances(e: Tensor) -> Tensor:
    """Pairwise Euclidean distances divided by their mean over distinct pairs (i != j). (B, D) -> (B, B)."""
    b = e.shape[0]
    d = torch.cdist(e, e, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=e.device)
    d = d * off_diagonal  # exact zeros on the diagonal
    mean = d.sum() / (b * (b - 1))
    return d / mean.clamp(min=1e-12)


def rkd_distance(student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
    """Distance-wise relational KD (Park et al. 2019, "Relational Knowledge Distillation", CVPR 2019,
    arXiv:1904.05068, Eqs. 3-5)::

        psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu,   mu = 1/(B(B-1)) sum_{i != j} ||t_i - t_j||_2
        L_RKD-D = 1/B^2 sum_{i, j} huber(psi_D(s_i, s_j) - psi_D(t_i, t_j))

    with ``huber`` the smooth-L1 loss (``beta = 1``). The normalizer ``mu`` is the mean over distinct pairs;
    the final average runs over the full ``B x B`` matrix, zero diagonal included, as in the authors' code
    (so it is ``(B-1)/B`` times the mean over distinct pairs).

    Args:
        student_embeddings: shape ``(B, D_s)`` (or ``(B, *)``, flattened), ``B >= 2``.
        teacher_embeddings: shape ``(B, D_t)`` (or ``(B, *)``, flattened).

    Returns:
        scalar.
    """
    name = "rkd_distance"
    s, t = _flat_pair(name, student_embeddings, teacher_embeddings, min_batch=2)
    return F.smooth_l1_loss(_normalized_distances(s), _normalized_distances(t), reduction="mean", beta=1.0)


def _angles(e: Tensor) -> Tensor:
    """cos of the angle at vertex i between e_j and e_k: (B, D) -> (B, B, B) indexed [i, j, k].

    Uses explicit differences (memory B^2 * D) rather than a Gram-matrix shortcut, which is unstable for
    (near-)duplicate embeddings. Degenerate vectors (j == i, or e_j == e_i) normalize to 0, so their
    cosines are 0.
    """
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # diff[i, j] = e_j - e_i
    unit = F.normalize(diff, p=2.0, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2))


def rkd_angle(student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
    """Angle-wise relational KD (Park et al. 2019, "Relational Knowledge Distillation", CVPR 2019,
    arXiv:1904.05068, Eqs. 6-7)::

        psi_A(t_i, t_j, t_k) = < (t_j - t_i) / ||t_j - t_i||,  (t_k - t_i) / ||t_k - t_i|| >
        L_RKD-A = 1/B^3 sum_{i, j, k} huber(psi_A(s_i, s_j, s_k) - psi_A(t_i, t_j, t_k))

    with ``huber`` the smooth-L1 loss (``beta = 1``), averaged over the full ``B x B x B`` tensor as in the
    authors' code; degenerate triples (``j == i`` or ``k == i``) have cosine 0 on both sides.
    Memory is ``O(B^2 * D)``.

    Args:
        student_embeddings: shape ``(B, D_s)`` (or ``(B, *)``, flattened), ``B >= 2``.
        teacher_embeddings: shape ``(B, D_t)`` (or ``(B, *)``, flattened).

    Returns:
        scalar.
    """
    name = "rkd_angle"
    s, t = _flat_pair(name, student_embeddings, teacher_embeddings, min_batch=2)
    return F.smooth_l1_loss(_angles(s), _angles(t), reduction="mean", beta=1.0)


def similarity_preserving(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Similarity-preserving KD (Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation", ICCV 2019,
    arXiv:1907.09682, Eqs. 1-4)::

        G = f f^T,  f = reshape(features, (B, -1));   G~_{i,:} = G_{i,:} / ||G_{i,:}||_2   (row-wise)
        L_SP = 1/B^2 ||G~_s - G~_t||_F^2

    Args:
        student_features: shape ``(B, *)`` (e.g. ``(B, C, H, W)``), flattened per sample.
        teacher_features: shape ``(B, *)``; only the batch size must match.

    Returns:
        scalar.
    """
    name = "similarity_preserving"
    s, t = _flat_pair(name, student_features, teacher_features, min_batch=1)
    b = s.shape[0]
    g_s = F.normalize(s @ s.t(), p=2.0, dim=1)
    g_t = F.normalize(t @ t.t(), p=2.0, dim=1)
    return (g_s - g_t).pow(2).sum() / (b * b)


def pkt(student_embeddings: Tensor, teacher_embeddings: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer with the cosine kernel (Passalis & Tefas 2018, "Learning Deep
    Representations with Probabilistic Knowledge Transfer", ECCV 2018, arXiv:1803.10837, Eqs. 9-13)::

        x_i <- x_i / (||x_i||_2 + eps)                    (rows L2-normalized; zero rows stay 0)
        K_ij = (cos(x_i, x_j) + 1) / 2                    (cosine kernel mapped to [0, 1])
        P_ij = K_ij / sum_k K_ik                          (row i = conditional distribution p(j | i))
        L_PKT = 1/B^2 sum_{i, j} P^t_ij * log((P^t_ij + eps) / (P^s_ij + eps))

    Convention: the mean is over **all** ``B x B`` entries (diagonal included), following the authors'
    public implementation (``torch.mean`` over the matrix in passalis/probabilistic_kt); this is ``1/B``
    times the batch mean of the per-anchor divergences ``KL(P^t_i || P^s_i)`` (up to ``eps``).

    Args:
        student_embeddings: shape ``(B, D_s)`` (or ``(B, *)``, flattened).
        teacher_embeddings: shape ``(B, D_t)`` (or ``(B, *)``, flattened).
        eps: small constant used in the normalization and inside the log (authors: 1e-7).

    Returns:
        scalar.
    """
    name = "pkt"
    if not (float(eps) >= 0):
        raise WiringError(f"{name}: eps must be >= 0, got {eps!r}", where=_where(name), fix="use eps=1e-7")
    s, t = _flat_pair(name, student_embeddings, teacher_embeddings, min_batch=1)

    def conditional(x: Tensor) -> Tensor:
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        k = (x @ x.t() + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)

    p_s, p_t = conditional(s), conditional(t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _correlation_matrix(x: Tensor, kernel: str, gamma: float, order: int) -> Tensor:
    x = F.normalize(x, p=2.0, dim=1)
    sim = x @ x.t()
    if kernel == "bilinear":
        return sim
    # exp(-gamma ||x_i - x_j||^2) = exp(-2 gamma) exp(2 gamma <x_i, x_j>) for unit vectors; Taylor-expand the
    # second factor to the given order.
    corr = torch.zeros_like(sim)
    power = torch.ones_like(sim)
    for p in range(order + 1):
        if p > 0:
            power = power * sim
        corr = corr + (math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p)) * power
    return corr


def correlation_congruence(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    kernel: str = "gaussian",
    gamma: float = 0.4,
    order: int = 2,
) -> Tensor:
    """Correlation congruence (Peng et al. 2019, "Correlation Congruence for Knowledge Distillation",
    ICCV 2019, arXiv:1904.01802, Eqs. 6-10)::

        f_i <- f_i / ||f_i||_2
        gaussian:  C_ij = sum_{p=0}^{P} exp(-2 gamma) (2 gamma)^p / p! * <f_i, f_j>^p
                   (order-P Taylor expansion of the RBF kernel exp(-gamma ||f_i - f_j||^2) for unit vectors)
        bilinear:  C_ij = <f_i, f_j>
        L_CC = 1/B^2 ||C_s - C_t||_F^2

    The paper uses the CC term next to a KD term; this function is the CC term only.

    Args:
        student_embeddings: shape ``(B, D_s)`` (or ``(B, *)``, flattened).
        teacher_embeddings: shape ``(B, D_t)`` (or ``(B, *)``, flattened).
        kernel: ``"gaussian"`` (Taylor-approximated RBF, the paper's choice) or ``"bilinear"``.
        gamma: RBF bandwidth ``gamma > 0`` (paper: 0.4); ignored for ``"bilinear"``.
        order: Taylor order ``P >= 0`` (paper: 2); ignored for ``"bilinear"``.

    Returns:
        scalar.
    """
    name = "correlation_congruence"
    if kernel not in _CC_KERNELS:
        raise WiringError(
            f"{name}: unknown kernel {kernel!r}",
            where=_where(name),
            fix=f"use one of {', '.join(repr(k) for k in _CC_KERNELS)}",
        )
    if kernel == "gaussian":
        if not (math.isfinite(float(gamma)) and float(gamma) > 0):
            raise WiringError(f"{name}: gamma must be > 0, got {gamma!r}", where=_where(name), fix="use gamma=0.4")
        if isinstance(order, bool) or int(order) != order or order < 0:
            raise WiringError(
                f"{name}: order must be an integer >= 0, got {order!r}", where=_where(name), fix="use order=2"
            )
    s, t = _flat_pair(name, student_embeddings, teacher_embeddings, min_batch=1)
    b = s.shape[0]
    c_s = _correlation_matrix(s, kernel, float(gamma), int(order))
    c_t = _correlation_matrix(t, kernel, float(gamma), int(order))
    return (c_s - c_t).pow(2).sum() / (b * b)
