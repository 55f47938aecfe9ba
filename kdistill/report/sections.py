"""The report's sections that every task has: the comparison table, training curves, quality against cost.

Each function takes the run's files (`kdistill.report.runfiles.RunFiles`) and returns a `Section`; a section
whose data this run lacks says so in one plain sentence.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from kdistill.report import plots
from kdistill.report.markup import Cell, Section, esc, nodata, num, table
from kdistill.report.runfiles import RunFiles

__all__ = ["comparison", "curves", "figure", "metric_of", "pareto", "quality_cost_points"]

# the quality number of each task's deployed rows, and whether lower is better
TASK_METRIC = {"classification": ("accuracy", False), "causal_lm": ("perplexity", True),
               "sentence_embedding": ("spearman", False)}
_ROW_KEYS = {"name", "runtime", "file", "bytes", "agreement", "latency_ms_b1", "latency_ms_b32", "throughput",
             "threads", "by_threads", "batch_sizes", "params", "flops"}


def figure(draw: Callable[..., str], *args: Any, caption: str = "", **kwargs: Any) -> str:
    """A plot as ``<figure>`` (empty when matplotlib is missing: the page says so once, at the top)."""
    if not plots.available():
        return ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure>{draw(*args, **kwargs)}{cap}</figure>"


def metric_of(run: RunFiles) -> tuple[str, bool]:
    """(quality key of the deployed rows, lower is better) for this run's task."""
    key, lower = TASK_METRIC.get(run.task, ("accuracy", False))
    rows = run.summary.get("deployed") or []
    if rows and key not in rows[0]:  # another metric: the first numeric quality column
        extra = [k for k, v in rows[0].items() if k not in _ROW_KEYS and isinstance(v, (int, float))]
        key = extra[0] if extra else key
    return key, lower


def _model_rows(run: RunFiles) -> list[list]:
    """Rows of the models a run trained, from the summary (the task's own columns)."""
    s, rows = run.summary, []
    if run.task == "causal_lm":
        for label, key, params in (("teacher", "teacher_ppl", "params_teacher"),
                                   ("student, initial (teacher layers)", "student_init_ppl", "params_student"),
                                   ("student, next-token CE", "student_ce_ppl", "params_student"),
                                   ("student, KD", "student_kd_ppl", "params_student")):
            rows.append([label, "torch", num(s, key, ".3f"), Cell("-"), Cell("-"), Cell("-"),
                         num(s, params, count=True), Cell("-"), Cell("-"), Cell("-"), Cell("-")])
        return rows
    if run.task == "sentence_embedding":
        for name in ("teacher", "student", "scratch", "untrained"):
            if name not in (s.get("models") or {}):
                continue
            metric = Cell("1 (itself)") if name == "teacher" else num(s, f"models/{name}/spearman", ".4f")
            lat = num(s, f"latency/1/{name}_ms", ".2f") if name in ("teacher", "student") else Cell("-")
            rows.append([name, "torch", metric, Cell("-"), num(s, f"models/{name}/probe/accuracy", ".2f", scale=100),
                         Cell("-"), num(s, f"models/{name}/params", count=True), Cell("-"), lat, Cell("-"),
                         Cell("-")])
        return rows
    labels = {"teacher": "teacher", "baseline": "student, no teacher", "student": "student, KD"}
    names = [n for n in labels if isinstance(s.get(n), dict)] if "teacher" in s and "student" in s else []
    entries = [(labels[n], n) for n in names] + [(n, f"models/{n}") for n in (s.get("models") or {})]
    for label, src in entries:
        rows.append([label, "torch", num(s, f"{src}/accuracy", ".2f", scale=100),
                     num(s, f"{src}/agreement", ".2f", scale=100), num(s, f"{src}/ece", ".4f"),
                     num(s, f"{src}/bytes", count=True), num(s, f"{src}/params", count=True),
                     num(s, f"{src}/flops", count=True), num(s, f"{src}/latency_ms", ".3f"), Cell("-"),
                     num(s, f"{src}/throughput", ".0f")])
    return rows


def comparison(run: RunFiles) -> Section:
    """Teacher, baseline, student (the task's own rows) and every ``deployed`` row: quality, agreement, bytes,
    params, FLOPs, latency at batch 1 and 32, throughput."""
    s = run.summary
    key, lower = metric_of(run)
    third = {"classification": "ECE", "sentence_embedding": "probe acc %"}.get(run.task, "-")
    metric_name = {"accuracy": "top-1 %", "perplexity": "perplexity", "spearman": "spearman vs teacher"}.get(key, key)
    headers = ["model", "runtime", metric_name, "agreement %", third, "bytes", "params", "FLOPs", "latency b1 ms",
               "latency b32 ms", "samples/s"]
    rows = _model_rows(run)
    scale, fmt = (100, ".2f") if key == "accuracy" else (1, ".4f")
    for i, row in enumerate(s.get("deployed") or []):
        src = f"deployed/{i}"
        rows.append([f"{row.get('name')} (deployed)", str(row.get("runtime", "-")), num(s, f"{src}/{key}", fmt,
                     scale=scale), num(s, f"{src}/agreement", ".2f", scale=100), Cell("-"),
                     num(s, f"{src}/bytes", count=True), num(s, f"{src}/params", count=True),
                     num(s, f"{src}/flops", count=True), num(s, f"{src}/latency_ms_b1", ".3f"),
                     num(s, f"{src}/latency_ms_b32", ".3f"), num(s, f"{src}/throughput", ".0f")])
    if not rows:
        return Section("comparison", "Comparison", nodata("summary.json holds no model rows for this run."), False)
    used = [i for i in range(len(headers)) if i < 2 or any(isinstance(r[i], Cell) and r[i].text != "-"
                                                            for r in rows)]
    body = table([headers[i] for i in used], [[r[i] for i in used] for r in rows],
                 caption="every number from summary.json; deployed rows: each artifact timed on its own runtime")
    notes = []
    for label, src, fmt_ in (("retention", "retention", ".3f"), ("compression", "compression", ".2f"),
                             ("speedup", "speedup", ".2f"), ("probe retention", "probe_retention", ".3f"),
                             ("KD / CE perplexity ratio", "kd_over_ce_ppl", ".3f")):
        cell = num(s, src, fmt_)
        if cell.src is not None:
            notes.append(f'{esc(label)} <span class="num" data-src="{esc(src)}" '
                         f'data-value="{esc(cell.value)}">{esc(cell.text)}</span>')
    if not s.get("deployed"):
        notes.append("no deployed rows in this run (add an export: or compress: section to the config to measure "
                     "artifacts on their runtime)")
    if lower:
        notes.append(f"{esc(metric_name)}: lower is better")
    return Section("comparison", "Comparison", body + (f"<p>{' · '.join(notes)}</p>" if notes else ""))


