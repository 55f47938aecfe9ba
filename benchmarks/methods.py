"""Distillation methods side by side, in the style of the CRD (Tian et al. 2020) and DKD (Zhao et al. 2022) tables.

One teacher, trained once and reused; one student architecture with >= 10x fewer parameters; one row per method:
scratch, KD, DKD, DIST, FitNet, AT, SP, RKD, PKT, CC, CRD, KD+CRD. Every row trains the same student with the
same init seed, data order, steps, batch size, optimizer, learning rate and schedule, through kdistill's own
`Distiller` and `Engine`; only the loss terms differ. Each method's hyper-parameters are the published defaults
(`build_methods` below, taken from the CRD code base RepDistiller for the CRD-table rows and from the DKD/DIST
papers), never tuned per method. The temperature-based rows (KD, DKD, DIST, KD+CRD) come in the two published
settings, ``--preset cifar100`` (T = 4) and ``--preset imagenet`` (T = 1); each dataset names its default.
Feature methods all read the same layer pair, the last convolutional stage of each network:
map methods (FitNet, AT, SP) its output maps (equal spatial size, different channel counts, so FitNet gets a
1x1-conv adapter), embedding methods (RKD, PKT, CC, CRD) the penultimate features, i.e. the same maps after the
network's own global pooling, as in those papers and in the CRD code.

Measured per row: top-1 on the test set (mean and sample std over the seeds), milliseconds per training step
(median over the seeds of each run's mean step time; the step is the engine's full step: batch gather, teacher
lookup, student forward with taps, loss terms, backward, optimizer), and the paired difference to KD (same seed,
same init, same data order). Step time is the process CPU time of `Engine.fit` (one torch thread, so on an idle
machine it equals wall time; on a shared machine it is far less noisy); the wall-clock figure is kept as
`wall_ms_per_step`.

The teacher is trained once as the run directory's ``teacher`` stage (`kdistill.tasks.job.run_stage`: reused from
``teacher.safetensors`` on the next run). It is frozen and the data has no augmentation, so its outputs for a
training row never change: they are stored once (float32) in kdistill's teacher-output cache
(`kdistill.teachers.build_cache`, ``RUN_DIR/teacher-cache/<outputs>``: one cache per set of outputs the rows read,
so a step reads only what its terms use) and read back by row index (`CachedTeacher`, a teacher callable like
`LiveTeacher`). The step times therefore exclude the teacher forward (it is the same for every method); the table
reports it separately (`teacher_ms_per_batch`).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/methods.py --dataset fashion_mnist --json benchmarks/results/methods_fashion_mnist.json
    OMP_NUM_THREADS=1 python benchmarks/methods.py --dataset mnist1d --json /tmp/methods_mnist1d.json
    OMP_NUM_THREADS=1 python benchmarks/methods.py --dataset fashion_mnist --quick --json /tmp/quick.json  # CI
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdistill.config import DataConfig, TrainConfig  # noqa: E402
from kdistill.data import ArrayDataset, load_data  # noqa: E402
from kdistill.distiller import Distiller, LiveTeacher, Term  # noqa: E402
from kdistill.engine import Engine  # noqa: E402
from kdistill.errors import NonFiniteError  # noqa: E402
from kdistill.evaluate import accuracy, predict_logits  # noqa: E402
from kdistill.losses import get_loss  # noqa: E402
from kdistill.models import build_model  # noqa: E402
from kdistill.outputs import LOGITS  # noqa: E402
from kdistill.provenance import git_revision  # noqa: E402
from kdistill.seeding import seeded_build  # noqa: E402
from kdistill.tasks.job import run_stage  # noqa: E402
from kdistill.teachers import CacheSpec, build_cache  # noqa: E402

FEAT = "feat"  # tap name of the last stage's output maps, on both sides
EMB = "emb"    # tap name of the penultimate features (those maps after the network's own pooling)


@dataclass
class Setup:
    """One dataset's teacher / student pair and training budget."""

    teacher: tuple[str, dict]
    student: tuple[str, dict]
    teacher_taps: dict[str, str]
    student_taps: dict[str, str]
    teacher_train: TrainConfig
    train: TrainConfig
    seeds: tuple[int, ...] = (0, 1, 2)
    preset: str = "cifar100"  # which published setting the temperature-based rows use (`build_methods`)
    heldout: int = 5000       # training rows held out (never trained on) for the held-out curves


