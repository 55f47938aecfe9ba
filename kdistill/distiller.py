"""The distiller: student + teacher + taps + adapters + named loss terms.

    distiller = Distiller(student, teacher, terms=[Term("ce", "ce", 0.1), Term("kd", "kd", 0.9, params=...)])
    distiller.build(first_batch)          # dry-run forward: taps resolved, adapters built, wiring checked
    out = distiller(batch)                # out.terms = {"ce": weighted loss, "kd": weighted loss}; out.loss

Batches are dicts: ``x`` (input tensor, or a dict of tensors passed as keyword arguments, as for Hugging Face
models), optional ``y`` (labels, -100 = unlabeled), ``index`` (sample ids), and optionally ``teacher_x`` /
``student_x`` when teacher and student read different views of the same sample.

The trainable part (student, adapters, stateful losses) is the `StudentSide` module: that is what the engine
wraps for DDP and what checkpoints hold. The teacher is not a submodule of it: it is frozen, in eval mode, runs
under `torch.inference_mode()` and is never wrapped in DDP.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from kdistill.adapters import build_adapter
from kdistill.errors import WiringError
from kdistill.losses import call_term, get_loss
from kdistill.losses.sparse import SparseDistribution, sparse_loss
from kdistill.objective import DistillOutput, Term
from kdistill.outputs import LOGITS, call_model, logits_of
from kdistill.taps import Taps
from kdistill.teachers.live import LiveTeacher

__all__ = ["Distiller", "DistillOutput", "LiveTeacher", "StudentSide", "Term", "needs_adapter", "split_taps",
           "terms_from_config"]


# Which terms get an adapter. Losses that compare student and teacher element by element need equal shapes:
# when the taps differ, a projection trained with the student maps the student's tensor to the teacher's shape
# (FitNets' regressor). Response losses need equal class counts (an error, never an adapter). Attention
# transfer compares channel-averaged maps (any channel counts; spatial sizes are interpolated), relation losses
# compare sample-to-sample relations (only the batch size must match) and CRD has its own embedding heads: none of
# them gets an adapter, since a projection would only add parameters the loss does not need.
def needs_adapter(loss: str, student_shape: torch.Size, teacher_shape: torch.Size) -> bool:
    """True when a term of `loss` pairs tensors whose shapes it cannot compare without a projection."""
    return get_loss(loss).same_shape and tuple(student_shape) != tuple(teacher_shape)


def _reads_teacher(term: Term) -> bool:
    return get_loss(term.loss, where=f"term '{term.name}'").needs_teacher


def split_taps(terms: list[Term], taps: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(student taps, teacher taps): each side gets the taps its terms read (one name space for both sides, so a
    config can tap ``features`` on the student and ``layer3`` on the teacher under different names)."""
    student = {t.student for t in terms if t.student != LOGITS}
    teacher = {t.teacher for t in terms if t.teacher != LOGITS and _reads_teacher(t)}
    return ({k: v for k, v in taps.items() if k in student}, {k: v for k, v in taps.items() if k in teacher})


def terms_from_config(term_cfgs) -> list[Term]:
    terms, seen = [], set()
    for i, t in enumerate(term_cfgs):
        name = t.name or t.loss
        if name in seen:
            raise WiringError(f"two loss terms are named '{name}'", where=f"distill.terms[{i}]",
                              fix="give each term a distinct 'name'")
        seen.add(name)
        terms.append(Term(name, t.loss, t.weight, t.student, t.teacher, dict(t.params), t.warmup_steps))
    return terms


