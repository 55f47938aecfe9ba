"""The tables of docs/methods.md, written from the methods benchmark's JSON files (`benchmarks/methods.py`), so
the page quotes exactly what a run measured; `tests/test_results_docs.py` checks the page against them.

    python benchmarks/methods_report.py benchmarks/results/methods_fashion_mnist.json \
        benchmarks/results/methods_fashion_mnist_fewlabels.json      # prints the markdown
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from methods import interval  # the same 95 % t-interval as the benchmark's rows

# orderings reported by the papers (CIFAR-100 tables of Tian et al. 2020, Zhao et al. 2022, Huang et al. 2022):
# (better, worse, where it was reported)
ORDERINGS = [
    ("KD", "scratch", "Hinton et al. 2015; every table of the later papers"),
    ("DKD", "KD", "Zhao et al. 2022 (CIFAR-100, ImageNet)"),
    ("DIST", "KD", "Huang et al. 2022 (CIFAR-100, ImageNet)"),
    ("CRD", "KD", "Tian et al. 2020 (CIFAR-100, 13 teacher-student pairs)"),
    ("KD+CRD", "CRD", "Tian et al. 2020 (CRD+KD above CRD on most pairs)"),
    ("FitNet", "scratch", "Tian et al. 2020 table 1 (most pairs)"),
    ("AT", "scratch", "Tian et al. 2020 table 1 (most pairs)"),
    ("SP", "scratch", "Tian et al. 2020 table 1 (most pairs)"),
    ("RKD", "scratch", "Tian et al. 2020 table 1 (most pairs)"),
    ("PKT", "scratch", "Tian et al. 2020 table 1 (most pairs)"),
    ("CC", "scratch", "Tian et al. 2020 table 1 (most pairs)"),
]


def verdict(ci: list[float]) -> str:
    """'yes' when the 95 % interval of a paired difference is above 0, 'no' when below, else 'not resolved'."""
    if any(math.isnan(v) for v in ci):
        return "not resolved"
    return "yes" if ci[0] > 0 else "no" if ci[1] < 0 else "not resolved"


def row_of(result: dict, method: str) -> dict:
    return next(r for r in result["rows"] if r["method"] == method)


def paired(result: dict, a: str, b: str) -> tuple[float, list[float]]:
    """Mean and 95 % interval, in points, of row a minus row b over the seeds (same seed = same init and order)."""
    diffs = [100 * (x - y) for x, y in zip(row_of(result, a)["top1_seeds"], row_of(result, b)["top1_seeds"])]
    return statistics.mean(diffs), interval(diffs)


def methods_table(result: dict) -> str:
    lines = ["| method | test top-1 % (mean ± std) | 95 % interval | held-out top-1 % | vs KD, points (paired, "
             "95 % interval) | beats KD? | ms / step |",
             "|---|---|---|---|---|---|---|",
             f"| teacher {result['teacher']['model']} "
             f"{', '.join(f'{k} {v}' for k, v in result['teacher']['kwargs'].items())} "
             f"| {100 * result['teacher_top1']:.2f} | | | | | |"]
    for row in result["rows"]:
        ci = f"[{100 * row['ci95'][0]:.2f}, {100 * row['ci95'][1]:.2f}]"
        if row["method"] == "KD":
            vs, beats = "–", "–"
        else:
            mean, vci = paired(result, row["method"], "KD")
            vs, beats = f"{mean:+.2f} [{vci[0]:+.2f}, {vci[1]:+.2f}]", verdict(vci)
        lines.append(f"| {row['method']} | {100 * row['top1_mean']:.2f} ± {100 * row['top1_std']:.2f} | {ci} | "
                     f"{100 * row['heldout_top1_mean']:.2f} | {vs} | {beats} | {row['ms_per_step']:.1f} |")
    return "\n".join(lines)


def convergence_sentence(result: dict) -> str:
    c = result["convergence"]
    return (f"scratch held-out top-1 {100 * c['heldout_top1']:.2f} % at {c['steps']} steps, "
            f"{100 * c['double_heldout_top1']:.2f} % at {c['double_steps']} ({c['gain_points']:+.2f} points): "
            f"{'converged' if c['converged'] else 'not converged'} by the rule")


def curve_table(result: dict) -> str:
    """Seed 0's scratch held-out curve at the budget and at twice the budget (the convergence check)."""
    c = result["convergence"]
    lines = []
    for label, curve in ((f"{c['steps']} steps", c["curve"]), (f"{c['double_steps']} steps", c["double_curve"])):
        points = {int(step): top1 for step, top1 in curve}
        lines.append(f"| scratch, {label} | " + " | ".join(f"{step}: {100 * top1:.1f}"
                                                          for step, top1 in sorted(points.items())) + " |")
    width = max(line.count("|") for line in lines) - 1
    return "\n".join(["| run | held-out top-1 % at step" + " |" * (width - 1), "|---" * width + "|", *lines])


