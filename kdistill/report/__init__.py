"""Reports of a run: the table printed after a classification run (plain text, fits an 100-column terminal)
here, and the self-contained HTML report of any run directory in `kdistill.report.html` (``report.html``,
`kdistill report RUN_DIR`).

`summary_table(summary)` picks the form: the offline comparison (teacher, baseline, KD student with cost
columns) or, for every other scheme, one row per model the scheme evaluated. Both are drawn by `text_table`.
"""

from __future__ import annotations

from typing import Sequence


def _fmt_int(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt(m: dict, key: str, fmt) -> str:
    return fmt(m[key]) if key in m else "-"


def text_table(rows: Sequence[Sequence[str]], footer: str) -> str:
    """Columns aligned (the first left, the others right), a rule under the header row, then `footer`."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("-" * len(lines[0]))
    lines.append(footer)
    return "\n".join(lines)


def comparison_table(summary: dict) -> str:
    """The offline run: teacher, student without teacher, KD student; quality and cost."""
    rows = [("model", "top-1 %", "agree %", "ECE", "params", "bytes", "FLOPs", "lat ms", "samples/s")]
    for name in ("teacher", "baseline", "student"):
        m = summary.get(name)
        if not m:
            continue
        label = {"teacher": "teacher", "baseline": "student, no teacher", "student": "student, KD"}[name]
        rows.append((label, f"{100 * m['accuracy']:.1f}", _fmt(m, "agreement", lambda v: f"{100 * v:.1f}"),
                     f"{m['ece']:.3f}", _fmt_int(m["params"]), _fmt_int(m["bytes"]), _fmt_int(m["flops"]),
                     f"{m['latency_ms']:.3f}", _fmt_int(m["throughput"])))
    return text_table(rows, f"retention {summary['retention']:.3f}   compression {summary['compression']:.2f}x   "
                            f"speedup {summary['speedup']:.2f}x   (dataset: {summary.get('dataset', '?')})"
                            f"{_cost_note(summary)}")


def _cost_note(summary: dict) -> str:
    """Where the latency columns come from: the thread count, the speedup's spread and at the other counts."""
    cost = summary.get("cost")
    if not cost:
        return ""
    primary = cost["primary_threads"]
    others = "".join(f"; at {c} threads: speedup {r['ratio']:.2f}x" for c, r in cost["speedup_by_threads"].items()
                     if c != str(primary))
    return (f"\nlatency and samples/s at {primary} thread{'s' if primary > 1 else ''} (speedup spread between rounds "
            f"{100 * summary.get('speedup_spread', 0):.0f}%){others}")


def models_table(summary: dict) -> str:
    """Every evaluated model of a scheme's summary (``summary["models"]``)."""
    rows = [("model", "top-1 %", "agree %", "ECE", "params")]
    for label, m in summary.get("models", {}).items():
        rows.append((label, f"{100 * m['accuracy']:.1f}", _fmt(m, "agreement", lambda v: f"{100 * v:.1f}"),
                     _fmt(m, "ece", lambda v: f"{v:.3f}"), _fmt(m, "params", lambda v: f"{v:,}")))
    return text_table(rows, f"(scheme: {summary.get('scheme', '?')}, dataset: {summary.get('dataset', '?')})")


def summary_table(summary: dict) -> str:
    """The table of a classification run's summary, whatever its scheme."""
    if summary.get("scheme", "offline") == "offline" and "teacher" in summary and "student" in summary:
        table = comparison_table(summary)
    else:
        table = models_table(summary)
    return table + with_deployed(summary)


def with_deployed(summary: dict) -> str:
    """The ``deployed`` rows of a summary (compressed / exported artifacts on their runtime) as a second table,
    or '' when there are none. Every task's table ends with it."""
    if not summary.get("deployed"):
        return ""
    from kdistill.evaluate.deploy import deployed_table

    return "\n\ndeployed (each artifact on its runtime, timed interleaved):\n" + deployed_table(summary["deployed"])


__all__ = ["comparison_table", "models_table", "summary_table", "text_table", "with_deployed"]
