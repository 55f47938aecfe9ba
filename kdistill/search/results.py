"""What a search leaves in OUT: ``search.json`` (every trial, the Pareto front, the best trial), ``best.yaml``
(the best trial's resolved config: ``kdistill run best.yaml`` reproduces its metric) and ``report.html``.

The best trial is chosen among the finished trials that meet every constraint: the Pareto front of the
objectives (Optuna's ``best_trials``, which leaves infeasible trials out), then the one best in the first
objective (top1), ties broken by the next objectives, then by the lower trial number.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from kdistill.files import atomic_write_bytes
from kdistill.search.config import DIRECTIONS

__all__ = ["SEARCH_FILE", "BEST_FILE", "collect", "load_record", "pick_best", "write_results", "results_table"]

SEARCH_FILE, BEST_FILE = "search.json", "best.yaml"


def _trial_record(t, constraints) -> dict:
    metrics = t.user_attrs.get("metrics")
    violations = [c.violation(float(metrics[c.metric])) for c in constraints] if metrics else None
    return {"number": t.number, "state": t.state.name, "values": t.user_attrs.get("values"), "metrics": metrics,
            "violations": violations, "feasible": bool(metrics) and all(v <= 0 for v in violations or []),
            "run_dir": t.user_attrs.get("run_dir"), "worker": t.user_attrs.get("worker"),
            "error": t.user_attrs.get("error"), "requeued_from": t.user_attrs.get("requeued_from"),
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start else None}


def pick_best(trials: list[dict], objectives: list[str], front: Optional[list[int]] = None) -> Optional[dict]:
    """The best feasible finished trial (see the module docstring); None when there is none."""
    pool = [t for t in trials if t["state"] == "COMPLETE" and t["feasible"]
            and (front is None or t["number"] in front)]
    if not pool:
        return None

    def key(t):
        signs = [1 if DIRECTIONS[o] == "maximize" else -1 for o in objectives]
        return tuple(s * t["metrics"][o] for s, o in zip(signs, objectives)) + (-t["number"],)

    return max(pool, key=key)


def collect(study, plan) -> dict:
    """The search record of the study in its storage."""
    constraints = plan.constraints
    trials = [_trial_record(t, constraints) for t in study.get_trials(deepcopy=False)]
    front = sorted(t.number for t in study.best_trials) if any(t["state"] == "COMPLETE" for t in trials) else []
    # Optuna's front leaves infeasible trials out; without any constraint every finished trial is feasible
    front = [n for n in front if next(t for t in trials if t["number"] == n)["feasible"]]
    best = pick_best(trials, plan.search.objectives, front)
    counts: dict = {}
    for t in trials:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    return {"study": plan.search.study_name, "storage": plan.storage, "config": plan.source, "out": str(plan.out),
            "objectives": plan.search.objectives, "directions": plan.search.directions(),
            "constraints": [str(c) for c in constraints], "space": plan.search.model_dump(mode="json")["space"],
            "counts": counts, "trials": trials, "pareto": front,
            "best": None if best is None else {**best, "config": str(plan.out / BEST_FILE)},
            "teacher": plan.base.get("teacher", {}).get("weights") if plan.teacher_dir else None}


def write_results(record: dict, plan, task=None) -> None:
    """search.json, best.yaml (when a feasible trial exists; removed otherwise) and report.html in OUT."""
    out = Path(plan.out)
    best_path = out / BEST_FILE
    if record["best"] is not None:
        source = Path(record["best"]["run_dir"]) / "config.yaml"
        text = (f"# the best trial ({record['best']['number']}) of the search in {out}: "
                f"{', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in record['best']['metrics'].items() if k in ('top1', 'latency_ms', 'bytes'))}\n"
                + source.read_text())
        atomic_write_bytes(best_path, text.encode())
    elif best_path.is_file():
        best_path.unlink()
    atomic_write_bytes(out / SEARCH_FILE, (json.dumps(record, indent=1, default=str) + "\n").encode())
    from kdistill.search.report import write_search_report

    write_search_report(record, out)


def load_record(out) -> dict:
    return json.loads((Path(out) / SEARCH_FILE).read_text())


def results_table(record: dict, limit: int = 12) -> str:
    """The finished trials, best first, as a text table; then the best trial and where its config is."""
    from kdistill.report import text_table

    done = [t for t in record["trials"] if t["state"] == "COMPLETE"]
    best = record["best"]
    order = sorted(done, key=lambda t: (not t["feasible"], -t["metrics"]["top1"], t["metrics"]["latency_ms"]))
    rows = [("trial", "top-1 %", "lat ms", "bytes", "feasible", "Pareto", "values")]
    for t in order[:limit]:
        m = t["metrics"]
        values = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["values"].items())
        rows.append((str(t["number"]) + (" *" if best and best["number"] == t["number"] else ""),
                     f"{100 * m['top1']:.1f}", f"{m['latency_ms']:.3f}", str(m["bytes"]),
                     "yes" if t["feasible"] else "no", "yes" if t["number"] in record["pareto"] else "",
                     values if len(values) < 60 else values[:57] + "..."))
    counts = ", ".join(f"{n} {k.lower()}" for k, n in sorted(record["counts"].items()))
    tail = f"trials: {counts}" + (f"; constraints: {', '.join(record['constraints'])}" if record["constraints"] else "")
    if best is None:
        tail += "\nno finished trial meets the constraints: no best.yaml"
    else:
        tail += f"\nbest: trial {best['number']} -> {best['config']}"
    return text_table(rows, tail)


def copy_best_run(record: dict, dest: Path) -> None:  # pragma: no cover - convenience for users
    shutil.copytree(record["best"]["run_dir"], dest)