class StudentSide(nn.Module):
    """Everything that trains: the student, lazily built adapters and stateful losses (e.g. CRD's queue).

    forward(student_inputs, teacher_values, labels, step) -> (student_output, {term: weighted loss}).
    """

    def __init__(self, student: nn.Module, terms: list[Term], student_taps: Mapping[str, str]):
        super().__init__()
        self.student = student
        self.adapters = nn.ModuleDict()
        self.loss_modules = nn.ModuleDict()
        self.terms = terms
        self.specs = [get_loss(t.loss, where=f"term '{t.name}'") for t in terms]  # resolved once, not per step
        self.student_tap_specs = dict(student_taps)
        self._taps = Taps(student, self.student_tap_specs) if self.student_tap_specs else None
        self.step = 0

    def run_student(self, inputs: Any) -> tuple[Any, dict[str, Any]]:
        if self._taps is None:
            out = call_model(self.student, inputs)
            values = {}
        else:
            with self._taps:
                out = call_model(self.student, inputs)
                values = self._taps.pop()
        return out, values

    def forward(self, inputs: Any, teacher_values: Mapping[str, Any], labels: Optional[torch.Tensor]):
        out, values = self.run_student(inputs)
        values[LOGITS] = logits_of(out)
        self.before_terms(values, teacher_values, labels)
        terms = {}
        for term, spec in zip(self.terms, self.specs):
            s = values[term.student]
            if term.name in self.adapters:
                s = self.adapters[term.name](s)
            value = self.value_of(term, spec, s, teacher_values.get(term.teacher), labels)
            terms[term.name] = value * term.weight_at(self.step)
        return out, terms

    def before_terms(self, values: Mapping[str, Any], teacher_values: Mapping[str, Any], labels) -> None:
        """A hook before the terms are evaluated (the selective scheme computes its gate here)."""

    def value_of(self, term: Term, spec, student: Any, teacher: Any, labels: Optional[torch.Tensor]):
        """The unweighted value of one term."""
        if spec.module is not None:
            return self.loss_modules[term.name](student.flatten(1), teacher.flatten(1))
        return call_term(spec, student, teacher, labels, term.params)


