"""``OUT/report.html`` of a search: the trials against the cost objective (or constraint) with the Pareto front,
the constraint line and the best trial marked; the best configuration; a table of every trial. Self-contained like
a run's report (inline SVG from matplotlib, no scripts, no external requests)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from kdistill.files import atomic_write_bytes
from kdistill.report import plots
from kdistill.report.html import CSP, CSS
from kdistill.report.markup import Section, esc, nodata, table

__all__ = ["cost_axis", "scatter", "write_search_report"]


def cost_axis(record: dict) -> Optional[str]:
    """The metric the scatter's x axis shows: the first cost objective, else the first cost constraint."""
    for name in list(record["objectives"]) + [c.split("<")[0].split(">")[0] for c in record["constraints"]]:
        if name in ("latency_ms", "bytes", "params"):
            return name
    return None


def scatter(record: dict, x_metric: str) -> str:
    """top1 against `x_metric` of every finished trial: feasible ones filled, infeasible ones as crosses, the
    Pareto front joined, the best trial starred, each constraint on the axes drawn as a dashed line."""
    fig = plots._figure()
    ax = fig.add_subplot()
    done = [t for t in record["trials"] if t["state"] == "COMPLETE"]
    feasible = [t for t in done if t["feasible"]]
    other = [t for t in done if not t["feasible"]]
    if feasible:
        ax.scatter([t["metrics"][x_metric] for t in feasible], [t["metrics"]["top1"] for t in feasible], s=30,
                   color="#1f77b4", label="trial (feasible)", zorder=2)
    if other:
        ax.scatter([t["metrics"][x_metric] for t in other], [t["metrics"]["top1"] for t in other], s=30,
                   marker="x", color="#999999", label="trial (breaks a constraint)", zorder=2)
    front = sorted((t["metrics"][x_metric], t["metrics"]["top1"]) for t in feasible
                   if t["number"] in record["pareto"])
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="#d62728", linewidth=1, label="Pareto front", zorder=1)
    best = record["best"]
    if best is not None:
        ax.scatter([best["metrics"][x_metric]], [best["metrics"]["top1"]], s=160, marker="*", color="#d62728",
                   label=f"best (trial {best['number']})", zorder=3)
    for text in record["constraints"]:
        metric = text.split("<")[0].split(">")[0]
        bound = float(text.replace(">=", "<=").split("<=")[1])
        if metric == x_metric:
            ax.axvline(bound, linestyle="--", color="#ff7f0e", label=f"constraint {text}")
        elif metric == "top1":
            ax.axhline(bound, linestyle="--", color="#ff7f0e", label=f"constraint {text}")
    ax.set_xlabel(f"{x_metric} (lower is better)")
    ax.set_ylabel("top-1 accuracy of the deployed model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return plots._svg(fig, "search-trials", f"top-1 against {x_metric} of every trial")


def _trials_table(record: dict) -> str:
    rows = []
    for t in record["trials"]:
        m = t["metrics"] or {}
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in (t["values"] or {}).items())
        rows.append([str(t["number"]), t["state"].lower(), f"{100 * m['top1']:.2f}" if m else "-",
                     f"{m['latency_ms']:.4f}" if m else "-", str(m.get("bytes", "-")),
                     "yes" if t["feasible"] else ("no" if m else "-"),
                     "yes" if t["number"] in record["pareto"] else "", values, t.get("error") or ""])
    return table(["trial", "state", "top-1 %", "latency ms", "bytes", "feasible", "Pareto", "values", "error"], rows)


def render(record: dict, out: Path) -> str:
    best = record["best"]
    x_metric = cost_axis(record)
    parts = []
    if x_metric and plots.available() and any(t["state"] == "COMPLETE" for t in record["trials"]):
        body = f"<figure>{scatter(record, x_metric)}<figcaption>each finished trial's deployed model; constraints " \
               f"{esc(', '.join(record['constraints']) or 'none')}</figcaption></figure>"
    else:
        body = nodata("no cost objective or constraint (latency_ms, bytes), or no finished trial, or matplotlib "
                      "is not installed: see the table")
    parts.append(Section("trials-plot", "Trials and Pareto front", body, x_metric is not None))
    if best is not None:
        config = Path(best["config"]).read_text() if Path(best["config"]).is_file() else ""
        values = yaml.safe_dump(best["values"], sort_keys=False, default_flow_style=None)
        body = (f"<p>trial {best['number']}: top-1 {100 * best['metrics']['top1']:.2f} %, latency "
                f"{best['metrics']['latency_ms']:.4f} ms, {best['metrics']['bytes']} bytes "
                f"({esc(best['metrics'].get('artifact', ''))} on {esc(best['metrics'].get('runtime', ''))}). "
                f"Reproduce: <code>kdistill run {esc(best['config'])}</code></p><h3>searched values</h3>"
                f"<pre>{esc(values)}</pre><details><summary>best.yaml</summary><pre>{esc(config)}</pre></details>")
    else:
        body = nodata("no finished trial meets the constraints")
    parts.append(Section("best", "Best configuration", body, best is not None))
    parts.append(Section("trials", "All trials", _trials_table(record), bool(record["trials"])))
    counts = ", ".join(f"{n} {k.lower()}" for k, n in sorted(record["counts"].items()))
    meta = (f"objectives {', '.join(f'{o} ({d})' for o, d in zip(record['objectives'], record['directions']))}"
            f" · trials: {counts} · storage {record['storage']}")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>kdistill search: {esc(out.name)}</title>
<style>{CSS}</style>
</head>
<body>
<header><h1>kdistill search: {esc(out.name)}</h1><p class="meta">{esc(meta)}</p></header>
<main>
{"".join(p.html() for p in parts)}
</main>
<footer><p>Built from {esc(str(out / 'search.json'))}; each trial's own report: kdistill report
OUT/trials/NNNN.</p></footer>
</body>
</html>
"""


def write_search_report(record: dict, out: Path) -> Path:
    path = Path(out) / "report.html"
    atomic_write_bytes(path, render(record, Path(out)).encode("utf-8"))
    return path
