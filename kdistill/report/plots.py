"""The report's figures: matplotlib (object API on the Agg canvas, no pyplot, no global backend change) drawn to
inline SVG text. Each function takes numbers already read from the run's files and returns one ``<svg>``
element (text as ``<text>``, no external reference, no XML prolog), which scales with its container.

matplotlib is the ``report`` extra (``pip install 'kdistill[report]'``); `available` says whether it imports.
"""

from __future__ import annotations

import io
import re
from typing import Mapping, Optional, Sequence

import numpy as np

COLORS = {"teacher": "#1f77b4", "student": "#d62728", "baseline": "#7f7f7f"}
OTHER_COLORS = ["#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
INSTALL_HINT = "plots left out: matplotlib is not installed (pip install 'kdistill[report]')"

__all__ = ["INSTALL_HINT", "available", "confusion", "curves", "lm_bars", "pareto", "per_class", "reliability",
           "similarity_scatter"]


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def color(name: str, index: int = 0) -> str:
    return COLORS.get(name, OTHER_COLORS[index % len(OTHER_COLORS)])


def _figure(width: float = 6.4, height: float = 3.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _svg(fig, name: str, label: str) -> str:
    """`fig` as an inline ``<svg>`` element: ids salted with `name` (unique and reproducible within a page),
    prolog, metadata and namespace URLs removed (the HTML parser needs none of them)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text)
    safe = label.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    return text.replace("<svg", f'<svg class="plot" role="img" aria-label="{safe}" data-plot="{name}"', 1)


def curves(stage: str, steps: Sequence[int], terms: Mapping[str, Sequence[float]],
           evals: Mapping[str, tuple[Sequence[int], Sequence[float]]]) -> str:
    """One stage's logged loss terms (and the total) against the step; evaluations on a second axis."""
    fig = _figure()
    ax = fig.add_subplot()
    for i, (name, values) in enumerate(terms.items()):
        ax.plot(steps, values, label=name, color=OTHER_COLORS[i % len(OTHER_COLORS)] if name != "loss" else "black",
                linewidth=2.0 if name == "loss" else 1.4, marker="o" if len(steps) < 12 else None, markersize=3)
    values = np.asarray([v for vs in terms.values() for v in vs if v is not None], dtype=float)
    if values.size and (values > 0).all() and values.max() / values.min() > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss term (window mean)")
    ax.set_title(f"stage {stage}")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if evals:
        ax2 = ax.twinx()
        for i, (name, (at, vals)) in enumerate(evals.items()):
            ax2.plot(at, vals, linestyle="--", marker="s", markersize=3, color=OTHER_COLORS[-1 - i],
                     label=f"eval {name}")
        ax2.set_ylabel("evaluation")
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8, loc="best")
    return _svg(fig, f"curves-{stage}", f"training curves of stage {stage}")


def pareto(points: Sequence[tuple[str, float, float]], xlabel: str, ylabel: str, *, lower_is_better: bool,
           name: str, log_x: bool = True) -> str:
    """Quality (y) against a cost (x) of each model/artifact ``(label, x, y)``; the Pareto front (no other point
    is both cheaper and better) is joined by a line and its points are drawn filled."""
    fig = _figure()
    ax = fig.add_subplot()
    front = pareto_front([(x, y) for _, x, y in points], lower_is_better=lower_is_better)
    if len(front) > 1:
        xs, ys = zip(*sorted(front))
        ax.step(xs, ys, where="post", color="#999999", linewidth=1, zorder=1, label="Pareto front")
    for i, (label, x, y) in enumerate(points):
        on_front = (x, y) in front
        c = color(label, i)
        ax.scatter([x], [y], s=46, zorder=2, color=c if on_front else "white", edgecolors=c, linewidths=1.6)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if log_x and all(x > 0 for _, x, _ in points):
        ax.set_xscale("log")
    ax.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" (lower is better)" if lower_is_better else ""))
    ax.grid(alpha=0.3)
    if len(front) > 1:
        ax.legend(fontsize=8, loc="best")
    return _svg(fig, name, f"{ylabel} against {xlabel}")


