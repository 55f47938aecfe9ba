"""``report.html``: one self-contained HTML page of a run directory (`kdistill report RUN_DIR`, and written at the
end of every run by `kdistill.tasks.job.RunDir.write_summary`).

The page works offline: no script, no stylesheet, font or image from anywhere; plots are inline SVG (matplotlib,
`kdistill.report.plots`); a Content-Security-Policy forbids every external load. The CSS keeps it readable from
phone to laptop width (tables scroll horizontally, plots scale to the column). Sections (`sections`,
`examples`): the comparison table, training curves, quality against bytes and latency, and per task the
calibration / per-class / disagreement / audit sections (classification), perplexity and token agreement (causal LM),
the similarity scatter (sentence embeddings); a section without data for the run says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from kdistill.files import atomic_write_bytes
from kdistill.report import examples, plots, sections
from kdistill.report.audit import audit
from kdistill.report.markup import Section, esc
from kdistill.report.runfiles import RunFiles, read_run

__all__ = ["REPORT_FILE", "build_report", "render", "write_report"]

REPORT_FILE = "report.html"

CSS = """
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0 auto;max-width:1200px;padding:1rem;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif;color:#1d1d1f;background:#fff;overflow-wrap:anywhere}
h1{font-size:1.5rem;margin:.2rem 0 .4rem}h2{font-size:1.2rem;margin:1.8rem 0 .6rem;border-bottom:1px solid #ddd}
.meta{color:#555;margin:0 0 .6rem}.notice{background:#fff4d6;border:1px solid #e6c36a;padding:.5rem .7rem}
nav ul{display:flex;flex-wrap:wrap;gap:.3rem 1rem;padding:0;margin:.4rem 0;list-style:none}
nav a{color:#0b57d0}
.scroll{overflow-x:auto;max-width:100%;margin:.6rem 0;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;font-size:.9rem;min-width:max-content}
caption{caption-side:bottom;text-align:left;color:#666;font-size:.8rem;padding-top:.3rem}
th,td{padding:.3rem .6rem;border-bottom:1px solid #e5e5e5;text-align:left;white-space:nowrap}
th{background:#f5f5f7;position:sticky;top:0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,460px),1fr));gap:1rem}
figure{margin:.6rem 0;min-width:0}figcaption{color:#666;font-size:.8rem}
svg.plot{display:block;max-width:100%;height:auto}
.nodata{color:#666;font-style:italic}
footer{margin-top:2rem;color:#777;font-size:.8rem}
@media (max-width:600px){body{padding:.6rem;font-size:14px}th,td{padding:.25rem .4rem}}
"""

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src 'none'; script-src 'none'"


def run_sections(run: RunFiles) -> list[Section]:
    """The sections of this run's task, in page order."""
    found = [sections.comparison(run), sections.curves(run), sections.pareto(run)]
    if run.task == "classification":
        found += [examples.calibration(run), examples.per_class(run), examples.disagreements(run), audit(run)]
    elif run.task == "causal_lm":
        found.append(examples.language_model(run))
    elif run.task == "sentence_embedding":
        found.append(examples.embeddings(run))
    return found


def render(run: RunFiles) -> tuple[str, list[str]]:
    """(the page, notes for the user: e.g. plots left out without matplotlib)."""
    notes = [] if plots.available() else [plots.INSTALL_HINT]
    parts = run_sections(run)
    s = run.summary
    meta = [f"task {run.task}"] + ([f"scheme {run.scheme}"] if run.task == "classification" else [])
    dataset = s.get("dataset") or (run.config.get("data") or {}).get("name")
    if dataset:
        meta.append(f"dataset {dataset}")
    inputs = [name for name in ("summary.json", "metrics.jsonl", "config.yaml", "predictions.safetensors",
                                "similarities.safetensors") if (run.path / name).is_file()]
    nav = "".join(f'<li><a href="#{esc(p.id)}">{esc(p.title)}</a></li>' for p in parts)
    empty = [p.title for p in parts if not p.has_data]
    notice = "".join(f'<p class="notice">{esc(n)}</p>' for n in notes)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>kdistill report: {esc(run.path.name)}</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>kdistill report: {esc(run.path.name)}</h1>
<p class="meta">{esc(" · ".join(meta))}</p>
{notice}
<nav><ul>{nav}</ul></nav>
</header>
<main>
{"".join(p.html() for p in parts)}
</main>
<footer>
<p>Built from {esc(", ".join(inputs))} in {esc(str(run.path))}{
    f"; sections without data for this run: {esc(', '.join(empty))}" if empty else ""}.</p>
<p>Self-contained: no scripts and no external requests; plots are inline SVG. Regenerate with
<code>kdistill report {esc(str(run.path))}</code>.</p>
</footer>
</body>
</html>
"""
    return page, notes


def build_report(run_dir: Union[str, Path]) -> tuple[str, list[str]]:
    """(HTML text, notes) of the run directory `run_dir` (a `KDError` for a missing or unfinished run)."""
    return render(read_run(Path(run_dir)))


def write_report(run_dir: Union[str, Path], out: Optional[Union[str, Path]] = None) -> tuple[Path, list[str]]:
    """Write the report of `run_dir` to `out` (default ``RUN_DIR/report.html``) atomically; returns (path, notes)."""
    page, notes = build_report(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
    atomic_write_bytes(path, page.encode("utf-8"))
    return path, notes