def curves(run: RunFiles) -> Section:
    """Per stage: every logged loss term and the total against the step (``metrics.jsonl``), with the
    evaluations made during training."""
    stages: dict[str, dict] = {}
    for rec in run.metrics:
        stage = rec.get("stage")
        if not isinstance(stage, str):
            continue
        entry = stages.setdefault(stage, {"steps": [], "terms": {}, "evals": {}})
        if isinstance(rec.get("terms"), dict):
            n = len(entry["steps"])
            entry["steps"].append(rec.get("step", n))
            values = {**{k: v for k, v in rec["terms"].items() if isinstance(v, (int, float))},
                      **({"loss": rec["loss"]} if isinstance(rec.get("loss"), (int, float)) else {})}
            for name in set(entry["terms"]) | set(values):
                entry["terms"].setdefault(name, [None] * n).append(values.get(name))
        elif isinstance(rec.get("eval"), dict):
            for name, value in rec["eval"].items():
                if isinstance(value, (int, float)):
                    at, vals = entry["evals"].setdefault(name, ([], []))
                    at.append(rec.get("step"))
                    vals.append(value)
    stages = {k: v for k, v in stages.items() if v["steps"]}
    if not stages:
        return Section("curves", "Training curves",
                       nodata("metrics.jsonl holds no loss records for this run (no stage trained in this run "
                              "directory, or its metrics.jsonl was removed)."), False)
    parts = [figure(plots.curves, name, e["steps"], e["terms"], e["evals"],
                    caption=f"stage {name}: {len(e['steps'])} log points, terms: {', '.join(sorted(e['terms']))}")
             for name, e in stages.items()]
    listing = table(["stage", "log points", "last step", "terms"],
                    [[name, str(len(e["steps"])), str(e["steps"][-1]), ", ".join(sorted(e["terms"]))]
                     for name, e in stages.items()])
    return Section("curves", "Training curves", f'<div class="figs">{"".join(parts)}</div>{listing}')


def quality_cost_points(run: RunFiles, cost: str) -> list[tuple[str, float, float]]:
    """``(label, cost, quality)`` of every deployed row with both numbers, plus the summary's own teacher,
    baseline and student (classification) when no deployed row has their name. `cost`: 'bytes' or 'latency'."""
    key, _ = metric_of(run)
    s, points, seen = run.summary, [], set()
    for row in s.get("deployed") or []:
        x = row.get("bytes") if cost == "bytes" else row.get("latency_ms_b1")
        y = row.get(key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            points.append((str(row.get("name")), float(x), float(y)))
            seen.add(str(row.get("name")))
    if run.task == "classification":
        for name in ("teacher", "baseline", "student"):
            m = s.get(name)
            if isinstance(m, dict) and name not in seen:
                x = m.get("bytes") if cost == "bytes" else m.get("latency_ms")
                if isinstance(x, (int, float)) and isinstance(m.get("accuracy"), (int, float)):
                    points.append((name, float(x), float(m["accuracy"])))
    return points


def pareto(run: RunFiles) -> Section:
    """The task's quality against bytes and against batch-1 latency, Pareto front marked."""
    key, lower = metric_of(run)
    label = {"accuracy": "top-1 accuracy"}.get(key, key)
    parts, missing = [], []
    for cost, xlabel in (("bytes", "bytes on disk"), ("latency", "latency at batch 1 (ms)")):
        points = quality_cost_points(run, cost)
        if len(points) >= 2:
            parts.append(figure(plots.pareto, points, xlabel, label, lower_is_better=lower, name=f"pareto-{cost}",
                                caption=f"{label} against {xlabel}: filled points are on the Pareto front"))
        else:
            missing.append(xlabel)
    if not parts:
        return Section("pareto", f"{label.capitalize()} against cost",
                       nodata(f"this run's summary.json has no {' or '.join(missing)} for two or more models (they "
                              "are measured for deployed rows: add an export: section to the config)."), False)
    note = nodata(f"no {' or '.join(missing)} for two or more models in this run.") if missing else ""
    return Section("pareto", f"{label.capitalize()} against cost", f'<div class="figs">{"".join(parts)}</div>{note}')

