"""Feature-based distillation losses: match intermediate representations.

Pure functions, argument order ``(student, teacher, ...)``. Computation in float32 at least (half inputs are
upcast); bad input raises :class:`kdistill.errors.WiringError`. The teacher is not detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import WiringError

__all__ = ["hint", "attention_transfer"]

_HINT_KINDS = ("mse", "l1", "cosine")


def _where(name: str) -> str:
    return f"kdistill.losses.{name}"


def _upcast(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_tensor(name: str, role: str, x: Tensor, min_ndim: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise WiringError(
            f"{name}: {role} must be a torch.Tensor, got {type(x).__name__}",
            where=_where(name),
            fix=f"pass a float tensor of shape {layout}",
        )
    if not x.is_floating_point():
        raise WiringError(
            f"{name}: {role} must be floating point, got dtype {x.dtype} with shape {tuple(x.shape)}",
            where=_where(name),
            fix=f"pass a float tensor of shape {layout}",
        )
    if x.ndim < min_ndim:
        raise WiringError(
            f"{name}: {role} must have shape {layout}, got shape {tuple(x.shape)}",
            where=_where(name),
            fix="add the missing batch/feature dimension",
        )


def _check_batch(name: str, student: Tensor, teacher: Tensor, min_batch: int = 1) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise WiringError(
            f"{name}: batch sizes differ, student shape {tuple(student.shape)} vs teacher shape "
            f"{tuple(teacher.shape)}",
            where=_where(name),
            fix="feed the same batch to student and teacher",
        )
    if student.shape[0] < min_batch:
        raise WiringError(
            f"{name}: needs a batch of at least {min_batch} samples, got shape {tuple(student.shape)}",
            where=_where(name),
            fix=f"use a batch size >= {min_batch} (relation losses compare samples with each other)",
        )


def hint(student_features: Tensor, teacher_features: Tensor, kind: str = "mse") -> Tensor:
    """Hint (FitNets) loss: regress the student's features onto the teacher's (Romero et al. 2015, "FitNets:
    Hints for Thin Deep Nets", ICLR 2015, arXiv:1412.6550, Eq. 3)::

        mse:    L = mean_{all elements} (f_s - f_t)^2
        l1:     L = mean_{all elements} |f_s - f_t|
        cosine: L = 1/B sum_b (1 - cos(flatten(f_s[b]), flatten(f_t[b])))

    FitNets uses the squared error after a learned *regressor* that maps the student's hint layer to the
    teacher's shape; this function does not contain one -- shapes must already match exactly (put an adapter,
    e.g. a 1x1 conv or a linear layer, on the student side).

    Args:
        student_features: student features, shape ``(B, *)``.
        teacher_features: teacher features, identical shape.
        kind: ``"mse"`` | ``"l1"`` | ``"cosine"``.

    Returns:
        scalar.
    """
    name = "hint"
    _check_tensor(name, "student_features", student_features, 1, "(B, *)")
    _check_tensor(name, "teacher_features", teacher_features, 1, "(B, *)")
    if kind not in _HINT_KINDS:
        raise WiringError(
            f"{name}: unknown kind {kind!r}",
            where=_where(name),
            fix=f"use one of {', '.join(repr(k) for k in _HINT_KINDS)}",
        )
    if student_features.shape != teacher_features.shape:
        raise WiringError(
            f"{name}: student features shape {tuple(student_features.shape)} != teacher features shape "
            f"{tuple(teacher_features.shape)}",
            where=_where(name),
            fix="an adapter is needed: project the student features to the teacher's shape (e.g. a 1x1 conv or "
            "nn.Linear regressor, as in FitNets) before calling hint()",
        )
    s, t = _upcast(student_features), _upcast(teacher_features)
    if kind == "mse":
        return (s - t).pow(2).mean()
    if kind == "l1":
        return (s - t).abs().mean()
    if s.ndim < 2:
        raise WiringError(
            f"{name}: kind='cosine' needs per-sample features of shape (B, *), got shape {tuple(s.shape)}",
            where=_where(name),
            fix="add a feature dimension, e.g. x.unsqueeze(-1), or use kind='mse'",
        )
    cos = F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1, eps=1e-8)
    return (1.0 - cos).mean()


def _attention_map(x: Tensor, p: float) -> Tensor:
    """mean over channels of |x|^p: (B, C, *spatial) -> (B, *spatial)."""
    return _upcast(x).abs().pow(p).mean(dim=1)


def attention_transfer(student_features: Tensor, teacher_features: Tensor, p: float = 2.0) -> Tensor:
    """Activation-based attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention",
    ICLR 2017, arXiv:1612.03928, Eqs. 1-2)::

        A(x)  = mean_c |x_c|^p                       (spatial attention map, channels averaged)
        a(x)  = vec(A(x)) / ||vec(A(x))||_2
        L_AT  = mean_{b, positions} (a(f_s) - a(f_t))^2

    The paper writes the distance as ``|| a_s - a_t ||_p`` summed over layers; this follows the authors' code,
    which uses the mean squared difference of the normalized maps (``p = 2``). Averaging over channels
    instead of summing is scale-free after the L2 normalization.

    Channel counts may differ between student and teacher. If the spatial sizes differ, the smaller
    attention map is resized to the larger one (``F.interpolate``: bilinear for 2-D maps, linear for 1-D,
    ``align_corners=False``) before normalization; if neither is larger in every dim, both are resized to
    the per-dim maximum.

    Args:
        student_features: shape ``(B, C_s, L)`` or ``(B, C_s, H, W)``.
        teacher_features: shape ``(B, C_t, L')`` or ``(B, C_t, H', W')`` (same number of spatial dims).
        p: exponent of the activation magnitude, ``p > 0`` (paper: 2).

    Returns:
        scalar.
    """
    name = "attention_transfer"
    layout = "(B, C, L) or (B, C, H, W)"
    _check_tensor(name, "student_features", student_features, 3, layout)
    _check_tensor(name, "teacher_features", teacher_features, 3, layout)
    for role, x in (("student_features", student_features), ("teacher_features", teacher_features)):
        if x.ndim > 4:
            raise WiringError(
                f"{name}: {role} must have shape {layout}, got shape {tuple(x.shape)}",
                where=_where(name),
                fix="attention transfer supports 1-D or 2-D spatial maps; reshape 3-D volumes first",
            )
    if student_features.ndim != teacher_features.ndim:
        raise WiringError(
            f"{name}: student features shape {tuple(student_features.shape)} and teacher features shape "
            f"{tuple(teacher_features.shape)} have different numbers of spatial dims",
            where=_where(name),
            fix="tap layers with the same layout (both (B, C, H, W) or both (B, C, L))",
        )
    _check_batch(name, student_features, teacher_features)
    if not (float(p) > 0):
        raise WiringError(f"{name}: p must be > 0, got {p!r}", where=_where(name), fix="use p=2 (the paper's value)")
    a_s = _attention_map(student_features, p)
    a_t = _attention_map(teacher_features, p)
    size_s, size_t = tuple(a_s.shape[1:]), tuple(a_t.shape[1:])
    if size_s != size_t:
        target = tuple(max(i, j) for i, j in zip(size_s, size_t))
        mode = "bilinear" if len(target) == 2 else "linear"
        if size_s != target:
            a_s = F.interpolate(a_s.unsqueeze(1), size=target, mode=mode, align_corners=False).squeeze(1)
        if size_t != target:
            a_t = F.interpolate(a_t.unsqueeze(1), size=target, mode=mode, align_corners=False).squeeze(1)
    a_s = F.normalize(a_s.flatten(1), p=2.0, dim=1)
    a_t = F.normalize(a_t.flatten(1), p=2.0, dim=1)
    return (a_s - a_t).pow(2).mean()
