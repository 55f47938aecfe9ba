"""Data-free distillation on Fashion-MNIST (DeepInversion, DFAD vs real data vs noise), adversarial terms, tabular.

Fashion-MNIST: a BatchNorm CNN teacher is trained on the real training split; students (the teacher's
architecture, freshly initialised, as in DeepInversion's ImageNet data-free KD) are then distilled (KD, T = 4) with
* ``deepinversion``: inputs synthesised from the teacher's BatchNorm statistics (`kdistill.datafree.synthesis`),
* ``dfad``: a generator trained against the student (`kdistill.datafree.dfad`; here with the BatchNorm-statistics
  term on the generator, ``bn_weight`` 1, and a narrow generator, ``width`` 16, to fit the CPU budget),
* ``noise``: uniform random images (as many as the synthesised set),
* ``kd_real``: the real training images (CE + KD, alpha 0.9),
and scored on the real test set. No data-free student reads a real training image (the teacher did, earlier).
Adversarial terms: KD on a small real subset, without / with the discriminator term / with boundary samples.
Tabular (MUNGE etc.): `benchmarks/data_free_tabular.py`'s ``run(quick)`` merged in when that module exists.
Student seeds 0..N-1 (one synthesised set, seed 0, shared by them); the JSON is rewritten after every model
(``complete: false`` until the end), in the order teacher, synthesis, DeepInversion / noise / real-data students,
adversarial terms, tabular, DFAD.

    python benchmarks/data_free.py [--quick] --json benchmarks/results/data_free.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdistill.config import AugmentConfig  # noqa: E402
from kdistill.data import ArrayDataset, fashion_mnist  # noqa: E402
from kdistill.data.augment import maybe_augment  # noqa: E402
from kdistill.datafree.config import BoundaryConfig, DeepInversionConfig, DFADConfig  # noqa: E402
from kdistill.distiller import Distiller, Term  # noqa: E402
from kdistill.models.zoo import CNN2d  # noqa: E402
from kdistill.provenance import git_revision  # noqa: E402
from kdistill.schemes.common import top1_accuracy, train_ce  # noqa: E402
from kdistill.seeding import seeded_build  # noqa: E402
from kdistill.tasks.job import run_stage  # noqa: E402
from kdistill.train_config import TrainConfig  # noqa: E402

SHAPE = (1, 28, 28)


def settings(quick: bool) -> dict:
    full = {"seeds": 3, "teacher_channels": [16, 32, 64], "student_channels": [16, 32, 64], "teacher_steps": 1000,
            "student_steps": 1500, "batch_size": 128, "lr": 1e-2, "student_augment": {"max_shift": 2, "flip": True},
            "deepinversion": {"batches": 20, "batch_size": 128, "steps": 80, "lr": 0.15, "bn_weight": 10.0,
                              "first_bn_weight": 10.0},
            "dfad": {"iterations": 120, "student_steps": 5, "batch_size": 96, "width": 16, "bn_weight": 1.0},
            "adversarial": {"subset": 1000, "steps": 250, "disc_weight": 0.3,
                            "boundary": {"fraction": 0.5, "steps": 2}},
            "test_size": None}
    if not quick:
        return full
    return {**full, "seeds": 2, "student_channels": [8, 16, 32], "teacher_steps": 100, "student_steps": 30,
            "deepinversion": {**full["deepinversion"], "batches": 2, "batch_size": 64, "steps": 10, "lr": 0.1},
            "dfad": {**full["dfad"], "iterations": 4, "batch_size": 32},
            "adversarial": {**full["adversarial"], "subset": 500, "steps": 20}, "test_size": 1000}


def train_cfg(steps: int, s: dict) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=s["batch_size"], lr=s["lr"], log_every=max(1, steps // 4),
                       schedule="onecycle", threads=1)


def model(channels, seed: int) -> torch.nn.Module:
    return seeded_build(seed, lambda: CNN2d(SHAPE, 10, tuple(channels)))


def kd_terms(with_labels: bool) -> list[Term]:
    kd = Term("kd", "kd", 0.9 if with_labels else 1.0, params={"temperature": 4.0})
    return ([Term("ce", "ce", 0.1)] if with_labels else []) + [kd]


def distil(objective, data, steps: int, s: dict, seed: int) -> torch.nn.Module:
    return run_stage("student", objective, data, train_cfg(steps, s), seed=seed, log=lambda line: None)[0]


def summary_of(values: list[float]) -> dict:
    return {"per_seed": values, "mean": statistics.fmean(values), "median": statistics.median(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a minutes-long smoke run (not a result)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    s = settings(args.quick)
    result = {"git_revision": git_revision(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "command": " ".join(["python", "benchmarks/data_free.py", *sys.argv[1:]]), "quick": args.quick,
              "settings": s, "fashion_mnist": {}, "adversarial": {}, "timings_s": {}}
    result["complete"] = False

    def save() -> None:  # rewritten after every model: an interrupted run keeps what it measured
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    bundle = fashion_mnist()
    test = bundle.test
    if s["test_size"]:
        test = ArrayDataset({k: v[:s["test_size"]] for k, v in test.tensors.items()}, "test")
    fm = result["fashion_mnist"]
    clock = time.perf_counter()
    teacher = train_ce("teacher", model(s["teacher_channels"], 101), bundle.train, train_cfg(s["teacher_steps"], s),
                       seed=1, log=lambda line: None).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    fm["teacher_top1"] = result["teacher_top1"] = top1_accuracy(teacher, test)
    result["timings_s"]["teacher"] = round(time.perf_counter() - clock, 1)
    print(f"teacher {fm['teacher_top1']:.4f} ({result['timings_s']['teacher']} s)", flush=True)
    save()

    # one synthesised set (seed 0), shared by the three student seeds (recorded in settings)
    from kdistill.datafree.synthesis import deepinversion_set

    di = DeepInversionConfig(**s["deepinversion"])
    cache = Path(os.environ.get("KDISTILL_SYNTHESIS_CACHE", "/tmp/kdistill-data-free-synthesis"))
    clock = time.perf_counter()
    x_syn, _, info = deepinversion_set(teacher, SHAPE, 10, di, seed=0, folder=cache, log=print)
    result["timings_s"]["synthesis"] = round(time.perf_counter() - clock, 1)
    result["settings"]["synthesis_shared_across_seeds"] = True
    with torch.no_grad():
        fm["synthesis_teacher_confidence"] = float(torch.softmax(teacher(x_syn), -1).max(-1).values.mean())
    noise = torch.rand(len(x_syn), *SHAPE, generator=torch.Generator().manual_seed(0))
    augment = AugmentConfig(**s["student_augment"])
    rows = {name: [] for name in ("deepinversion", "noise", "kd_real", "dfad")}

    def record(name: str, seed: int, student, clock: float) -> None:
        rows[name].append(top1_accuracy(student, test))
        result["timings_s"][f"{name}_seed{seed}"] = round(time.perf_counter() - clock, 1)
        fm[name] = summary_of(rows[name])
        print(f"seed {seed} {name}: {rows[name][-1]:.4f} ({result['timings_s'][f'{name}_seed{seed}']} s)", flush=True)
        headline(result)
        save()

    for seed in range(s["seeds"]):
        for name in ("deepinversion", "noise", "kd_real"):
            clock = time.perf_counter()
            data = {"deepinversion": ArrayDataset({"x": x_syn}, "synthesis"),
                    "noise": ArrayDataset({"x": noise}, "noise"), "kd_real": bundle.train}[name]
            student = distil(Distiller(model(s["student_channels"], 202 + seed), teacher, kd_terms(name == "kd_real")),
                             maybe_augment(data, augment, seed), s["student_steps"], s, seed)
            record(name, seed, student, clock)
    adversarial(result, teacher, bundle, test, s, save)
    clock = time.perf_counter()
    tabular(result, args.quick)
    result["timings_s"]["tabular"] = round(time.perf_counter() - clock, 1)
    save()
    from kdistill.datafree.dfad import train_dfad

    for seed in range(s["seeds"]):
        clock = time.perf_counter()
        student = model(s["student_channels"], 202 + seed)
        train_dfad(teacher, student, SHAPE, DFADConfig(**s["dfad"]), seed=seed)
        record("dfad", seed, student, clock)
    result["complete"] = True
    save()
    print(json.dumps({k: result[k] for k in result if k.endswith("_top1")}, indent=2))


def headline(result: dict) -> None:
    """The headline keys from what has been measured so far."""
    fm = result["fashion_mnist"]
    done = [n for n in ("deepinversion", "dfad") if n in fm]
    if done:
        best = max(done, key=lambda n: fm[n]["mean"])
        result["data_free_top1"], result["data_free_std"], result["data_free_method"] = \
            fm[best]["mean"], fm[best]["std"], best
        result["data_free_per_seed"] = fm[best]["per_seed"]
    for name in ("noise", "kd_real"):
        if name in fm:
            result[f"{name}_top1"], result[f"{name}_std"] = fm[name]["mean"], fm[name]["std"]
            result[f"{name}_per_seed"] = fm[name]["per_seed"]
    if "data_free_top1" in result and "noise_top1" in result:
        result["acceptance"] = {"data_free_at_least_80": result["data_free_top1"] >= 0.80,
                                "data_free_top1": result["data_free_top1"], "noise_top1": result["noise_top1"]}


def adversarial(result: dict, teacher, bundle, test, s: dict, save) -> None:
    """KD on a small real subset: plain, + discriminator term, + boundary samples (same seeds and steps)."""
    from kdistill.datafree.boundary import BoundaryDistiller

    a = s["adversarial"]
    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(len(bundle.train), generator=g)[:a["subset"]]
    subset = ArrayDataset({k: v[rows] for k, v in bundle.train.tensors.items() if k != "index"}, "subset")
    boundary = BoundaryConfig(**a["boundary"], clamp=(0.0, 1.0))
    out = result["adversarial"]
    values = {name: [] for name in ("kd", "kd_discriminator", "kd_boundary")}
    for seed in range(s["seeds"]):
        for name in values:
            clock = time.perf_counter()
            student = model(s["student_channels"], 202 + seed)
            terms = kd_terms(True)
            if name == "kd_discriminator":
                terms.append(Term("adv", "adversarial", a["disc_weight"], params={"hidden": 64}))
            objective = BoundaryDistiller(student, teacher, terms, teacher_model=teacher, boundary=boundary) \
                if name == "kd_boundary" else Distiller(student, teacher, terms)
            values[name].append(top1_accuracy(distil(objective, subset, a["steps"], s, seed), test))
            result["timings_s"][f"adv_{name}_seed{seed}"] = round(time.perf_counter() - clock, 1)
            out[name] = summary_of(values[name])
            print(f"seed {seed} adversarial {name}: {values[name][-1]:.4f}", flush=True)
            save()


def tabular(result: dict, quick: bool) -> None:
    """Merge `benchmarks/data_free_tabular.py`'s run(quick) (MUNGE, real labels, ensemble), if it exists."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        module = importlib.import_module("data_free_tabular")
    except ModuleNotFoundError:
        result["tabular"] = {"missing": "benchmarks/data_free_tabular.py was not there when this ran"}
        for key in ("munge_top1", "real_labels_top1", "ensemble_top1"):
            result[key] = None
        return
    tab = module.run(quick)
    result["tabular"] = tab
    for key in ("munge_top1", "real_labels_top1", "ensemble_top1"):  # {mean, std, per-fold values} or a number
        value = tab.get(key)
        if isinstance(value, dict):
            result[key] = value.get("mean")
            result[key.replace("_top1", "_std")] = value.get("std")
            result[key.replace("_top1", "_per_fold")] = value.get("per_fold")
        else:
            result[key] = value


if __name__ == "__main__":
    main()