SETUPS: dict[str, Setup] = {
    "fashion_mnist": Setup(
        teacher=("cnn2d", {"channels": [32, 64, 128]}),
        student=("cnn2d", {"channels": [8, 16, 16]}),
        teacher_taps={FEAT: "features", EMB: "pool"},    # (B, 128, 7, 7), (B, 128, 1, 1)
        student_taps={FEAT: "features", EMB: "pool"},    # (B, 16, 7, 7), (B, 16, 1, 1)
        teacher_train=TrainConfig(steps=3000, batch_size=128, lr=3e-3, schedule="onecycle", log_every=100,
                                  checkpoint_every=1000),
        # 5000 steps = 11.6 epochs; peak lr 1e-2 for every row, chosen on the scratch row alone (held-out top-1 at
        # 2500 steps: 88.3 % with 1e-2, 86.2 % with 3e-3; docs/methods.md)
        train=TrainConfig(steps=5000, batch_size=128, lr=1e-2, schedule="onecycle", log_every=100),
        # 10 classes: at T = 4 this teacher's targets are nearly flat, so the temperature rows use the papers'
        # T = 1 (ImageNet) settings; see docs/methods.md
        preset="imagenet",
    ),
    "mnist1d": Setup(
        teacher=("cnn1d", {"channels": 64, "depth": 4}),
        student=("cnn1d", {"channels": 16, "depth": 4}),
        teacher_taps={FEAT: "features", EMB: "flatten"},   # (B, 64, 5), (B, 320)
        student_taps={FEAT: "features", EMB: "flatten"},   # (B, 16, 5), (B, 80)
        teacher_train=TrainConfig(steps=3000, batch_size=128, lr=3e-3, schedule="onecycle", log_every=100),
        train=TrainConfig(steps=1500, batch_size=128, lr=3e-3, schedule="onecycle", log_every=100),
        heldout=500,
    ),
}


def _ce(weight: float = 1.0) -> Term:
    return Term("ce", "ce", weight)


def _feature(name: str, loss: str, weight: float, **params) -> Term:
    return Term(name, loss, weight, student=FEAT, teacher=FEAT, params=params)


def _embedding(name: str, loss: str, weight: float, **params) -> Term:
    return Term(name, loss, weight, student=EMB, teacher=EMB, params=params)


CRD_PARAMS = {"embed_dim": 128, "temperature": 0.07, "momentum": 0.5, "queue_size": 16384}


@dataclass
class Method:
    name: str
    terms: Callable[[int], list[Term]]  # total steps -> the objective
    setting: str                        # the hyper-parameters, as printed in the docs
    source: str


@dataclass(frozen=True)
class ResponseSetting:
    """One published setting of the temperature-based rows (KD, DKD, DIST; KD+CRD uses the KD temperature)."""

    temperature: float
    kd_ce_weight: float      # KD row: kd_ce_weight * CE + (1 - kd_ce_weight) * KD
    kd_source: str
    dkd_beta: float          # DKD: CE + DKD(alpha = 1, beta), its weight warmed up over a fraction of training
    dkd_warmup: tuple[int, int]  # (warm-up epochs, epochs) of the published schedule
    dist_weight: float       # DIST: CE + DIST(beta = gamma = dist_weight)
    dataset: str             # the published benchmark these values come from


RESPONSE_SETTINGS = {
    "cifar100": ResponseSetting(4.0, 0.1, "CRD code (-r 0.1 -a 0.9)", 8.0, (20, 240), 2.0, "CIFAR-100"),
    "imagenet": ResponseSetting(1.0, 0.5, "DKD code, ImageNet KD baseline", 0.5, (1, 100), 1.0, "ImageNet"),
}
PRESETS = tuple(RESPONSE_SETTINGS)


