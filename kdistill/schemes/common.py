"""What every scheme shares: the round objective contract, one round on the engine, building and evaluating.

A scheme is a plan of rounds. Each round hands a *round objective* to `Engine.fit`; the engine needs only:

* ``.side``: the trainable `nn.Module`, called as ``side(*args) -> (output, {term: weighted loss})`` (wrapped
  in DDP, optimized, checkpointed); it has a ``.student`` (what ``eval_fn`` sees), a ``.step`` and
  ``.run_student(inputs)`` (used by the wiring check to tell which side fails);
* ``.student``: the model the wiring check places and checks (``side.student``);
* ``.teacher``: a callable ``batch -> {"logits": ..., tap: ...}`` or None (moved with ``.to(device)`` if it can);
* ``.build(batch)`` (dry run: lazy modules, checks), ``.set_step(step)``, ``__call__(batch)`` ->
  `DistillOutput`, ``.export_student()``, and a writable ``.module`` (the engine puts the wrapped side there).

`kdistill.distiller.Distiller` is one such objective; `Objective` below is the base for schemes whose step
computes something else (mutual peers, exits, snapshots, task heads, gated terms).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from kdistill.config import RunConfig, TrainConfig
from kdistill.data import ArrayDataset, DataBundle, check_labels, load_data
from kdistill.distiller import Distiller, Term, split_taps, terms_from_config
from kdistill.objective import SchemeSide, SideObjective as Objective  # noqa: F401  (the schemes' base)
from kdistill.outputs import call_model, logits_of
from kdistill.teachers.live import freeze
from kdistill.engine import Engine
from kdistill.engine.checkpoint import atomic_write_bytes, load_weights, save_weights
from kdistill.evaluate import accuracy, agreement, cost_report, expected_calibration_error, predict_logits
from kdistill.models import build_model
from kdistill.models.loading import load_into, load_state_dict_file
from kdistill.schemes.offline import prepare_run_dir
from kdistill.seeding import seeded_build


def first_batch(data, batch_size: int) -> dict:
    return data.batch(torch.arange(min(len(data), batch_size)))


def fit_round(name: str, objective, data, train_cfg: TrainConfig, *, seed: int, run_dir: Optional[Path] = None,
              progress: bool = False, log: Callable[[str], None] = print) -> nn.Module:
    """One round = one `Engine.fit` of `objective` on `data`; returns the exported student.

    With a `run_dir` the round is resumable (checkpoints under ``checkpoints/<name>/``) and saves
    ``<name>.safetensors`` (the exported student) plus ``<name>.side.safetensors`` when the side holds more
    (exit heads, snapshots); a round whose weights file exists is done and is loaded instead of trained.
    """
    weights = Path(run_dir) / f"{name}.safetensors" if run_dir else None
    side_file = Path(run_dir) / f"{name}.side.safetensors" if run_dir else None
    if weights is not None and weights.is_file():
        if side_file.is_file():
            objective.build(first_batch(data, train_cfg.batch_size))
            objective.side.load_state_dict(load_weights(side_file))
        else:
            objective.export_student().load_state_dict(load_weights(weights))
        log(f"[{name}] done earlier: loaded {weights}")
        return objective.export_student()
    engine = Engine(train_cfg, run_dir, stage=name, seed=seed, progress=progress, log=log)
    result = engine.fit(objective, data)
    student = objective.export_student()
    if weights is not None and engine.accelerator.is_main_process:
        student_state = student.state_dict()
        side_state = objective.side.state_dict()
        if len(side_state) > len(student_state):
            save_weights(side_file, side_state, {"stage": name, "steps": result["steps"]})
        save_weights(weights, student_state, {"stage": name, "steps": result["steps"]})
    return student


def train_ce(name: str, model: nn.Module, data, train_cfg: TrainConfig, *, seed: int,
             run_dir: Optional[Path] = None, progress: bool = False, log=print) -> nn.Module:
    """A round on the labels alone (a teacher from scratch, a baseline, generation 0)."""
    return fit_round(name, Distiller(model, None, [Term("ce", "ce")]), data, train_cfg, seed=seed, run_dir=run_dir,
                     progress=progress, log=log)


def hinton_terms(alpha: float = 0.9, temperature: float = 4.0) -> list[Term]:
    """(1 - alpha) CE + alpha T^2 KL(teacher || student) at temperature T."""
    terms = []
    if alpha < 1:
        terms.append(Term("ce", "ce", 1 - alpha))
    if alpha > 0:
        terms.append(Term("kd", "kd", alpha, params={"temperature": temperature}))
    return terms


def distill(name: str, student: nn.Module, teacher, data, train_cfg: TrainConfig, *, seed: int,
            terms: Optional[list[Term]] = None, taps: Optional[Mapping[str, str]] = None,
            run_dir: Optional[Path] = None, progress: bool = False, log=print) -> nn.Module:
    """A round of offline KD: `student` learns from the frozen `teacher` (a model or a teacher callable)."""
    terms = list(terms) if terms is not None else hinton_terms()
    student_taps, teacher_taps = split_taps(terms, taps or {})
    objective = Distiller(student, teacher, terms, student_taps=student_taps, teacher_taps=teacher_taps)
    return fit_round(name, objective, data, train_cfg, seed=seed, run_dir=run_dir, progress=progress, log=log)


# -- configs -> data and models ------------------------------------------------------------------------------------
def prepare(cfg: RunConfig, run_dir: Optional[Path]) -> tuple[DataBundle, Optional[Path]]:
    """Write the resolved config into the run directory, load and check the data."""
    if run_dir is not None:
        run_dir = Path(run_dir)
        prepare_run_dir(cfg, run_dir)
    bundle = load_data(cfg.data)
    check_labels(bundle.train, bundle.num_classes)
    check_labels(bundle.test, bundle.num_classes)
    return bundle, run_dir


def model_from(model_cfg, bundle: DataBundle, seed: int, where: str, *, input_shape: Optional[Sequence[int]] = None,
               num_classes: Optional[int] = None) -> nn.Module:
    """Build a configured model with a fixed init seed (the caller's RNG state untouched)."""
    shape = tuple(input_shape) if input_shape is not None else bundle.input_shape
    classes = num_classes if num_classes is not None else bundle.num_classes
    return seeded_build(seed, lambda: build_model(model_cfg.name, model_cfg.kwargs, input_shape=shape,
                                                  num_classes=classes, where=where))


def teacher_from(teacher_cfg, bundle: DataBundle, train_cfg: TrainConfig, *, seed: int, stage: str,
                 where: str, run_dir: Optional[Path], progress: bool, log, data=None,
                 input_shape: Optional[Sequence[int]] = None, trust_checkpoint: bool = False) -> nn.Module:
    """A configured teacher: loaded from its weights, or trained on the labels (round `stage`); frozen.

    `trust_checkpoint` allows full unpickling of a .pt/.pth weights file (arbitrary code: trusted files only)."""
    model = model_from(teacher_cfg, bundle, seed + 101, where, input_shape=input_shape)
    if teacher_cfg.weights:
        state = load_state_dict_file(teacher_cfg.weights, where=f"{where}.weights", trust=trust_checkpoint)
        load_into(model, state, where=f"{where}.weights", source=teacher_cfg.weights)
    else:
        teacher_train = teacher_cfg.train or train_cfg
        if train_cfg.deterministic and not teacher_train.deterministic:  # deterministic covers the whole run
            teacher_train = teacher_train.model_copy(update={"deterministic": True})
        model = train_ce(stage, model, data if data is not None else bundle.train, teacher_train,
                         seed=seed + 1, run_dir=run_dir, progress=progress, log=log)
    return freeze(model)


def config_terms(cfg: RunConfig) -> tuple[list[Term], dict[str, str]]:
    return terms_from_config(cfg.distill.resolved_terms()), dict(cfg.distill.taps)


# -- evaluation and the summary ------------------------------------------------------------------------------------
def evaluate(model: nn.Module, test: ArrayDataset, eval_cfg, *, reference_logits: Optional[torch.Tensor] = None,
             cost: bool = True) -> dict:
    """Accuracy, ECE (and agreement with a reference model), plus cost (params, bytes, FLOPs, latency)."""
    logits = predict_logits(model, test)
    labels = test.tensors["y"]
    report = {"accuracy": accuracy(logits, labels),
              "ece": expected_calibration_error(logits, labels, eval_cfg.ece_bins)}
    if reference_logits is not None:
        report["agreement"] = agreement(logits, reference_logits)
    if cost:
        report.update(cost_report(model, test.tensors["x"][:1], latency_repeats=eval_cfg.latency_repeats,
                                  throughput_batch=eval_cfg.throughput_batch))
    return report


def top1_accuracy(model: nn.Module, test: ArrayDataset) -> float:
    return accuracy(predict_logits(model, test), test.tensors["y"])


def finish(summary: dict, run_dir: Optional[Path]) -> dict:
    if run_dir is not None:
        atomic_write_bytes(Path(run_dir) / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def summary_table(summary: dict) -> str:
    """A plain-text table of every evaluated model of a scheme's summary."""
    rows = [("model", "top-1 %", "agree %", "ECE", "params")]
    for label, m in summary.get("models", {}).items():
        agree = f"{100 * m['agreement']:.1f}" if "agreement" in m else "-"
        ece = f"{m['ece']:.3f}" if "ece" in m else "-"
        params = f"{m['params']:,}" if "params" in m else "-"
        rows.append((label, f"{100 * m['accuracy']:.1f}", agree, ece, params))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("-" * len(lines[0]))
    lines.append(f"(scheme: {summary.get('scheme', '?')}, dataset: {summary.get('dataset', '?')})")
    return "\n".join(lines)


# -- small shared modules ------------------------------------------------------------------------------------------
class ProbabilityEnsemble(nn.Module):
    """The mean of its members' probabilities, returned as log-probabilities (logits of the ensemble)."""

    def __init__(self, members: Sequence[nn.Module], weights: Optional[Sequence[float]] = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        w = torch.ones(len(members)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w / w.sum(), persistent=False)

    def forward(self, x):
        log_probs = torch.stack([torch.log_softmax(logits_of(call_model(m, x)).float(), -1) for m in self.members])
        w = self.weights.to(log_probs.device).view(-1, *([1] * (log_probs.dim() - 1)))
        return torch.logsumexp(log_probs + w.log(), dim=0)