def orderings_table(results: dict[str, dict]) -> str:
    """One row per ordering from the literature, one column per table: the paired difference and whether its
    95 % interval reproduces the ordering."""
    names = list(results)
    lines = ["| ordering | reported by | " + " | ".join(f"{n}: difference, points [95 % interval]" for n in names)
             + " |", "|---|---|" + "---|" * len(names)]
    for better, worse, source in ORDERINGS:
        cells = []
        for result in results.values():
            mean, ci = paired(result, better, worse)
            word = {"yes": "reproduced", "no": "reversed", "not resolved": "not resolved"}[verdict(ci)]
            cells.append(f"{mean:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}] {word}")
        lines.append(f"| {better} > {worse} | {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(result: dict) -> str:
    """The table's verdicts as sentences: KD against scratch, which rows beat KD (paired 95 % intervals above 0),
    which lose to it, which are not resolved by 3 seeds, and the step-time cost of the slow rows."""
    mean, ci = paired(result, "KD", "scratch")
    groups: dict[str, list[str]] = {"yes": [], "no": [], "not resolved": []}
    for row in result["rows"]:
        if row["method"] in ("KD", "scratch"):
            continue
        m, c = paired(result, row["method"], "KD")
        groups[verdict(c)].append(f"{row['method']} ({m:+.2f} [{c[0]:+.2f}, {c[1]:+.2f}])")
    base = row_of(result, "scratch")["ms_per_step"]
    slow = [f"{r['method']} {r['ms_per_step'] / base:.1f}x" for r in result["rows"] if r["ms_per_step"] > 1.5 * base]
    lines = [f"* KD - scratch: {mean:+.2f} points [{ci[0]:+.2f}, {ci[1]:+.2f}] ({verdict(ci)}).",
             f"* Beat KD: {', '.join(groups['yes']) or 'none'}.",
             f"* Below KD: {', '.join(groups['no']) or 'none'}.",
             f"* Not resolved by 3 seeds (interval spans 0): {', '.join(groups['not resolved']) or 'none'}.",
             "* Step time against scratch's: " + (f"{', '.join(slow)}; every other row within 1.5x." if slow else
                                                  "every row within 1.5x.")]
    return "\n".join(lines)


def headline(full: dict, few: dict) -> str:
    """The README's sentence on the two tables."""
    def kd_vs_scratch(result):
        return (f"KD {100 * row_of(result, 'KD')['top1_mean']:.2f} % vs scratch "
                f"{100 * row_of(result, 'scratch')['top1_mean']:.2f} % ({paired(result, 'KD', 'scratch')[0]:+.2f} "
                "points)")
    return (f"{full['compression']:.1f}x smaller student, {full['train']['steps']} steps, 3 seeds: with every label "
            f"{kd_vs_scratch(full)}; with {few['labels']:,} labels plus the rest as a transfer set "
            f"{kd_vs_scratch(few)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("full", type=Path)
    parser.add_argument("few", type=Path)
    args = parser.parse_args()
    full, few = (json.loads(p.read_text()) for p in (args.full, args.few))
    for name, result in (("full labels", full), ("few labels", few)):
        print(f"## {name}\n\n{convergence_sentence(result)}\n\n{curve_table(result)}\n\n{methods_table(result)}\n\n{findings(result)}\n")
    print(orderings_table({"full labels": full, "few labels": few}))
    print(f"\n{headline(full, few)}")


if __name__ == "__main__":
    main()
