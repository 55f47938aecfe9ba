"""Cross-modal / paired-view distillation: teacher and student read different inputs of the same sample.

The data yields ``(teacher_input, student_input, label)`` as the batch keys ``teacher_x``, ``student_x`` (also
``x``, the student's own input, for evaluation) and ``y``; the distiller gives ``teacher_x`` to the teacher and
``student_x`` to the student, so any paired data works (e.g. a rich modality for the teacher, a cheap sensor
for the student). From one-view data, `paired_views` derives the two views with view specs:

* ``identity``            the input as it is;
* ``downsample:F``        average-pool the last axis (signals) or the last two axes (images) by factor F;
* ``noise:STD``           add Gaussian noise of standard deviation STD, fixed per sample (seeded);
* chains with ``+``, e.g. ``downsample:2+noise:0.5`` (applied left to right).

The teacher learns on its view, the student distils from it on the student view (and a baseline learns on the
student view alone).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

from kdistill.configbase import Strict
from kdistill.data import ArrayDataset
from kdistill.errors import ConfigError
from kdistill.evaluate import predict_logits
from kdistill.schemes.common import SchemeJob, scheme_run


class CrossModalScheme(Strict):
    """Teacher and student read different views of the same sample: 'identity', 'downsample:F',
    'noise:STD', or a chain like 'downsample:2+noise:0.5'."""

    name: Literal["cross_modal"]
    teacher_view: str = "identity"
    student_view: str = "downsample:2"


View = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _downsample(factor: int) -> View:
    def view(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if x.dim() == 2:   # (N, L) signals
            return F.avg_pool1d(x.unsqueeze(1), factor).squeeze(1)
        if x.dim() == 3:   # (N, C, L)
            return F.avg_pool1d(x, factor)
        if x.dim() == 4:   # (N, C, H, W)
            return F.avg_pool2d(x, factor)
        raise ConfigError(f"downsample works on (N, L), (N, C, L) or (N, C, H, W) inputs, got {tuple(x.shape)}",
                          where="scheme.*_view")
    return view


def _noise(std: float) -> View:
    def view(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return x + std * torch.randn(x.shape, generator=g, dtype=x.dtype)
    return view


def make_view(spec: str) -> View:
    """Parse a view spec (see the module docstring) into a function (inputs, generator) -> view."""
    steps: list[View] = []
    for part in spec.split("+"):
        kind, _, arg = part.strip().partition(":")
        try:
            if kind == "identity" and not arg:
                continue
            if kind == "downsample" and int(arg) >= 1:
                steps.append(_downsample(int(arg)))
            elif kind == "noise" and float(arg) >= 0:
                steps.append(_noise(float(arg)))
            else:
                raise ValueError
        except ValueError:
            raise ConfigError(f"bad view '{part.strip()}' in '{spec}'", where="scheme.teacher_view/student_view",
                              fix="use identity, downsample:F (integer F >= 1), noise:STD, joined with '+'") from None

    def view(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        for step in steps:
            x = step(x, g)
        return x.contiguous()
    return view


def paired_views(data: ArrayDataset, teacher_view: str, student_view: str, seed: int = 0) -> ArrayDataset:
    """``{teacher_x, student_x, x (= student_x), y}`` from a one-view dataset (noise seeded by `seed`)."""
    x = data.tensors["x"]
    t = make_view(teacher_view)(x, torch.Generator().manual_seed(seed))
    s = make_view(student_view)(x, torch.Generator().manual_seed(seed + 1))
    rows = {"teacher_x": t, "student_x": s, "x": s}
    if "y" in data.tensors:
        rows["y"] = data.tensors["y"]
    return ArrayDataset(rows, f"{data.name}-paired")


def single_view(paired: ArrayDataset, key: str) -> ArrayDataset:
    """One view of paired data as ordinary ``{x, y}`` data (to train or evaluate one side alone)."""
    rows = {"x": paired.tensors[key]}
    if "y" in paired.tensors:
        rows["y"] = paired.tensors["y"]
    return ArrayDataset(rows, f"{paired.name}-{key}")


@scheme_run
def run(job: SchemeJob) -> dict:
    cfg, s = job.cfg, job.cfg.scheme
    train = paired_views(job.bundle.distill_set(), s.teacher_view, s.student_view, seed=cfg.seed + 11)
    labelled = paired_views(job.bundle.train, s.teacher_view, s.student_view, seed=cfg.seed + 11)
    test = paired_views(job.bundle.test, s.teacher_view, s.student_view, seed=cfg.seed + 12)
    teacher_shape = tuple(train.tensors["teacher_x"].shape[1:])
    student_shape = tuple(train.tensors["student_x"].shape[1:])
    job.log(f"[cross_modal] teacher view {s.teacher_view!r} {teacher_shape}, student view {s.student_view!r} "
        f"{student_shape}")
    teacher = job.teacher(data=single_view(labelled, "teacher_x"), input_shape=teacher_shape)
    student = job.distill("student", job.student(input_shape=student_shape), teacher, train, seed=cfg.seed + 3)
    teacher_test = single_view(test, "teacher_x")
    student_test = single_view(test, "student_x")
    teacher_logits = predict_logits(teacher, teacher_test)
    models = {"teacher (teacher view)": job.evaluate(teacher, teacher_test)}
    if cfg.baseline:
        base = job.baseline(single_view(labelled, "student_x"), input_shape=student_shape)
        models["student, no teacher (student view)"] = job.evaluate(base, student_test,
                                                                    reference_logits=teacher_logits)
    models["student, KD (student view)"] = job.evaluate(student, student_test, reference_logits=teacher_logits)
    return job.finish(models, teacher_view=s.teacher_view, student_view=s.student_view,
                      teacher_input_shape=list(teacher_shape), student_input_shape=list(student_shape))