def pareto_front(points: Sequence[tuple[float, float]], *, lower_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point dominates (x no larger and y at least as good, one of them strictly)."""
    def better(a, b):
        return a < b if lower_is_better else a > b

    front = []
    for x, y in points:
        dominated = any((ox <= x and (better(oy, y) or oy == y) and (ox < x or better(oy, y)))
                        for ox, oy in points)
        if not dominated and (x, y) not in front:
            front.append((x, y))
    return front


def reliability(models: Mapping[str, dict], name: str = "reliability") -> str:
    """Reliability diagram: per confidence bin, accuracy against mean confidence for each model (``{name:
    {"confidence", "accuracy", "count", "ece"}}``, bins with no example left out); the diagonal is calibration."""
    fig = _figure(5.2, 4.4)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1, label="perfect calibration")
    for i, (model, b) in enumerate(models.items()):
        keep = np.asarray(b["count"]) > 0
        conf, acc = np.asarray(b["confidence"])[keep], np.asarray(b["accuracy"])[keep]
        ax.plot(conf, acc, marker="o", markersize=4, color=color(model, i), label=f"{model} (ECE {b['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (mean max probability in bin)")
    ax.set_ylabel("accuracy in bin")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _svg(fig, name, "reliability diagram")


def per_class(accuracies: Mapping[str, Sequence[float]], classes: Sequence[str]) -> str:
    """Grouped bars: each model's accuracy on each true class."""
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    n = len(accuracies)
    width = 0.8 / max(n, 1)
    x = np.arange(len(classes))
    for i, (name, acc) in enumerate(accuracies.items()):
        ax.bar(x + (i - (n - 1) / 2) * width, acc, width, label=name, color=color(name, i))
    ax.set_xticks(x, classes, fontsize=8 if len(classes) <= 20 else 6)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("true class")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower right")
    return _svg(fig, "per-class", "per-class accuracy")


def confusion(matrix: np.ndarray, classes: Sequence[str]) -> str:
    """Counts of disagreements: teacher's class (rows) against student's class (columns)."""
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", aspect="auto")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, fontsize=8 if len(classes) <= 20 else 6)
    ax.set_yticks(ticks, classes, fontsize=8 if len(classes) <= 20 else 6)
    ax.set_xlabel("student's class")
    ax.set_ylabel("teacher's class")
    if len(classes) <= 20:
        top = matrix.max() if matrix.size else 0
        for (r, c), v in np.ndenumerate(matrix):
            if v:
                ax.text(c, r, str(int(v)), ha="center", va="center", fontsize=7,
                        color="white" if v > top / 2 else "black")
    fig.colorbar(image, ax=ax, shrink=0.8, label="examples")
    return _svg(fig, "disagreements", "teacher class against student class where they disagree")


def similarity_scatter(teacher: np.ndarray, student: np.ndarray, spearman: Optional[float], max_points: int = 2000
                       ) -> str:
    """Student against teacher cosine similarity of the same sentence pairs (an even subsample when many)."""
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot()
    if len(teacher) > max_points:
        keep = np.linspace(0, len(teacher) - 1, max_points).astype(int)
        teacher, student = teacher[keep], student[keep]
    ax.scatter(teacher, student, s=5, alpha=0.4, color=COLORS["student"], linewidths=0)
    low = float(min(teacher.min(), student.min())) if len(teacher) else 0.0
    ax.plot([low, 1], [low, 1], color="#999999", linestyle=":", linewidth=1)
    ax.set_xlabel("teacher cosine similarity")
    ax.set_ylabel("student cosine similarity")
    if spearman is not None:
        ax.set_title(f"Spearman {spearman:.3f} (summary.json)", fontsize=10)
    ax.grid(alpha=0.3)
    return _svg(fig, "similarities", "student against teacher cosine similarity of sentence pairs")


def lm_bars(values: Mapping[str, float], ylabel: str) -> str:
    """Horizontal bars of one number per model (held-out perplexity of a causal LM run)."""
    fig = _figure(6.4, 0.6 + 0.5 * len(values))
    ax = fig.add_subplot()
    names = list(values)
    ax.barh(np.arange(len(names)), [values[n] for n in names],
            color=[color(n.split(",")[0], i) for i, n in enumerate(names)])
    ax.set_yticks(np.arange(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(ylabel)
    ax.grid(alpha=0.3, axis="x")
    return _svg(fig, "lm-perplexity", ylabel)
