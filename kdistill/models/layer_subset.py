"""Cutting a student from a teacher's layers: the teacher's state dict with a subset of its layers renumbered."""

from __future__ import annotations

import re
from typing import Mapping

import torch


def renumbered_layers(state: Mapping[str, torch.Tensor], teacher_prefix: str, student_prefix: str,
                      new_index: Mapping[int, int]) -> dict[str, torch.Tensor]:
    """Entries of `state` outside ``<teacher_prefix>.<i>.`` as they are; layer ``i`` in `new_index` as
    ``<student_prefix>.<new_index[i]>.``; layers not in `new_index` dropped."""
    pattern = re.compile(rf"^{re.escape(teacher_prefix)}\.(\d+)\.(.+)$")
    out = {}
    for key, value in state.items():
        match = pattern.match(key)
        if match is None:
            out[key] = value
        elif int(match.group(1)) in new_index:
            out[f"{student_prefix}.{new_index[int(match.group(1))]}.{match.group(2)}"] = value
    return out
