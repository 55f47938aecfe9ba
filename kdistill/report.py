"""The comparison table printed after a run (plain text, fits an 100-column terminal)."""

from __future__ import annotations


def _fmt_int(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def comparison_table(summary: dict) -> str:
    rows = [("model", "top-1 %", "agree %", "ECE", "params", "bytes", "FLOPs", "lat ms", "samples/s")]
    for name in ("teacher", "baseline", "student"):
        m = summary.get(name)
        if not m:
            continue
        label = {"teacher": "teacher", "baseline": "student, no teacher", "student": "student, KD"}[name]
        agree = f"{100 * m['agreement']:.1f}" if "agreement" in m else "-"
        rows.append((label, f"{100 * m['accuracy']:.1f}", agree, f"{m['ece']:.3f}", _fmt_int(m["params"]),
                     _fmt_int(m["bytes"]), _fmt_int(m["flops"]), f"{m['latency_ms']:.3f}",
                     _fmt_int(m["throughput"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("-" * len(lines[0]))
    lines.append(f"retention {summary['retention']:.3f}   compression {summary['compression']:.2f}x   "
                 f"speedup {summary['speedup']:.2f}x   (dataset: {summary.get('dataset', '?')})")
    return "\n".join(lines)
