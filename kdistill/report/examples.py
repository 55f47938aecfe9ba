"""The report's per-example sections, built from the outputs the task kept (not re-measured):

* classification (``predictions.safetensors``): reliability diagrams with the summary's ECE, per-class accuracy
  and retention, the disagreements of teacher and student (confusion matrix and example rows). Top-1 and ECE are
  computed from the saved logits with the very functions the summary used (`kdistill.evaluate.quality`), and
  shown next to the summary's figures;
* sentence embeddings (``similarities.safetensors``): student against teacher cosine similarity of pairs;
* causal LMs: held-out perplexities and token agreement, from the summary.
"""

from __future__ import annotations

import numpy as np
import torch

from kdistill.evaluate.quality import accuracy, agreement, calibration_bins, expected_calibration_error
from kdistill.report import plots
from kdistill.report.markup import Cell, Section, nodata, num, table
from kdistill.report.runfiles import RunFiles
from kdistill.report.sections import figure

__all__ = ["calibration", "disagreements", "embeddings", "language_model", "per_class", "EXAMPLE_ROWS"]

EXAMPLE_ROWS = 10
NO_PREDICTIONS = ("this run kept no per-example predictions (predictions.safetensors is written by the offline "
                  "scheme of task classification at the end of its evaluation; re-run an older run with "
                  "'kdistill run RUN_DIR' to write it: finished stages are loaded, not retrained).")


def _models(run: RunFiles) -> list[str]:
    _, logits, _ = run.predictions
    return [m for m in ("teacher", "baseline", "student") if m in logits] + \
        [m for m in logits if m not in ("teacher", "baseline", "student")]


def calibration(run: RunFiles) -> Section:
    if run.predictions is None:
        return Section("calibration", "Calibration", nodata(NO_PREDICTIONS), False)
    labels, logits, bins = run.predictions
    models, rows = {}, []
    for name in _models(run):
        b = calibration_bins(logits[name], labels, bins)
        ece_summary = (run.summary.get(name) or {}).get("ece")
        ece_file = expected_calibration_error(logits[name], labels, bins)
        b["ece"] = ece_summary if ece_summary is not None else ece_file
        models[name] = b
        rows.append([name, num(run.summary, f"{name}/ece", ".4f"), Cell(f"{ece_file:.4f}"),
                     Cell(f"{100 * accuracy(logits[name], labels):.2f}"),
                     Cell(f"{100 * float(logits[name].float().softmax(-1).max(-1).values.mean()):.2f}")])
    body = figure(plots.reliability, models, caption=f"{bins} equal-width confidence bins; ECE from summary.json")
    body += table(["model", "ECE (summary.json)", "ECE (predictions)", "top-1 % (predictions)", "mean confidence %"],
                  rows, caption=f"{len(labels)} test examples")
    return Section("calibration", "Calibration (reliability diagrams)", body)


def _per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, classes: int) -> tuple[np.ndarray, np.ndarray]:
    counts = torch.bincount(labels, minlength=classes).double()
    hits = torch.bincount(labels[pred == labels], minlength=classes).double()
    acc = torch.where(counts > 0, hits / counts.clamp(min=1), torch.full_like(counts, float("nan")))
    return acc.numpy(), counts.numpy()


def per_class(run: RunFiles) -> Section:
    if run.predictions is None:
        return Section("per-class", "Per-class accuracy", nodata(NO_PREDICTIONS), False)
    labels, logits, _ = run.predictions
    classes = next(iter(logits.values())).shape[-1]
    keep = (labels >= 0) & (labels < classes)
    accs, counts = {}, None
    for name in _models(run):
        accs[name], counts = _per_class_accuracy(logits[name][keep].argmax(-1), labels[keep], classes)
    names = [str(c) for c in range(classes)]
    headers = ["class", "examples", *[f"{m} %" for m in accs]]
    has_pair = "teacher" in accs and "student" in accs
    if has_pair:
        headers.append("retention (student / teacher)")
    rows = []
    for c in range(classes):
        row = [names[c], str(int(counts[c])), *[Cell("-" if np.isnan(a[c]) else f"{100 * a[c]:.1f}") for a in
                                                accs.values()]]
        if has_pair:
            t, s = accs["teacher"][c], accs["student"][c]
            row.append(Cell(f"{s / t:.3f}" if t > 0 else "-"))
        rows.append(row)
    overall = [[m, num(run.summary, f"{m}/accuracy", ".2f", scale=100), Cell(f"{100 * accuracy(logits[m], labels):.2f}")]
               for m in accs]
    body = figure(plots.per_class, accs, names, caption="accuracy on each true class (test set)")
    body += table(headers, rows)
    body += table(["model", "top-1 % (summary.json)", "top-1 % (predictions)"], overall,
                  caption="the overall top-1 of the saved predictions is the summary's")
    return Section("per-class", "Per-class accuracy and retention", body)