class Distiller:
    """Student + teacher(s) + named terms. See the module docstring."""

    def __init__(self, student: nn.Module, teacher: Optional[Callable[[Mapping], dict]] = None,
                 terms: Optional[list[Term]] = None, *, student_taps: Optional[Mapping[str, str]] = None,
                 teacher_taps: Optional[Mapping[str, str]] = None, adapters: bool = True):
        if terms is None:
            terms = [Term("ce", "ce", 1.0)] if teacher is None else [Term("kd", "kd", 1.0)]
        if not terms:
            raise WiringError("the objective has no loss terms", where="distill.terms", fix="add at least one term")
        if isinstance(teacher, nn.Module):
            teacher = LiveTeacher(teacher, teacher_taps)
        self.teacher = teacher
        needs_teacher = [t.name for t in terms if _reads_teacher(t)]
        if needs_teacher and teacher is None:
            raise WiringError(f"terms {needs_teacher} need a teacher but none is given",
                              fix="configure a teacher or use only 'ce'")
        taps = dict(student_taps or {})
        # a live teacher's taps are known here; any other teacher callable (a cache, an ensemble...) decides what
        # it returns, and build() reports a missing output by term
        known_teacher_taps = None
        if isinstance(self.teacher, LiveTeacher):
            known_teacher_taps = self.teacher.taps.specs if self.teacher.taps is not None else {}
        self._check_tap_names(terms, taps, known_teacher_taps)
        self.side = StudentSide(student, terms, taps)
        self.module: nn.Module = self.side  # the engine replaces this with the DDP-wrapped side
        self.allow_adapters = adapters
        self.built = False

    @staticmethod
    def _check_tap_names(terms, student_taps, teacher_taps):
        for term in terms:
            if term.student != LOGITS and term.student not in student_taps:
                raise WiringError(f"term '{term.name}' uses student tap '{term.student}' which is not defined",
                                  where="distill.terms", fix=f"define it under distill.taps; defined: "
                                                             f"{sorted(student_taps) or 'none'}")
            if teacher_taps is not None and _reads_teacher(term) and term.teacher != LOGITS and \
                    term.teacher not in teacher_taps:
                raise WiringError(f"term '{term.name}' uses teacher tap '{term.teacher}' which is not defined",
                                  where="distill.terms", fix=f"define it under distill.taps; defined: "
                                                             f"{sorted(teacher_taps) or 'none'}")

    @property
    def student(self) -> nn.Module:
        return self.side.student

    @property
    def terms(self) -> list[Term]:
        return self.side.terms

    def teacher_values(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return self.teacher(batch) if self.teacher is not None else {}

    def set_step(self, step: int) -> None:
        self.side.step = step

    @torch.no_grad()
    def build(self, batch: Mapping[str, Any]) -> None:
        """Dry-run one batch: resolve taps, check shapes, build adapters and stateful losses."""
        tv = self.teacher_values(batch)
        was_training = self.side.training
        self.side.eval()
        try:
            out, values = self.side.run_student(batch.get("student_x", batch["x"]))
        finally:
            self.side.train(was_training)
        values[LOGITS] = logits_of(out)
        labels = batch.get("y")
        for term, spec in zip(self.terms, self.side.specs):
            s = values[term.student]
            if spec.kind == "label":
                self._check_labels(term, s, labels)
                continue
            t = tv.get(term.teacher)
            if t is None:
                raise WiringError(f"teacher gave no '{term.teacher}' output", where=f"term '{term.name}'")
            if isinstance(t, SparseDistribution):  # top-k teacher: only losses with a k + 1 bucket version
                try:
                    sparse_loss(term.loss, s, t, term.params)
                except WiringError as err:
                    raise WiringError(f"term '{term.name}' ({term.loss}): {err.what}", where=err.where,
                                      fix=err.fix) from None
                continue
            if not (torch.is_tensor(s) and torch.is_tensor(t)):
                raise WiringError(f"term '{term.name}': taps must give tensors, got {type(s).__name__} and "
                                  f"{type(t).__name__}", fix="add a selector, e.g. 'layer:0'")
            if s.dtype.is_floating_point and t.dtype.is_floating_point is False:
                raise WiringError(f"term '{term.name}': teacher output has dtype {t.dtype}")
            if spec.module is not None:
                if term.name not in self.side.loss_modules:
                    cls = spec.module
                    try:
                        mod = cls(int(s[0].numel()), int(t[0].numel()), **term.params)
                    except TypeError as err:
                        if "keyword argument" not in str(err):
                            raise
                        raise WiringError(f"term '{term.name}' ({term.loss}): {err}", where="distill.terms",
                                          fix="check the term's params against docs/methods.md") from None
                    self.side.loss_modules[term.name] = mod.to(s.device)
                continue
            if spec.kind == "response" and s.shape != t.shape:
                raise WiringError(f"term '{term.name}': student output {tuple(s.shape)} and teacher output "
                                  f"{tuple(t.shape)} differ (class counts must match)",
                                  fix="give the student as many outputs as the teacher has classes")
            if spec.needs_labels:
                self._check_labels(term, s, labels)
            if needs_adapter(term.loss, s.shape, t.shape):
                if not self.allow_adapters:
                    raise WiringError(f"term '{term.name}': student {tuple(s.shape)} vs teacher {tuple(t.shape)}",
                                      fix="enable adapters or tap layers of equal shape")
                if term.name not in self.side.adapters:
                    adapter = build_adapter(s.shape, t.shape, where=f"term '{term.name}'")
                    self.side.adapters[term.name] = adapter.to(device=s.device, dtype=s.dtype)
            if term.name in self.side.adapters:
                s = self.side.adapters[term.name](s)
            self._dry_run_loss(spec, term, s, t, labels)
        self.built = True

    @staticmethod
    def _dry_run_loss(spec, term: Term, s: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        """Call the loss once on the first batch so a wiring problem stops the run before training, naming the
        term (stateful losses such as CRD are skipped: calling them would change their state)."""
        try:
            call_term(spec, s, t, labels, term.params)
        except WiringError as err:
            raise WiringError(f"term '{term.name}' ({term.loss}): {err.what}", where=err.where, fix=err.fix) \
                from None
        except TypeError as err:
            if "keyword argument" not in str(err):
                raise
            raise WiringError(f"term '{term.name}' ({term.loss}): {err}", where="distill.terms",
                              fix="check the term's params against docs/methods.md") from None

    @staticmethod
    def _check_labels(term: Term, logits: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        if labels is None:
            raise WiringError(f"term '{term.name}' ({term.loss}) needs labels 'y' but the batch has none",
                              fix="use labelled data or drop the term")
        valid = labels[labels != -100]
        n = logits.shape[-1]
        if len(valid) and (int(valid.min()) < 0 or int(valid.max()) >= n):
            raise WiringError(f"labels outside 0..{n - 1} for a student with {n} outputs "
                              f"(min {int(valid.min())}, max {int(valid.max())})", where=f"term '{term.name}'",
                              fix="check num_classes of the student and the labels")

    def __call__(self, batch: Mapping[str, Any]) -> DistillOutput:
        tv = self.teacher_values(batch)
        out, terms = self.module(batch.get("student_x", batch["x"]), tv, batch.get("y"))
        return DistillOutput(out, terms)

    def export_student(self) -> nn.Module:
        """The plain student: no hooks, no adapters."""
        return self.side.student