def _response_methods(preset: str) -> list[Method]:
    """The KD, DKD and DIST rows in one of the papers' published settings (`RESPONSE_SETTINGS`)."""
    if preset not in RESPONSE_SETTINGS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    r = RESPONSE_SETTINGS[preset]
    T, warm, of = r.temperature, *r.dkd_warmup
    return [
        Method("KD", lambda n: [_ce(r.kd_ce_weight), Term("kd", "kd", 1 - r.kd_ce_weight, params={"temperature": T})],
               f"{r.kd_ce_weight:g} CE + {1 - r.kd_ce_weight:g} KD, T={T:g}", f"Hinton et al. 2015; {r.kd_source}"),
        Method("DKD", lambda n: [_ce(), Term("dkd", "dkd", 1.0, params={"alpha": 1.0, "beta": r.dkd_beta,
                                                                        "temperature": T},
                                              warmup_steps=max(1, round(n * warm / of)))],
               f"CE + DKD(alpha=1, beta={r.dkd_beta:g}, T={T:g}), weight warm-up over the first {warm} of {of} "
               "epochs' share of training", f"Zhao et al. 2022, {r.dataset} setting"),
        Method("DIST", lambda n: [_ce(), Term("dist", "dist", 1.0, params={"beta": r.dist_weight,
                                                                            "gamma": r.dist_weight,
                                                                            "temperature": T})],
               f"CE + DIST(beta={r.dist_weight:g}, gamma={r.dist_weight:g}, T={T:g})",
               f"Huang et al. 2022, {r.dataset} setting"),
    ]


def build_methods(preset: str = "cifar100") -> list[Method]:
    """Every row of the table; only the temperature-based rows depend on ``preset`` (see `_response_methods`)."""
    rows = _response_methods(preset)
    kd_temperature = RESPONSE_SETTINGS[preset].temperature
    return [Method("scratch", lambda n: [_ce()], "CE", "-"), *rows,
            Method("FitNet", lambda n: [_ce(), _feature("hint", "hint", 100.0)],
                   "CE + 100 * hint (MSE after a 1x1-conv adapter)", "Romero et al. 2015; CRD code (-b 100)"),
            Method("AT", lambda n: [_ce(), _feature("at", "attention_transfer", 1000.0, p=2.0)],
                   "CE + 1000 * AT(p=2)", "Zagoruyko & Komodakis 2017; CRD code (-b 1000)"),
            Method("SP", lambda n: [_ce(), _feature("sp", "similarity_preserving", 3000.0)],
                   "CE + 3000 * SP", "Tung & Mori 2019; CRD code (-b 3000)"),
            Method("RKD", lambda n: [_ce(), _embedding("rkd_distance", "rkd_distance", 25.0),
                                     _embedding("rkd_angle", "rkd_angle", 50.0)],
                   "CE + 25 * RKD-D + 50 * RKD-A", "Park et al. 2019; CRD code (-b 1, w_d=25, w_a=50)"),
            Method("PKT", lambda n: [_ce(), _embedding("pkt", "pkt", 30000.0)],
                   "CE + 30000 * PKT", "Passalis & Tefas 2018; CRD code (-b 30000)"),
            Method("CC", lambda n: [_ce(), _embedding("cc", "correlation_congruence", 0.02, kernel="gaussian",
                                                      gamma=0.4, order=2)],
                   "CE + 0.02 * CC(gaussian, gamma=0.4, order 2)",
                   "Peng et al. 2019; weight from the CRD code (-b 0.02)"),
            Method("CRD", lambda n: [_ce(), _embedding("crd", "crd", 0.8, **CRD_PARAMS)],
                   "CE + 0.8 * CRD(embed 128, tau=0.07, momentum 0.5, 16384 negatives)", "Tian et al. 2020 (-b 0.8)"),
            Method("KD+CRD", lambda n: [_ce(), Term("kd", "kd", 1.0, params={"temperature": kd_temperature}),
                                        _embedding("crd", "crd", 0.8, **CRD_PARAMS)],
                   f"CE + KD(T={kd_temperature:g}) + 0.8 * CRD", "Tian et al. 2020 (-r 1 -a 1 -b 0.8)")]



def describe_methods(steps: int = 1200) -> dict:
    """Every preset's rows as plain data (each method's setting and its terms for a run of `steps`), and each
    dataset's default preset: what ``--describe-methods`` prints."""
    return {"presets": {p: {m.name: {"setting": m.setting, "terms": [dataclasses.asdict(t) for t in m.terms(steps)]}
                            for m in build_methods(p)} for p in PRESETS},
            "default_preset": {name: setup.preset for name, setup in SETUPS.items()}}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _shrink(data: ArrayDataset, n: int) -> ArrayDataset:
    return ArrayDataset({k: v[:n] for k, v in data.tensors.items()}, data.name)


