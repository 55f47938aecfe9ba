"""Training schemes on real data (mnist1d: 4000 train / 1000 test, 40 features, 10 classes), several seeds.

Every row is test top-1 accuracy, mean and sample standard deviation over the seeds; per-seed values are in the
JSON. A seed changes every model's initialization and data order (the data split is the standard one). All
models train with AdamW, one-cycle LR 3e-3, batch 128; KD rounds use (1 - a) CE + a T^2 KL with a = 0.9, T = 4.

Rows:
* ``scratch``: MLP [128, 128] on the labels. ``kd``: the same MLP (same init) distilled from the CNN teacher
  (cnn1d, 32 channels, depth 4).
* ``dml_peer`` / ``dml_ensemble``: two MLP [128, 128] peers by deep mutual learning (T = 1); ``dml_peer`` is the
  mean of the two peers (each peer in ``peers``), ``dml_ensemble`` their probability average.
* ``born_again_k``: generation k of MLP [128, 128] (generation 0 = the ``scratch`` model of that seed).
* ``multi_mean`` / ``multi_agreement``: MLP [128, 128] distilled from a pool of three teachers: the CNN, an MLP
  [512, 512], and a deliberately bad teacher (MLP [256, 256] trained on shuffled labels), combined by mean of
  probabilities vs per-sample agreement weighting; ``context`` gives each teacher's accuracy and its mean
  agreement weight on the training inputs.
* ``takd`` / ``direct_kd``: a tiny MLP [16] student (~0.8k parameters, vs ~17k for the CNN teacher): via one
  teacher assistant (the student's architecture widened to the geometric-mean size) vs directly from the CNN.
* ``lwf_old`` / ``finetune_old``: an MLP [128, 128] learns classes 0-4 (old task), then classes 5-9 on their
  data only, with Learning without Forgetting (lambda_o = 1, T = 2) vs plain fine-tuning; the row is the
  task-aware old-task accuracy afterwards (``context`` has the new-task and before-numbers).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/schemes.py --json benchmarks/results/schemes.json
    OMP_NUM_THREADS=1 python benchmarks/schemes.py --quick --json /tmp/schemes_quick.json
    OMP_NUM_THREADS=1 python benchmarks/schemes.py --only multi --json benchmarks/results/schemes_multi_teacher.json

``--only GROUP[,GROUP]`` runs the teacher, ``scratch`` and the named groups' rows (kd, dml, born_again, multi,
takd, lwf); the JSON is rewritten after every seed (partial results survive a kill).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdistill.config import DistillConfig, ModelConfig, TrainConfig  # noqa: E402
from kdistill.data import ArrayDataset, mnist1d  # noqa: E402
from kdistill.models import build_model  # noqa: E402
from kdistill.schemes.assistant import geometric_assistants, train_chain  # noqa: E402
from kdistill.distiller import terms_from_config  # noqa: E402
from kdistill.schemes.common import distill, freeze, top1_accuracy, train_ce  # noqa: E402
from kdistill.schemes.lifelong import lifelong  # noqa: E402
from kdistill.schemes.multi_teacher import MultiTeacher  # noqa: E402
from kdistill.schemes.mutual import train_mutual  # noqa: E402
from kdistill.schemes.self_distill import born_again  # noqa: E402
from kdistill.provenance import git_revision  # noqa: E402
from kdistill.seeding import seeded_build  # noqa: E402

ROW_ORDER = ["scratch", "kd", "dml_peer", "dml_ensemble", "born_again_1", "born_again_2", "born_again_3",
             "multi_mean", "multi_agreement", "takd", "direct_kd", "lwf_old", "finetune_old"]
TEACHER = ModelConfig(name="cnn1d", kwargs={"channels": 32, "depth": 4})
STUDENT = ModelConfig(name="mlp", kwargs={"hidden": [128, 128]})
GOOD_MLP = ModelConfig(name="mlp", kwargs={"hidden": [512, 512]})
BAD_MLP = ModelConfig(name="mlp", kwargs={"hidden": [256, 256]})
TINY = ModelConfig(name="mlp", kwargs={"hidden": [16]})
ALPHA, TEMPERATURE = 0.9, 4.0
GROUPS = {"kd": ["kd"], "dml": ["dml_peer", "dml_ensemble"],
          "born_again": ["born_again_1", "born_again_2", "born_again_3"], "multi": ["multi_mean", "multi_agreement"],
          "takd": ["takd", "direct_kd"], "lwf": ["lwf_old", "finetune_old"]}


def builder(model_cfg: ModelConfig, init_seed: int):
    return lambda: seeded_build(init_seed, lambda: build_model(model_cfg.name, model_cfg.kwargs, input_shape=(40,),
                                                               num_classes=10))


def shuffled_labels(data: ArrayDataset, seed: int) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    y = data.tensors["y"][torch.randperm(len(data), generator=g)]
    return ArrayDataset({"x": data.tensors["x"], "y": y}, "mnist1d-shuffled-labels")


def one_seed(seed: int, bundle, teacher_cfg: TrainConfig, student_cfg: TrainConfig, log,
             groups=tuple(GROUPS)) -> tuple[dict, dict]:
    train, test = bundle.train, bundle.test
    terms = terms_from_config(DistillConfig(alpha=ALPHA, temperature=TEMPERATURE).resolved_terms())
    acc = lambda m: top1_accuracy(m, test)  # noqa: E731
    base = 1000 * seed
    rows, context = {}, {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        log(f"  seed {seed} {name}: {time.perf_counter() - t0:.1f}s")
        return out

    teacher = timed("teacher", lambda: freeze(train_ce("teacher", builder(TEACHER, base + 1)(), train, teacher_cfg,
                                                       seed=base + 1)))
    context["teacher_cnn"] = acc(teacher)

    scratch = timed("scratch", lambda: train_ce("scratch", builder(STUDENT, base + 2)(), train, student_cfg,
                                                seed=base + 2))
    rows["scratch"] = acc(scratch)
    if "kd" in groups:
        kd = timed("kd", lambda: distill("kd", builder(STUDENT, base + 2)(), teacher, train, student_cfg, seed=base + 2,
                                         terms=terms))
        rows["kd"] = acc(kd)
    if "dml" in groups:
        _dml(rows, context, seed, base, train, student_cfg, acc, timed)
    if "born_again" in groups:
        gens = timed("born-again", lambda: born_again(lambda k: builder(STUDENT, base + 10 + k)(), train, student_cfg,
                                                      generations=3, terms=terms, gen0=scratch, seed=base + 10))
        for k in (1, 2, 3):
            rows[f"born_again_{k}"] = acc(gens[k])
    if "multi" in groups:
        _multi(rows, context, teacher, base, train, teacher_cfg, student_cfg, terms, acc, timed)
    if "takd" in groups:
        _takd(rows, context, teacher, base, train, student_cfg, terms, acc, timed)
    if "lwf" in groups:
        _lwf(rows, context, base, bundle, student_cfg, timed)
    return rows, context


def _dml(rows, context, seed, base, train, student_cfg, acc, timed) -> None:

    ensemble = timed("dml", lambda: train_mutual([builder(STUDENT, base + 3)(), builder(STUDENT, base + 4)()], train,
                                                 student_cfg, temperature=1.0, seed=base + 3))
    peers = [acc(p) for p in ensemble.members]
    rows["dml_peer"] = statistics.fmean(peers)
    context["dml_peers"] = peers
    rows["dml_ensemble"] = acc(ensemble)


def _multi(rows, context, teacher, base, train, teacher_cfg, student_cfg, terms, acc, timed) -> None:
    good_mlp = timed("teacher mlp", lambda: freeze(train_ce("teacher_mlp", builder(GOOD_MLP, base + 5)(), train,
                                                            teacher_cfg, seed=base + 5)))
    bad = timed("bad teacher", lambda: freeze(train_ce("teacher_bad", builder(BAD_MLP, base + 6)(),
                                                       shuffled_labels(train, base + 6), teacher_cfg, seed=base + 6)))
    pool = [teacher, good_mlp, bad]
    context["pool_accuracy"] = [acc(m) for m in pool]
    for combine in ("mean", "agreement"):
        multi = MultiTeacher(pool, combine, temperature=TEMPERATURE)
        student = timed(f"multi {combine}", lambda: distill(f"multi_{combine}", builder(STUDENT, base + 2)(), multi,
                                                            train, student_cfg, seed=base + 2, terms=terms))
        rows[f"multi_{combine}"] = acc(student)
        if combine == "agreement":
            weights = multi({"x": train.tensors["x"]})["teacher_weights"].mean(0)
            context["agreement_mean_weights_train"] = [float(w) for w in weights]


def _takd(rows, context, teacher, base, train, student_cfg, terms, acc, timed) -> None:
    teacher_params = sum(p.numel() for p in teacher.parameters())
    (assistant_cfg,) = geometric_assistants(TINY, teacher_params, (40,), 10, count=1)
    context["takd_assistant"] = assistant_cfg.kwargs
    chain = timed("takd", lambda: train_chain(teacher, [builder(assistant_cfg, base + 7)(), builder(TINY, base + 8)()],
                                              train, student_cfg, terms=terms, seed=base + 7))
    context["takd_assistant_accuracy"] = acc(chain[0])
    rows["takd"] = acc(chain[1])
    direct = timed("direct kd", lambda: distill("direct", builder(TINY, base + 8)(), teacher, train, student_cfg,
                                                seed=base + 8, terms=terms))
    rows["direct_kd"] = acc(direct)
    tiny = timed("tiny scratch", lambda: train_ce("tiny", builder(TINY, base + 8)(), train, student_cfg,
                                                  seed=base + 8))
    context["tiny_scratch"] = acc(tiny)


def _lwf(rows, context, base, bundle, student_cfg, timed) -> None:
    old, new = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
    result = timed("lifelong", lambda: lifelong(builder(STUDENT, base + 9), bundle, old, new, student_cfg,
                                                old_train=student_cfg, seed=base + 9))
    rows["lwf_old"] = result["lwf"]["old_task"]
    rows["finetune_old"] = result["finetune"]["old_task"]
    context["old_task_before"] = result["old"]["old_task"]
    context["lwf_new"] = result["lwf"]["new_task"]
    context["finetune_new"] = result["finetune"]["new_task"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(per_seed: list[dict], contexts: list[dict]) -> tuple[list[dict], dict]:
    """Rows (mean, std, per-seed values) in ROW_ORDER for the rows that ran, and the context's summary."""
    out_rows = []
    for name in [n for n in ROW_ORDER if n in per_seed[0]]:
        values = [r[name] for r in per_seed]
        mean, std = mean_std(values)
        row = {"scheme": name, "top1_mean": mean, "top1_std": std, "n_seeds": len(values), "values": values}
        if name == "dml_peer":
            row["peers"] = [c["dml_peers"] for c in contexts]
        out_rows.append(row)
    context_summary = {}
    for key in contexts[0]:
        vals = [c[key] for c in contexts]
        if isinstance(vals[0], float):
            m, s = mean_std(vals)
            context_summary[key] = {"mean": m, "std": s, "values": vals}
        else:
            context_summary[key] = vals
    return out_rows, context_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="2 seeds, short runs (a smoke test, not a result)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick: 2)")
    parser.add_argument("--only", default=None, help=f"comma-separated groups of rows: {', '.join(GROUPS)}")
    args = parser.parse_args()
    groups = tuple(GROUPS) if args.only is None else tuple(g.strip() for g in args.only.split(","))
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown groups {unknown}; choose from {', '.join(GROUPS)}")
    torch.set_num_threads(1)
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    teacher_steps, student_steps = (300, 500) if args.quick else (1500, 3000)
    common = dict(batch_size=128, lr=3e-3, schedule="onecycle", log_every=100)
    teacher_cfg = TrainConfig(steps=teacher_steps, **common)
    student_cfg = TrainConfig(steps=student_steps, **common)
    bundle = mnist1d()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    command = ("OMP_NUM_THREADS=1 python benchmarks/schemes.py" + (" --quick" if args.quick else "")
               + (f" --seeds {args.seeds}" if args.seeds else "") + (f" --only {args.only}" if args.only else "")
               + f" --json {args.json}")
    t0 = time.perf_counter()
    per_seed, contexts = [], []
    for seed in seeds:
        rows, context = one_seed(seed, bundle, teacher_cfg, student_cfg, log, groups)
        per_seed.append(rows)
        contexts.append(context)
        out_rows, context_summary = summarize(per_seed, contexts)
        seconds = time.perf_counter() - t0
        result = {
            "command": command, "git_revision": git_revision(), "complete": len(per_seed) == len(seeds),
            "dataset": "mnist1d (4000 train / 1000 test)", "seeds": seeds[:len(per_seed)],
            "teacher_steps": teacher_steps, "student_steps": student_steps, "batch_size": 128,
            "kd": {"alpha": ALPHA, "temperature": TEMPERATURE}, "rows": out_rows, "context": context_summary,
            "seconds": seconds, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"{'scheme':<16} {'top-1 % (mean +- std)':>22}  per seed")
    for row in out_rows:
        vals = " ".join(f"{100 * v:.1f}" for v in row["values"])
        print(f"{row['scheme']:<16} {100 * row['top1_mean']:>14.2f} +- {100 * row['top1_std']:<5.2f}  {vals}")
    print("context:")
    for key, v in context_summary.items():
        if isinstance(v, dict):
            print(f"  {key}: {100 * v['mean']:.2f} +- {100 * v['std']:.2f}")
        else:
            print(f"  {key}: {v}")
    print(f"{len(seeds)} seeds, {seconds:.0f} s; written {args.json}")


if __name__ == "__main__":
    main()
