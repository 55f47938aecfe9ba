"""The Audit section's figures, drawn from ``audit.json`` (`kdistill.audit.teacher.audit_teacher`'s record):
the teacher's confidence histogram, STRIP's entropy distributions against the clean threshold, and each class's
reconstructed-trigger size against the median. Same conventions as `kdistill.report.plots` (inline SVG)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from kdistill.report.plots import _figure, _svg, color

__all__ = ["confidence_histogram", "strip_entropy", "trigger_norms"]


def _bars(ax, edges: Sequence[float], counts: Sequence[float], **kwargs) -> None:
    edges = np.asarray(edges, dtype=float)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", **kwargs)


def confidence_histogram(edges: Sequence[float], counts: Sequence[int]) -> str:
    """Held-out rows per bin of the teacher's top-class probability."""
    fig = _figure(5.2, 3.4)
    ax = fig.add_subplot()
    _bars(ax, edges, counts, color=color("teacher"), edgecolor="white", linewidth=0.5)
    ax.set_xlim(0, 1)
    ax.set_xlabel("teacher confidence (max probability)")
    ax.set_ylabel("held-out rows")
    ax.grid(alpha=0.3, axis="y")
    return _svg(fig, "audit-confidence", "teacher confidence histogram")


def strip_entropy(clean: dict, examined: dict, threshold: float) -> str:
    """STRIP: the entropy histogram of the clean held-out calibration inputs and of the examined training rows
    (shared edges, each normalised to a fraction of its rows), with the threshold below which a row is suspect."""
    fig = _figure(5.6, 3.4)
    ax = fig.add_subplot()
    for i, (name, h) in enumerate((("held-out (clean reference)", clean), ("training rows examined", examined))):
        counts = np.asarray(h["counts"], dtype=float)
        frac = counts / counts.sum() if counts.sum() else counts
        _bars(ax, h["edges"], frac, alpha=0.55, color=("#2ca02c", "#d62728")[i], label=name)
    ax.axvline(threshold, color="#333333", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f} bits")
    ax.set_xlabel("mean entropy of superimposed inputs (bits)")
    ax.set_ylabel("fraction of rows")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left")
    return _svg(fig, "audit-strip", "STRIP entropy distributions")


def trigger_norms(norms: Sequence[float], median: float, flagged: Sequence[int], suspected: Optional[int],
                  classes: Sequence[str]) -> str:
    """The L1 norm of each class's smallest reconstructed trigger mask; flagged classes (anomaly index > 2,
    below the median) in red, the median dashed. A backdoor target needs an abnormally small trigger."""
    fig = _figure(6.0, 3.4)
    ax = fig.add_subplot()
    x = np.arange(len(norms))
    colors = ["#d62728" if t in set(flagged) else "#7f7f7f" for t in range(len(norms))]
    ax.bar(x, norms, color=colors)
    ax.axhline(median, color="#333333", linestyle="--", linewidth=1, label=f"median {median:.3g}")
    ax.set_xticks(x, classes, fontsize=8 if len(classes) <= 20 else 6)
    ax.set_xlabel("target class" + (f" (suspected: {suspected})" if suspected is not None else " (none flagged)"))
    ax.set_ylabel("trigger mask L1")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper right")
    return _svg(fig, "audit-triggers", "reconstructed trigger size per class")
