"""The report's "Audit" section (classification): the teacher audit's numbers and what the student inherited,
from the summary's ``audit`` entry (`kdistill.audit.stage.audit_record_for_summary`); nothing is re-measured.
A run without an ``audit:`` section says so plainly."""

from __future__ import annotations

import json

from kdistill.report import audit_plots, plots
from kdistill.report.markup import Cell, Section, esc, nodata, num, table
from kdistill.report.runfiles import RunFiles
from kdistill.report.sections import figure

__all__ = ["audit"]

NO_AUDIT = ("no teacher audit ran for this run: add an audit: section to the config (docs/audit.md) to audit the "
            "teacher before distillation and measure what the student inherits, or run 'kdistill audit CONFIG'.")


def audit(run: RunFiles) -> Section:
    entry = run.summary.get("audit")
    if not isinstance(entry, dict) or not entry.get("ran"):
        text = NO_AUDIT
        if (run.path / "audit.json").is_file():
            text += (" This folder holds an audit.json written by 'kdistill audit'; the run itself measured no "
                     "inheritance.")
        return Section("audit", "Audit", nodata(text), False)
    s = run.summary
    verdict = "passed" if entry.get("passed") else "failed: " + "; ".join(entry.get("violations") or [])
    suspected = entry.get("suspected_class")
    rows = []
    if "backdoor_flagged" in entry:
        rows.append([f"backdoor verdict (rule {entry.get('backdoor_rule')})",
                     Cell(f"suspected, target class {entry.get('backdoor_class')}" if entry["backdoor_flagged"]
                          else "not flagged")])
    rows += [["held-out top-1 %", num(s, "audit/accuracy", ".2f", scale=100)],
            ["ECE", num(s, "audit/ece", ".4f")],
            [f"label-noise suspects (p >= {entry.get('label_noise_threshold')}, another class)",
             num(s, "audit/label_noise_count", count=True)],
            ["label-noise suspect fraction %", num(s, "audit/label_noise_fraction", ".2f", scale=100)],
            ["STRIP: training rows below the clean threshold %", num(s, "audit/strip_fraction_below", ".2f",
                                                                    scale=100)],
            ["STRIP: expected on clean data %", num(s, "audit/strip_expected_fraction", ".2f", scale=100)],
            ["STRIP: suspected class (the low-entropy rows' class)",
             Cell("none" if entry.get("strip_suspected_class") is None else str(entry["strip_suspected_class"]))],
            ["Neural Cleanse: smallest trigger's class", num(s, "audit/min_norm_class", count=True)],
            ["Neural Cleanse: anomaly index of the smallest trigger", num(s, "audit/anomaly_score", ".3f")],
            ["Neural Cleanse: suspected class (index > 2)",
             num(s, "audit/suspected_class", count=True) if suspected is not None else Cell("none")],
            ["reconstructed trigger: class, mask L1",
             Cell(f"{entry.get('trigger_class')}, {entry.get('trigger_l1', float('nan')):.3f}")]]
    body = (f"<p>Teacher audit of <b>{esc(entry.get('model', 'teacher'))}</b> before distillation: "
            f"<b>{esc(verdict)}</b> (every number: {esc(entry.get('file', 'audit.json'))}; definitions: "
            f"docs/audit.md).</p>")
    body += table(["measurement", "value"], rows, caption="measured on the teacher before the student stages")
    inherit = entry.get("inheritance") or {}
    trig, noise = inherit.get("trigger") or {}, inherit.get("label_noise") or {}
    models = list((trig.get("success") or {}).keys())
    if models:
        base = "audit/inheritance"
        inherit_rows = [[name, num(s, f"{base}/trigger/success/{name}", ".2f", scale=100),
                         num(s, f"{base}/trigger/clean_rate/{name}", ".2f", scale=100),
                         num(s, f"{base}/label_noise/teacher_class/{name}", ".2f", scale=100),
                         num(s, f"{base}/label_noise/label/{name}", ".2f", scale=100)] for name in models]
        what = "suspected" if trig.get("suspected") else "smallest (no class flagged)"
        body += table(["model", f"trigger -> class {trig.get('class')} %", "same rows, no trigger %",
                       "suspects: teacher's class %", "suspects: label %"], inherit_rows,
                      caption=f"inheritance: the {what} reconstructed trigger applied to {trig.get('rows')} held-out "
                              f"rows of other classes; the {noise.get('rows')} label-noise suspect training rows "
                              "(a student copying its teacher's confident disagreement gives the teacher's class)")
    return Section("audit", "Audit", body + _figures(run, entry))


def _figures(run: RunFiles, entry: dict) -> str:
    """Plots of the full record in the run's ``audit.json`` (nothing when it is missing or unreadable)."""
    try:
        record = json.loads((run.path / str(entry.get("file") or "audit.json")).read_text())
        test, strip, nc = record["test"], record["strip"], record["neural_cleanse"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    classes = [str(c) for c in range(len(nc["norms"]))]
    bins = dict(test["reliability"], ece=test["ece"])
    out = figure(audit_plots.confidence_histogram, test["confidence_histogram"]["edges"],
                 test["confidence_histogram"]["counts"],
                 caption="teacher: held-out rows per confidence bin (audit.json test.confidence_histogram)")
    out += figure(plots.reliability, {record.get("model", "teacher"): bins}, name="audit-reliability",
                  caption="teacher reliability on the held-out rows (audit.json test.reliability)")
    out += figure(audit_plots.strip_entropy, strip["clean_entropy"]["histogram"],
                  strip["examined_entropy"]["histogram"], strip["threshold_bits"],
                  caption=f"STRIP: {100 * strip['fraction_below']:.2f} % of the examined training rows fall below "
                          f"the clean threshold (expected {100 * strip['expected_fraction']:.2f} %)")
    out += figure(audit_plots.trigger_norms, nc["norms"], nc["median"], nc["flagged"], nc["suspected_class"], classes,
                  caption="reconstructed trigger size per target class (audit.json neural_cleanse.norms)")
    return out