def teacher_outputs(terms: list[Term]) -> tuple[str, ...]:
    """The teacher outputs a method's terms read (empty: no teacher)."""
    return tuple(sorted({t.teacher for t in terms if get_loss(t.loss).needs_teacher}))


def _rows(data: ArrayDataset, idx: torch.Tensor, name: str) -> ArrayDataset:
    return ArrayDataset({k: v[idx] for k, v in data.tensors.items() if k != "index"}, name)


def split(bundle, heldout: int, labels: Optional[int]) -> dict:
    """Hold out `heldout` training rows (a fixed permutation, seed 0; never trained on: the held-out curves) and,
    with `labels`, keep the labels of only that many of the remaining rows (the next ones of the permutation) and
    mark the rest unlabeled (-100): the transfer set the teacher labels. Returns {"train", "heldout", "labelled"}."""
    order = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(0))
    heldout_rows, train_rows = order[:heldout], order[heldout:].sort().values
    train = _rows(bundle.train, train_rows, "train")
    labelled = train
    if labels is not None:
        keep = order[heldout:heldout + labels].sort().values
        y = torch.full_like(bundle.train.tensors["y"], -100)
        y[keep] = bundle.train.tensors["y"][keep]
        train = ArrayDataset({"x": train.tensors["x"], "y": y[train_rows]}, "train")
        labelled = _rows(bundle.train, keep, "labelled")
    return {"train": train, "heldout": _rows(bundle.train, heldout_rows, "heldout"), "labelled": labelled}


def prepare(dataset: str, setup: Setup, run_dir: Path, *, quick: bool, output_sets: list[tuple[str, ...]],
            labels: Optional[int] = None, log=print) -> dict:
    """Data (`split`: held-out rows, and with `labels` the few-labels training set), the trained teacher (stage
    ``teacher``: trained once on every labelled training row, reused from ``run_dir/teacher.safetensors``) and one
    cache of its outputs on the training rows per set of outputs the methods read
    (``run_dir/teacher-cache/<outputs>``, rebuilt only if they change), so a step reads only what its terms use."""
    bundle = load_data(DataConfig(name=dataset))
    if quick:
        bundle.train = _shrink(bundle.train, 320)
        bundle.test = _shrink(bundle.test, 256)
    parts = split(bundle, 64 if quick else setup.heldout, None if labels is None else (32 if quick else labels))
    teacher_rows = split(bundle, 64 if quick else setup.heldout, None)["train"]
    bundle.train = parts["train"]
    shape, classes = bundle.input_shape, bundle.num_classes
    teacher = seeded_build(101, lambda: build_model(setup.teacher[0], setup.teacher[1], input_shape=shape,
                                                    num_classes=classes))
    t0 = time.perf_counter()
    teacher, trained = run_stage("teacher", Distiller(teacher, None, [Term("ce", "ce")]), teacher_rows,
                                 setup.teacher_train, seed=1, run_dir=run_dir, progress=False, log=log)
    if trained is not None:
        log(f"teacher: trained in {time.perf_counter() - t0:.0f} s -> {run_dir / 'teacher.safetensors'}")
    teacher.eval()
    teacher_top1 = accuracy(predict_logits(teacher, bundle.test), bundle.test.tensors["y"])
    live = LiveTeacher(teacher, setup.teacher_taps)
    t0 = time.perf_counter()
    caches = {outputs: build_cache(live, bundle.train, run_dir / "teacher-cache" / "+".join(outputs),
                                   CacheSpec(dtype="float32", batch_size=1024), outputs=outputs, log=log)
              for outputs in sorted({*output_sets, (LOGITS,)})}
    tap_shapes = {k: list(v.shape[1:]) for k, v in live(bundle.train.batch(torch.arange(1))).items()}
    log(f"teacher: top-1 {teacher_top1:.4f}; outputs of {len(bundle.train)} training rows cached in "
        f"{time.perf_counter() - t0:.0f} s ({', '.join(f'{k} {tuple(v)}' for k, v in tap_shapes.items())})")
    # the live teacher's cost per training batch, for reference (median of a few calls)
    batch = bundle.train.batch(torch.arange(min(len(bundle.train), setup.train.batch_size)))
    cpu_ms, wall_ms = [], []
    for _ in range(2 if quick else 7):
        c0, t0 = time.process_time(), time.perf_counter()
        live(batch)
        cpu_ms.append((time.process_time() - c0) * 1000)
        wall_ms.append((time.perf_counter() - t0) * 1000)
    # how much class information the soft targets carry at each published temperature (training rows)
    train_logits = caches[(LOGITS,)]({"index": torch.arange(len(bundle.train))})[LOGITS]
    softness = {f"T={t:g}": float(torch.softmax(train_logits / t, 1).max(1).values.mean()) for t in (1.0, 2.0, 4.0)}
    log(f"teacher: mean top probability on the training rows {softness}")
    return {"bundle": bundle, "heldout": parts["heldout"], "labelled": parts["labelled"], "labels": labels,
            "teacher": teacher, "teacher_top1": teacher_top1, "caches": caches,
            "tap_shapes": tap_shapes, "teacher_mean_top_probability": softness,
            "teacher_ms_per_batch": statistics.median(cpu_ms[1:] if len(cpu_ms) > 2 else cpu_ms),
            "teacher_wall_ms_per_batch": statistics.median(wall_ms[1:] if len(wall_ms) > 2 else wall_ms)}


