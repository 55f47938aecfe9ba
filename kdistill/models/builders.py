"""Students made from the teacher: the teacher's built-in family, narrower (`width`) and/or shallower (`depth`).

``student.from_teacher: {width: 0.5, depth: 0.5}`` gives a student of the teacher's family with every width knob
times `width` and every depth knob times `depth` (both factors of the teacher's values; `width` in (0, 1],
`depth` > 0, so a deeper-and-thinner student is possible). Knobs the teacher does not set take the builder's
defaults (read from its signature). Per family:

* ``mlp``: ``hidden`` sizes x width; depth: the number of hidden layers x depth, the sizes resampled evenly
  along the teacher's list (first and last kept);
* ``cnn1d``: ``channels`` x width; ``depth`` (conv blocks) x depth;
* ``cnn2d``: each of ``channels`` x width; depth: the stages resampled like mlp's hidden sizes;
* ``resnet``: ``width`` x width; depth: blocks per stage n x depth, keeping ``depth = 6n + 2``.

Widths are rounded to multiples of 4 (at least 4) when the scaled value is 4 or more, else to an integer >= 1;
depths to integers >= 1. Since conv and hidden-to-hidden weights scale with width^2, width 0.5 leaves about a
quarter of those parameters.

For Hugging Face encoders, `hf_student_kwargs` gives the arguments of `kdistill.encoders.build_student`.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

from kdistill.errors import KDError

__all__ = ["FAMILIES", "hf_student_kwargs", "resolve_student", "resolved_student_config", "round_channels",
           "student_from_teacher"]

WHERE = "student.from_teacher"
FAMILIES = ("mlp", "cnn1d", "cnn2d", "resnet")


def round_channels(x: float, multiple: int = 4) -> int:
    """`x` rounded to a multiple of `multiple` (at least `multiple`) when ``x >= multiple``, else to an int >= 1."""
    if x >= multiple:
        return max(multiple, multiple * round(x / multiple))
    return max(1, round(x))


def _count(n: int, factor: float) -> int:
    """``round(n * factor)``, at least 1."""
    return max(1, round(n * factor))


def _resample(values: Sequence[Any], count: int) -> list[Any]:
    """`count` entries of `values` at evenly spaced positions, first and last included (repeats when longer)."""
    values = list(values)
    if count == 1 or len(values) == 1:
        return [values[-1]] * count if len(values) == 1 else [values[-1]]
    return [values[round(j * (len(values) - 1) / (count - 1))] for j in range(count)]


def _check_factors(width, depth, where: str) -> None:
    if width is None and depth is None:
        raise KDError("from_teacher needs width and/or depth", where=where,
                      fix="e.g. from_teacher: {width: 0.5} (half as wide) or {depth: 0.5} (half as deep)")
    if width is not None and (isinstance(width, bool) or not isinstance(width, (int, float))
                              or not 0.0 < float(width) <= 1.0):
        raise KDError(f"width must be in (0, 1], got {width!r}", where=f"{where}.width",
                      fix="the student's widths as a fraction of the teacher's, e.g. 0.5")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float)) or not float(depth) > 0):
        raise KDError(f"depth must be > 0, got {depth!r}", where=f"{where}.depth",
                      fix="the student's depth as a factor of the teacher's, e.g. 0.5")


def _defaults(name: str) -> dict[str, Any]:
    from kdistill.models import BUILTIN_MODELS

    params = inspect.signature(BUILTIN_MODELS[name]).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def student_from_teacher(teacher_name: str, teacher_kwargs: Optional[dict] = None, *, width: Optional[float] = None,
                         depth: Optional[float] = None, where: str = WHERE) -> tuple[str, dict]:
    """(name, kwargs) of a student of the teacher's built-in family scaled by `width` and `depth` (module doc).
    Teacher kwargs that are not width/depth knobs (dropout, kernel_size...) are kept."""
    _check_factors(width, depth, where)
    if teacher_name not in FAMILIES:
        raise KDError(f"cannot derive a student from teacher model '{teacher_name}': not a built-in family",
                      where=where, fix=f"give student.name and student.kwargs, or use a built-in teacher "
                                       f"({', '.join(FAMILIES)})")
    w = 1.0 if width is None else float(width)
    d = 1.0 if depth is None else float(depth)
    kwargs = {**_defaults(teacher_name), **dict(teacher_kwargs or {})}
    kwargs.pop("input_shape", None)
    kwargs.pop("num_classes", None)

    def scale(c):  # widths are left exactly as they are unless scaled
        return c if w == 1.0 else round_channels(c * w)

    if teacher_name in ("mlp", "cnn2d"):
        key = "hidden" if teacher_name == "mlp" else "channels"
        sizes = [scale(c) for c in kwargs[key]]
        if d != 1.0 and sizes:
            sizes = _resample(sizes, _count(len(sizes), d))
        kwargs[key] = sizes
    elif teacher_name == "cnn1d":
        kwargs["channels"] = scale(kwargs["channels"])
        kwargs["depth"] = _count(int(kwargs["depth"]), d)
    else:  # resnet
        n = (int(kwargs["depth"]) - 2) // 6
        kwargs["width"] = scale(kwargs["width"])
        kwargs["depth"] = 6 * _count(n, d) + 2
    return teacher_name, kwargs


def resolve_student(student_cfg, teacher_cfg) -> tuple[str, dict]:
    """(name, kwargs) of the configured student: as given, or derived from the teacher with ``from_teacher``
    (the student's own ``kwargs`` then override the derived ones; its ``name``, if given, must be the
    teacher's)."""
    spec = getattr(student_cfg, "from_teacher", None)
    if spec is None:
        return student_cfg.name, dict(student_cfg.kwargs)
    if teacher_cfg is None:
        raise KDError("student.from_teacher needs the run's teacher", where=WHERE,
                      fix="add a teacher section, or give student.name and student.kwargs")
    if student_cfg.name is not None and student_cfg.name != teacher_cfg.name:
        raise KDError(f"student.name '{student_cfg.name}' differs from the teacher's '{teacher_cfg.name}'",
                      where=WHERE, fix="remove student.name (from_teacher uses the teacher's family)")
    name, kwargs = student_from_teacher(teacher_cfg.name, teacher_cfg.kwargs, width=spec.width, depth=spec.depth)
    kwargs.update(student_cfg.kwargs)
    return name, kwargs


def resolved_student_config(student_cfg, teacher_cfg):
    """A copy of `student_cfg` with ``name`` and ``kwargs`` filled in by `resolve_student` (``from_teacher`` is
    kept for the record; resolving again gives the same result). Unchanged when there is no ``from_teacher``."""
    if getattr(student_cfg, "from_teacher", None) is None:
        return student_cfg
    name, kwargs = resolve_student(student_cfg, teacher_cfg)
    return student_cfg.model_copy(update={"name": name, "kwargs": kwargs})


def hf_student_kwargs(width: Optional[float], depth: Optional[float], teacher_config) -> dict:
    """Arguments of `kdistill.encoders.build_student` for a student `width` x as wide and `depth` x as deep as
    an HF encoder with config `teacher_config`.

    ``num_layers = max(1, round(depth * L))``; a narrower student keeps the teacher's head width
    ``head_dim = hidden / heads``: ``num_heads = max(1, round(width * heads))``, ``hidden_size = num_heads *
    head_dim``, ``intermediate_size = round(intermediate * hidden_size / hidden)`` (the FFN ratio kept).
    Only the changed arguments are returned (a same-width student copies the teacher's layers)."""
    _check_factors(width, depth, "hf_student_kwargs")
    out: dict[str, int] = {}
    if depth is not None:
        layers = int(teacher_config.num_hidden_layers)
        out["num_layers"] = _count(layers, float(depth))
    if width is not None:
        hidden, heads = int(teacher_config.hidden_size), int(teacher_config.num_attention_heads)
        inter = int(getattr(teacher_config, "intermediate_size", getattr(teacher_config, "hidden_dim", 4 * hidden)))
        head_dim = hidden // heads
        new_heads = _count(heads, float(width))
        new_hidden = new_heads * head_dim
        if new_hidden != hidden:
            out.update(hidden_size=new_hidden, num_heads=new_heads,
                       intermediate_size=max(1, round(inter * new_hidden / hidden)))
    return out