def disagreements(run: RunFiles) -> Section:
    if run.predictions is None:
        return Section("disagreements", "Where teacher and student disagree", nodata(NO_PREDICTIONS), False)
    labels, logits, _ = run.predictions
    if "teacher" not in logits or "student" not in logits:
        return Section("disagreements", "Where teacher and student disagree",
                       nodata("predictions.safetensors holds no teacher and student pair."), False)
    classes = logits["teacher"].shape[-1]
    t_prob, s_prob = logits["teacher"].float().softmax(-1), logits["student"].float().softmax(-1)
    t_conf, t_pred = t_prob.max(-1)
    s_conf, s_pred = s_prob.max(-1)
    differ = t_pred != s_pred
    n, total = int(differ.sum()), len(labels)
    agree = agreement(logits["student"], logits["teacher"])
    line = (f"{n} of {total} test examples ({100 * n / max(total, 1):.2f} %) get different top-1 classes; "
            f"agreement from the predictions {100 * agree:.2f} %")
    summary_cell = num(run.summary, "student/agreement", ".2f", scale=100)
    if summary_cell.src is not None:
        line += (f', summary.json <span class="num" data-src="student/agreement" data-value="{summary_cell.value}">'
                 f"{summary_cell.text}</span> %")
    if n == 0:
        return Section("disagreements", "Where teacher and student disagree",
                       f"<p>{line}.</p>" + nodata("teacher and student agree on every test example: nothing to show."))
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (t_pred[differ].numpy(), s_pred[differ].numpy()), 1)
    order = torch.nonzero(differ).flatten()
    order = order[torch.argsort(t_conf[order], descending=True, stable=True)][:EXAMPLE_ROWS]
    rows = []
    for i in order.tolist():
        y = int(labels[i])
        right = "teacher" if int(t_pred[i]) == y else "student" if int(s_pred[i]) == y else "neither"
        rows.append([str(i), str(y), Cell(f"{int(t_pred[i])} ({100 * float(t_conf[i]):.1f} %)"),
                     Cell(f"{int(s_pred[i])} ({100 * float(s_conf[i]):.1f} %)"), Cell(right, klass="")])
    body = f"<p>{line}.</p>"
    body += figure(plots.confusion, matrix, [str(c) for c in range(classes)],
                   caption="test examples where they disagree: teacher's class (rows) against student's (columns)")
    body += table(["test index", "true label", "teacher (confidence)", "student (confidence)", "right"], rows,
                  caption=f"the {len(rows)} disagreements the teacher is most confident about")
    return Section("disagreements", "Where teacher and student disagree", body)


def embeddings(run: RunFiles) -> Section:
    title = "Teacher against student similarities"
    if run.similarities is None:
        return Section("similarities", title, nodata(
            "this run kept no pair similarities (similarities.safetensors is written at the evaluation of task "
            "sentence_embedding; re-run with 'kdistill run RUN_DIR' to write it)."), False)
    teacher, student, total = run.similarities
    spearman = run.summary.get("spearman")
    body = figure(plots.similarity_scatter, teacher.numpy(), student.numpy(), spearman,
                  caption=f"{len(teacher)} of the {total} held-out sentence pairs the Spearman was computed over")
    rows = [["student (distilled)", num(run.summary, "spearman", ".4f"), num(run.summary, "probe_acc_student", ".2f",
                                                                             scale=100)],
            ["teacher", Cell("1 (itself)"), num(run.summary, "probe_acc_teacher", ".2f", scale=100)]]
    body += table(["model", "spearman vs teacher", "probe accuracy %"], rows)
    return Section("similarities", title, body)


def language_model(run: RunFiles) -> Section:
    s = run.summary
    ppl = {label: s[key] for label, key in (("teacher", "teacher_ppl"), ("student, initial", "student_init_ppl"),
                                             ("student, CE", "student_ce_ppl"), ("student, KD", "student_kd_ppl"))
           if isinstance(s.get(key), (int, float))}
    if not ppl:
        return Section("language-model", "Perplexity and token agreement",
                       nodata("summary.json holds no perplexities for this run."), False)
    body = figure(plots.lm_bars, ppl, "held-out perplexity (lower is better)", caption="from summary.json")
    rows = [[row.get("name"), str(row.get("runtime", "-")), num(s, f"deployed/{i}/perplexity", ".3f"),
             num(s, f"deployed/{i}/agreement", ".2f", scale=100)] for i, row in enumerate(s.get("deployed") or [])]
    if rows:
        body += table(["artifact", "runtime", "perplexity", "token agreement with the teacher %"], rows,
                      caption="next-token top-1 agreement on the held-out blocks, from summary.json")
    else:
        body += nodata("token agreement is not measured in this run: it is measured for deployed rows (add an "
                       "export: section to the config).")
    return Section("language-model", "Perplexity and token agreement", body)
