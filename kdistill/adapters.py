"""Adapters: projections from a student feature to the teacher's shape, built lazily from observed shapes.

- maps (B, C, L) / (B, C, H, W): 1x1 convolution C_s -> C_t, then resize the spatial size to the teacher's;
- vectors (B, D): linear D_s -> D_t;  sequences (B, T, D): linear on the last dimension.
Adapters train with the student, are saved in checkpoints, and are dropped when the student is exported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.errors import WiringError


class Resize(nn.Module):
    def __init__(self, size: tuple[int, ...]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "linear" if x.dim() == 3 else "bilinear"
        return F.interpolate(x, size=self.size, mode=mode, align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def build_adapter(student_shape: torch.Size, teacher_shape: torch.Size, where: str = "term") -> nn.Module:
    """The projection that maps a student tensor of `student_shape` to `teacher_shape` (batch dim ignored)."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s == t:
        return nn.Identity()
    if len(s) != len(t):
        raise WiringError(f"cannot adapt a student feature of shape {s} to a teacher feature of shape {t}: "
                          f"different number of dimensions", where=where,
                          fix="tap layers of the same kind (both maps or both vectors), or flatten one side")
    if len(s) == 2:
        return nn.Linear(s[1], t[1])
    if len(s) in (3, 4) and s[2:] == t[2:] and len(s) == 3 and s[1] == t[1]:
        return nn.Identity()
    if len(s) == 3 and s[1] == t[1] and s[2] != t[2]:
        # ambiguous for (B, T, D) vs (B, C, L); treat the last dim as features (sequences)
        return nn.Linear(s[2], t[2])
    if len(s) in (3, 4):
        conv = nn.Conv1d if len(s) == 3 else nn.Conv2d
        layers: list[nn.Module] = []
        if s[1] != t[1]:
            layers.append(conv(s[1], t[1], kernel_size=1, bias=False))
        if s[2:] != t[2:]:
            layers.append(Resize(t[2:]))
        return nn.Sequential(*layers) if len(layers) > 1 else layers[0]
    raise WiringError(f"no adapter for student shape {s} -> teacher shape {t}", where=where,
                      fix="tap 2-D (B,D), 3-D (B,C,L)/(B,T,D) or 4-D (B,C,H,W) features")