def train_student(setup: Setup, method: Method, seed: int, ctx: dict, train_cfg: TrainConfig,
                  curve_points: int = 10) -> dict:
    """Train one student with one method and seed through Distiller + Engine: test top-1, held-out top-1 at
    `curve_points` evenly spaced steps (the held-out curve) and at the end, and the step time (process CPU time of
    the training steps, the held-out evaluations excluded). A method without teacher terms (scratch) trains on the
    labelled rows only: in the few-labels table the unlabeled rows carry nothing for it."""
    bundle = ctx["bundle"]
    terms = method.terms(train_cfg.steps)
    student = seeded_build(1000 + seed, lambda: build_model(setup.student[0], setup.student[1],
                                                             input_shape=bundle.input_shape,
                                                             num_classes=bundle.num_classes))
    outputs = teacher_outputs(terms)
    teacher = ctx["caches"][outputs] if outputs else None
    rows = bundle.train if outputs else ctx["labelled"]
    student_taps = {k: v for k, v in setup.student_taps.items() if any(t.student == k for t in terms)}
    distiller = Distiller(student, teacher, terms, student_taps=student_taps)
    every = max(1, train_cfg.steps // curve_points)
    cfg = train_cfg.model_copy(update={"eval_every": every})
    eval_cpu = [0.0]

    def heldout_top1(model) -> dict:
        c0 = time.process_time()
        top1 = accuracy(predict_logits(model, ctx["heldout"]), ctx["heldout"].tensors["y"])
        eval_cpu[0] += time.process_time() - c0
        return {"heldout_top1": top1}

    engine = Engine(cfg, None, stage=f"{method.name}-seed{seed}", seed=seed, progress=False, log=lambda msg: None)
    cpu0 = time.process_time()
    try:
        result = engine.fit(distiller, rows, eval_fn=heldout_top1)
    except NonFiniteError as err:
        return {"top1": None, "ms_per_step": None, "error": str(err)}
    cpu = time.process_time() - cpu0 - eval_cpu[0]
    model = distiller.export_student()
    top1 = accuracy(predict_logits(model, bundle.test), bundle.test.tensors["y"])
    final_heldout = accuracy(predict_logits(model, ctx["heldout"]), ctx["heldout"].tensors["y"])
    curve = [[e["step"], e["eval"]["heldout_top1"]] for e in result["evals"] if e["step"] < train_cfg.steps]
    curve.append([train_cfg.steps, final_heldout])
    extra = n_params(distiller.side) - n_params(model)
    return {"top1": top1, "heldout_top1": final_heldout, "heldout_curve": curve,
            "ms_per_step": cpu * 1000 / train_cfg.steps, "trained_rows": len(rows),
            "wall_ms_per_step": result["seconds"] * 1000 / train_cfg.steps, "terms": result["terms"],
            "train_only_params": extra}


def interval(values: list[float]) -> list[float]:
    """The 95 % t-interval of the mean of `values` (NaNs for fewer than 2)."""
    from scipy import stats

    if len(values) < 2:
        return [math.nan, math.nan]
    mean, sem = statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sem
    return [mean - half, mean + half]


CONVERGED_POINTS = 0.5  # the rule: doubling the budget gains the scratch student < 0.5 held-out points


def convergence(setup: Setup, ctx: dict, train_cfg: TrainConfig, scratch_runs: list[dict], log=print) -> dict:
    """Whether the scratch student has converged at the chosen budget: seed 0 trained again with twice the steps
    (same init, data order and schedule shape); converged when the held-out top-1 gains less than
    `CONVERGED_POINTS` points. Both held-out curves are returned."""
    scratch = next(m for m in build_methods(setup.preset) if m.name == "scratch")
    double = train_student(setup, scratch, 0, ctx, train_cfg.model_copy(update={"steps": 2 * train_cfg.steps}))
    gain = 100 * (double["heldout_top1"] - scratch_runs[0]["heldout_top1"])
    log(f"convergence: scratch held-out {100 * scratch_runs[0]['heldout_top1']:.2f} at {train_cfg.steps} steps, "
        f"{100 * double['heldout_top1']:.2f} at {2 * train_cfg.steps} ({gain:+.2f} points)")
    return {"rule": f"seed 0's scratch student trained with twice the steps gains < {CONVERGED_POINTS} held-out "
                    "top-1 points", "steps": train_cfg.steps, "heldout_top1": scratch_runs[0]["heldout_top1"],
            "double_steps": 2 * train_cfg.steps, "double_heldout_top1": double["heldout_top1"],
            "double_test_top1": double["top1"], "gain_points": gain, "converged": gain < CONVERGED_POINTS,
            "curve": scratch_runs[0]["heldout_curve"], "double_curve": double["heldout_curve"]}


def run_benchmark(dataset: str, *, quick: bool = False, run_dir: Optional[Path] = None,
                  methods: Optional[list[str]] = None, seeds: Optional[tuple[int, ...]] = None,
                  steps: Optional[int] = None, student_kwargs: Optional[dict] = None, preset: Optional[str] = None,
                  labels: Optional[int] = None, lr: Optional[float] = None, check_convergence: bool = True, partial: Optional[Path] = None,
                  log=print) -> dict:
    setup = SETUPS[dataset]
    if preset is not None:  # the other published setting of the temperature-based rows
        setup = dataclasses.replace(setup, preset=preset)
    if student_kwargs is not None:  # a sensitivity check with another student size (same for every method)
        setup = dataclasses.replace(setup, student=(setup.student[0], student_kwargs))
    train_cfg, teacher_cfg = setup.train, setup.teacher_train
    if steps is not None:  # a sensitivity check with another budget (same for every method)
        train_cfg = train_cfg.model_copy(update={"steps": steps})
    if lr is not None:  # another peak learning rate (same for every method)
        train_cfg = train_cfg.model_copy(update={"lr": lr})
    if quick:
        train_cfg = train_cfg.model_copy(update={"steps": 3, "batch_size": 32, "log_every": 1})
        teacher_cfg = teacher_cfg.model_copy(update={"steps": 3, "batch_size": 32, "log_every": 1})
        setup = dataclasses.replace(setup, teacher_train=teacher_cfg, train=train_cfg, seeds=(0, 1))
    seeds = tuple(seeds) if seeds is not None else setup.seeds
    chosen = [m for m in build_methods(setup.preset) if methods is None or m.name in methods]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(run_dir) if run_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        output_sets = [teacher_outputs(m.terms(train_cfg.steps)) for m in chosen]
        ctx = prepare(dataset, setup, folder, quick=quick, output_sets=[o for o in output_sets if o], labels=labels,
                      log=log)
        bundle = ctx["bundle"]
        results: dict[str, list[dict]] = {m.name: [] for m in chosen}
        t_all = time.perf_counter()
        for seed in seeds:  # seeds outermost: machine-load drift spreads over every method alike
            for method in chosen:
                r = train_student(setup, method, seed, ctx, train_cfg)
                results[method.name].append(r)
                top1 = f"{r['top1']:.4f}" if r["top1"] is not None else "failed"
                ms = f"{r['ms_per_step']:.1f} ms/step" if r["ms_per_step"] is not None else r.get("error", "")
                log(f"seed {seed} {method.name:8s} top-1 {top1}  {ms}")
                if partial is not None:  # what has finished so far, in case the run is cut short
                    partial.write_text(json.dumps({"partial": True, "results": results}, indent=1) + "\n")
        seconds = time.perf_counter() - t_all
        converged = None
        if check_convergence and results.get("scratch"):
            converged = convergence(setup, ctx, train_cfg, results["scratch"], log=log)
    student_params = n_params(seeded_build(0, lambda: build_model(setup.student[0], setup.student[1],
                                                                    input_shape=bundle.input_shape,
                                                                    num_classes=bundle.num_classes)))
    kd_top1 = [r["top1"] for r in results.get("KD", [])]
    rows = []
    for method in chosen:
        runs = results[method.name]
        top1 = [r["top1"] for r in runs if r["top1"] is not None]
        ms = [r["ms_per_step"] for r in runs if r["ms_per_step"] is not None]
        wall = [r["wall_ms_per_step"] for r in runs if r["ms_per_step"] is not None]
        row = {"method": method.name,
               "top1_mean": statistics.mean(top1) if top1 else None,
               "top1_std": statistics.stdev(top1) if len(top1) > 1 else (0.0 if top1 else None),
               "ci95": interval(top1) if top1 else None,
               "heldout_top1_mean": statistics.mean(r["heldout_top1"] for r in runs if r["top1"] is not None)
               if top1 else None,
               "ms_per_step": statistics.median(ms) if ms else None,
               "wall_ms_per_step": statistics.median(wall) if wall else None,
               "top1_seeds": [r["top1"] for r in runs],
               "heldout_curves": [r.get("heldout_curve") for r in runs],
               "trained_rows": runs[0].get("trained_rows"),
               "setting": method.setting, "source": method.source,
               "train_only_params": runs[0].get("train_only_params"),
               "failed": [r["error"] for r in runs if r["top1"] is None]}
        if kd_top1 and len(kd_top1) == len(runs) and None not in kd_top1 and len(top1) == len(runs):
            diffs = [a - b for a, b in zip(top1, kd_top1)]
            row["vs_kd_mean"] = statistics.mean(diffs)
            row["vs_kd_std"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            row["vs_kd_ci95"] = interval(diffs)
        rows.append(row)
    return {
        "dataset": dataset,
        "labels": None if labels is None else len(ctx["labelled"]),
        "setting": "full labels" if labels is None else f"{len(ctx['labelled'])} labels + the other training rows "
                                                         "as an unlabeled transfer set",
        "scratch_converged": None if converged is None else converged["converged"],
        "convergence": converged,
        "heldout_rows": len(ctx["heldout"]),
        "teacher_top1": ctx["teacher_top1"],
        "rows": rows,
        "teacher": {"model": setup.teacher[0], "kwargs": setup.teacher[1], "params": n_params(ctx["teacher"]),
                    "taps": setup.teacher_taps,
                    "tap_shapes": ctx["tap_shapes"],
                    "train": setup.teacher_train.model_dump(mode="json")},
        "student": {"model": setup.student[0], "kwargs": setup.student[1], "params": student_params,
                    "taps": setup.student_taps},
        "compression": n_params(ctx["teacher"]) / student_params,
        "preset": setup.preset,
        "train": train_cfg.model_dump(mode="json"),
        "seeds": list(seeds),
        "train_rows": len(bundle.train), "test_rows": len(bundle.test),
        "teacher_mean_top_probability": ctx["teacher_mean_top_probability"],
        "teacher_ms_per_batch": ctx["teacher_ms_per_batch"],
        "teacher_wall_ms_per_batch": ctx["teacher_wall_ms_per_batch"],
        "student_runs_seconds": seconds,
        "quick": quick,
    }


def format_table(result: dict) -> str:
    lines = [f"{result['dataset']}: teacher {result['teacher']['model']} {result['teacher']['kwargs']} "
             f"({result['teacher']['params']:,} params, top-1 {100 * result['teacher_top1']:.2f}%), student "
             f"{result['student']['model']} {result['student']['kwargs']} ({result['student']['params']:,} params, "
             f"{result['compression']:.0f}x fewer); {result['train']['steps']} steps x batch "
             f"{result['train']['batch_size']}, seeds {result['seeds']}, {result['preset']} settings",
             "",
             f"{result['setting']}; scratch converged: {result['scratch_converged']}",
             "",
             "| method | top-1 % (mean ± std) | 95 % interval | vs KD (paired, 95 % interval) | ms / step | setting |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if row["top1_mean"] is None:
            lines.append(f"| {row['method']} | failed | – | – | – | {row['setting']} |")
            continue
        vs = (f"{100 * row['vs_kd_mean']:+.2f} [{100 * row['vs_kd_ci95'][0]:+.2f}, {100 * row['vs_kd_ci95'][1]:+.2f}]"
              if "vs_kd_mean" in row else "–")
        ci = f"[{100 * row['ci95'][0]:.2f}, {100 * row['ci95'][1]:.2f}]"
        if row["method"] == "KD":
            vs = "–"
        lines.append(f"| {row['method']} | {100 * row['top1_mean']:.2f} ± {100 * row['top1_std']:.2f} | {ci} | {vs} | "
                     f"{row['ms_per_step']:.1f} | {row['setting']} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(SETUPS), default="fashion_mnist")
    parser.add_argument("--quick", action="store_true", help="every method for 3 steps on 256 rows (for CI)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where the teacher is trained once and reused (default: runs/bench_methods/<dataset>; "
                             "a temporary folder with --quick)")
    parser.add_argument("--methods", nargs="*", default=None, help="only these rows (default: all)")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="default: 0 1 2")
    parser.add_argument("--steps", type=int, default=None, help="student steps (default: the setup's)")
    parser.add_argument("--lr", type=float, default=None, help="student peak learning rate, every row (default: the "
                                                                  "setup's)")
    parser.add_argument("--student-kwargs", type=json.loads, default=None,
                        help='another student size, e.g. \'{"channels": [16, 32, 32]}\'')
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="published setting of the temperature-based rows (KD, DKD, DIST, KD+CRD): cifar100 "
                             "(T=4) or imagenet (T=1); default: the dataset's (fashion_mnist imagenet, mnist1d "
                             "cifar100)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--labels", type=int, default=None,
                        help="the few-labels table: keep this many training labels; the other training rows are an "
                             "unlabeled transfer set the teacher labels (default: every label)")
    parser.add_argument("--teacher-from", type=Path, default=None,
                        help="reuse this trained teacher (another table's RUN_DIR/teacher.safetensors) instead of "
                             "training one")
    parser.add_argument("--no-convergence-check", action="store_true",
                        help="skip the scratch run at twice the steps (scratch_converged is then null)")
    parser.add_argument("--describe-methods", action="store_true",
                        help="print every preset's rows (settings and loss terms) as JSON and exit, training nothing")
    args = parser.parse_args(argv)
    if args.describe_methods:
        print(json.dumps(describe_methods(), indent=1))
        return {}
    torch.set_num_threads(args.threads)
    run_dir = args.run_dir
    if run_dir is None and not args.quick:
        run_dir = Path("runs") / "bench_methods" / args.dataset
    if args.teacher_from is not None:
        if not args.teacher_from.is_file():
            parser.error(f"--teacher-from {args.teacher_from}: no such file")
        folder = run_dir or Path(tempfile.mkdtemp(prefix="kdistill-methods-"))
        folder.mkdir(parents=True, exist_ok=True)
        for suffix in ("", ".sha256"):
            src = args.teacher_from.with_name(args.teacher_from.name + suffix)
            if src.is_file() and not (folder / f"teacher.safetensors{suffix}").exists():
                shutil.copy2(src, folder / f"teacher.safetensors{suffix}")
        run_dir = folder
    revision = git_revision()
    result = run_benchmark(args.dataset, quick=args.quick, run_dir=run_dir, methods=args.methods,
                           seeds=tuple(args.seeds) if args.seeds else None, steps=args.steps,
                           student_kwargs=args.student_kwargs, preset=args.preset, labels=args.labels, lr=args.lr,
                           check_convergence=not args.no_convergence_check,
                           partial=args.json.with_suffix(".partial.json") if args.json else None)
    result = {"git_revision": revision,
              "command": " ".join(["OMP_NUM_THREADS=1", "python", "benchmarks/methods.py"] +
                                  (argv if argv is not None else sys.argv[1:])),
              **result,
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "threads": torch.get_num_threads(), "cpus": os.cpu_count()}}
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=lambda o: None if isinstance(o, float) and
                                        math.isnan(o) else str(o)) + "\n")
        args.json.with_suffix(".partial.json").unlink(missing_ok=True)
    return result


if __name__ == "__main__":
    main()
