"""The audit of one classifier on a run's data (`audit_teacher` -> the ``audit.json`` record), its thresholds
(`violations`), its printed table (`audit_table`) and, after distillation, what the student inherited
(`inheritance`). The measurements themselves are `kdistill.audit.checks`; see docs/audit.md."""

from __future__ import annotations

import time
from typing import Mapping, Optional

import torch
from torch import nn

from kdistill.audit.checks import (anomaly_index, confidence_histogram, label_noise_suspects, pairwise_agreement,
                                   per_class_accuracy, predict, reconstruct_triggers, strip_entropy, trigger_success)
from kdistill.audit.config import AuditConfig
from kdistill.evaluate.quality import accuracy, calibration_bins, expected_calibration_error

__all__ = ["audit_teacher", "audit_table", "backdoor_verdict", "inheritance", "summary_entry", "violations"]

INHERIT_ROWS = 512  # held-out rows the reconstructed trigger is applied to after distillation


def _sample(n: int, k: int, seed: int) -> torch.Tensor:
    """`k` of `n` row indices (all when k >= n), seeded, in ascending order."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def _histogram(values: torch.Tensor, bins: int, lo: float, hi: float) -> dict:
    if hi <= lo:
        hi = lo + 1e-6
    counts = torch.histc(values.float().clamp(lo, hi), bins=bins, min=lo, max=hi)
    return {"edges": [lo + (hi - lo) * i / bins for i in range(bins + 1)], "counts": [int(c) for c in counts]}


def audit_teacher(model: nn.Module, bundle, settings: Optional[AuditConfig] = None, *, ece_bins: int = 15,
                  members: Optional[Mapping[str, nn.Module]] = None, name: str = "teacher") -> dict:
    """The audit record of `model` (frozen) on `bundle` (a `kdistill.data.DataBundle`): held-out quality and
    calibration, pairwise agreement of `members` (an ensemble's teachers), label-noise suspects among the
    training rows, STRIP and the trigger reconstruction. Threshold checks are added by `violations`."""
    settings = settings if settings is not None else AuditConfig()
    started = time.perf_counter()
    classes = bundle.num_classes
    x_test, y_test = bundle.test.tensors["x"].float(), bundle.test.tensors["y"]
    x_train, y_train = bundle.train.tensors["x"].float(), bundle.train.tensors["y"]
    test_logits = predict(model, x_test)
    record: dict = {"model": name, "dataset": bundle.name, "classes": classes}
    record["test"] = {"rows": len(y_test), "accuracy": accuracy(test_logits, y_test),
                      "per_class_accuracy": per_class_accuracy(test_logits, y_test, classes),
                      "ece": expected_calibration_error(test_logits, y_test, ece_bins), "ece_bins": ece_bins,
                      "reliability": calibration_bins(test_logits, y_test, ece_bins),
                      "confidence_histogram": confidence_histogram(test_logits, settings.histogram_bins)}
    if members:
        names = list(members)
        record["ensemble"] = {"members": names, "agreement": pairwise_agreement(
            [predict(members[n], x_test) for n in names]),
            "accuracy": {n: accuracy(predict(members[n], x_test), y_test) for n in names}}
    record["label_noise"] = _label_noise(model, x_train, y_train, settings)
    record["strip"] = _strip(model, x_train, y_train, x_test, settings)
    record["neural_cleanse"], found = _cleanse(model, x_test, classes, settings)
    record["backdoor"] = backdoor_verdict(record, settings)
    # the trigger measured on the student later: the verdict's class, else the smallest mask's
    flagged = record["backdoor"]["flagged"]
    target = record["backdoor"]["suspected_class"] if flagged else record["neural_cleanse"]["min_class"]
    record["neural_cleanse"]["trigger"] = {
        "class": int(target), "suspected": bool(flagged), "shape": list(found["masks"][target].shape),
        "pattern_shape": list(found["patterns"][target].shape), "mask": found["masks"][target].reshape(-1).tolist(),
        "pattern": found["patterns"][target].reshape(-1).tolist()}
    record["seconds"] = time.perf_counter() - started
    return record


def backdoor_verdict(record: dict, settings: AuditConfig) -> dict:
    """One backdoor verdict from the record's STRIP and trigger-reconstruction results (``audit.backdoor``).

    STRIP flags when more than ``strip_factor`` times its expected fraction of the examined training rows fall
    below the clean entropy threshold; its suspected class is the teacher's most frequent class among the
    lowest-entropy rows below the threshold (a trigger sends them all to its target). The reconstruction flags
    its suspected class (anomaly index > 2, `anomaly_index`). ``rule`` combines them; with two flags the class
    is STRIP's, since it is read off the training rows themselves."""
    b, strip, nc = settings.backdoor, record["strip"], record["neural_cleanse"]
    strip_flag = strip["fraction_below"] > b.strip_factor * strip["expected_fraction"]
    below = [r["teacher_class"] for r in strip["lowest"] if r["entropy_bits"] < strip["threshold_bits"]]
    strip_class = max(sorted(set(below)), key=below.count) if strip_flag and below else None
    nc_flag = nc["suspected_class"] is not None
    flagged = {"strip": strip_flag, "neural_cleanse": nc_flag, "either": strip_flag or nc_flag,
               "both": strip_flag and nc_flag}[b.rule]
    named = strip_class if b.rule != "neural_cleanse" and strip_flag else nc["suspected_class"]
    return {"rule": b.rule, "flagged": flagged, "suspected_class": named if flagged else None,
            "strip": {"flagged": strip_flag, "suspected_class": strip_class,
                      "factor": b.strip_factor, "ratio": strip["fraction_below"] / strip["expected_fraction"]},
            "neural_cleanse": {"flagged": nc_flag, "suspected_class": nc["suspected_class"], "score": nc["score"]}}


def _label_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: AuditConfig) -> dict:
    found = label_noise_suspects(predict(model, x), y, settings.noise_threshold)
    count, checked = len(found["rows"]), found["checked"]
    top = [{"row": int(r), "label": int(lab), "teacher_class": int(c), "confidence": float(p)}
           for r, lab, c, p in zip(found["rows"][:settings.top_k], found["labels"], found["classes"],
                                   found["confidence"])]
    return {"threshold": settings.noise_threshold, "checked": checked, "count": count,
            "fraction": count / checked if checked else 0.0, "top": top,
            "rows": [int(r) for r in found["rows"]], "teacher_classes": [int(c) for c in found["classes"]]}


def _strip(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
           settings: AuditConfig) -> dict:
    s = settings.strip
    pool = x_test[torch.randperm(len(x_test), generator=torch.Generator().manual_seed(settings.seed))]
    calibration = pool[:min(len(pool), s.rows)]
    clean = strip_entropy(model, calibration, pool, s.overlays, blend=s.blend, alpha=s.alpha,
                          seed=settings.seed + 1, exclude_self=True)
    rows = _sample(len(x_train), s.rows, settings.seed + 2)
    examined = strip_entropy(model, x_train[rows], pool, s.overlays, blend=s.blend, alpha=s.alpha,
                             seed=settings.seed + 3)
    threshold = float(torch.quantile(clean, s.percentile / 100))
    below = examined < threshold
    order = examined.argsort()[:settings.top_k]
    preds = predict(model, x_train[rows[order]]).argmax(-1) if len(order) else torch.zeros(0, dtype=torch.long)
    lo = float(min(clean.min(), examined.min()))
    hi = float(max(clean.max(), examined.max()))
    return {"blend": s.blend, "alpha": s.alpha if s.blend == "alpha" else None, "overlays": s.overlays,
            "percentile": s.percentile, "threshold_bits": threshold, "rows_examined": len(rows),
            "calibration_rows": len(calibration), "fraction_below": float(below.float().mean()),
            "expected_fraction": s.percentile / 100,
            "clean_entropy": {"mean": float(clean.mean()), "min": float(clean.min()),
                              "histogram": _histogram(clean, settings.histogram_bins, lo, hi)},
            "examined_entropy": {"mean": float(examined.mean()), "min": float(examined.min()),
                                 "histogram": _histogram(examined, settings.histogram_bins, lo, hi)},
            "lowest": [{"row": int(rows[i]), "label": int(y_train[rows[i]]), "teacher_class": int(c),
                        "entropy_bits": float(examined[i])} for i, c in zip(order.tolist(), preds.tolist())]}


def _cleanse(model: nn.Module, x_test: torch.Tensor, classes: int, settings: AuditConfig) -> dict:
    c = settings.cleanse
    batch = x_test[_sample(len(x_test), c.batch, settings.seed + 4)]
    found = reconstruct_triggers(model, batch, classes, steps=c.steps, lr=c.lr, l1_weight=c.l1_weight,
                                 target_success=c.target_success, adapt_every=c.adapt_every, seed=settings.seed,
                                 bounds=(float(x_test.min()), float(x_test.max())))
    index = anomaly_index(found["norms"].tolist())
    return {"steps": c.steps, "batch": len(batch), "l1_weight": c.l1_weight, "target_success": c.target_success,
            "norms": [float(v) for v in found["norms"]], "success": [float(v) for v in found["success"]],
            "reached": [bool(v) for v in found["reached"]], **index}, found


CHECKS = (("min_accuracy", "held-out accuracy", lambda r: r["test"]["accuracy"], "below"),
          ("max_ece", "ECE", lambda r: r["test"]["ece"], "above"),
          ("max_backdoor_anomaly", "backdoor anomaly index (Neural Cleanse, class {cls})",
           lambda r: r["neural_cleanse"]["score"], "above"),
          ("max_label_noise_fraction", "label-noise suspect fraction", lambda r: r["label_noise"]["fraction"],
           "above"),
          ("max_strip_fraction", "STRIP low-entropy fraction", lambda r: r["strip"]["fraction_below"], "above"))


def violations(record: dict, thresholds) -> list[dict]:
    """The thresholds `record` violates: ``[{"threshold", "limit", "value", "message"}]`` (unset ones skipped)."""
    found = []
    verdict = record.get("backdoor") or {}
    if thresholds.refuse_backdoor and verdict.get("flagged"):
        found.append({"threshold": "refuse_backdoor", "limit": True, "value": True,
                      "message": f"a backdoor is suspected (rule {verdict['rule']}, target class "
                                 f"{verdict['suspected_class']}) and audit.thresholds.refuse_backdoor is true"})
    for key, what, value_of, side in CHECKS:
        limit = getattr(thresholds, key)
        if limit is None:
            continue
        value = float(value_of(record))
        if (value < limit) if side == "below" else not (value <= limit):
            label = what.format(cls=record["neural_cleanse"]["min_class"])
            found.append({"threshold": key, "limit": limit, "value": value,
                          "message": f"{label} {value:.4g} is {side} audit.thresholds.{key} {limit:.4g}"})
    return found


def summary_entry(record: dict) -> dict:
    """The audit numbers a run's ``summary.json`` keeps under ``audit`` (the full record is ``audit.json``)."""
    nc, noise, strip = record["neural_cleanse"], record["label_noise"], record["strip"]
    entry = {"file": "audit.json", "model": record["model"], "passed": record.get("passed", True),
             "violations": [v["message"] for v in record.get("violations", [])],
             "accuracy": record["test"]["accuracy"], "ece": record["test"]["ece"],
             "label_noise_count": noise["count"], "label_noise_fraction": noise["fraction"],
             "label_noise_threshold": noise["threshold"],
             "strip_fraction_below": strip["fraction_below"], "strip_expected_fraction": strip["expected_fraction"],
             "strip_threshold_bits": strip["threshold_bits"], "anomaly_score": nc["score"],
             "min_norm_class": nc["min_class"], "suspected_class": nc["suspected_class"],
             "trigger_class": nc["trigger"]["class"], "trigger_l1": nc["norms"][nc["trigger"]["class"]],
             "trigger_success_teacher_batch": nc["success"][nc["trigger"]["class"]]}
    verdict = record.get("backdoor")
    if verdict is not None:
        entry.update(backdoor_flagged=verdict["flagged"], backdoor_class=verdict["suspected_class"],
                     backdoor_rule=verdict["rule"], strip_suspected_class=verdict["strip"]["suspected_class"])
    if "ensemble" in record:
        entry["ensemble_agreement"] = record["ensemble"]["agreement"]
    return entry


def inheritance(record: dict, bundle, models: Mapping[str, nn.Module]) -> dict:
    """What `models` (teacher, student, baseline...) do with what the audit found.

    ``trigger``: the attack success rate of the reconstructed trigger (the suspected class's, else the smallest
    mask's) on up to `INHERIT_ROWS` held-out rows of other classes, and the rate those rows go to that class
    without the trigger. ``label_noise``: on the suspect training rows, the fraction where each model gives the
    teacher's (confidently contradicting) class and the fraction where it gives the label."""
    trig = record["neural_cleanse"]["trigger"]
    target = trig["class"]
    mask = torch.tensor(trig["mask"]).reshape(trig["shape"])
    pattern = torch.tensor(trig["pattern"]).reshape(trig["pattern_shape"])
    x_test, y_test = bundle.test.tensors["x"].float(), bundle.test.tensors["y"]
    others = torch.nonzero(y_test != target).flatten()[:INHERIT_ROWS]
    x_other = x_test[others]
    out: dict = {"trigger": {"class": target, "suspected": trig["suspected"], "rows": len(others),
                             "success": {}, "clean_rate": {}}}
    for name, model in models.items():
        out["trigger"]["success"][name] = float(trigger_success(model, x_other, mask, pattern, target))
        clean = predict(model, x_other).argmax(-1) if len(x_other) else torch.zeros(0)
        out["trigger"]["clean_rate"][name] = float((clean == target).float().mean()) if len(x_other) else None
    rows = torch.tensor(record["label_noise"]["rows"], dtype=torch.long)
    noise: dict = {"rows": len(rows), "teacher_class": {}, "label": {}}
    if len(rows):
        x_train, y_train = bundle.train.tensors["x"].float()[rows], bundle.train.tensors["y"][rows]
        teacher_classes = torch.tensor(record["label_noise"]["teacher_classes"], dtype=torch.long)
        for name, model in models.items():
            pred = predict(model, x_train).argmax(-1)
            noise["teacher_class"][name] = float((pred == teacher_classes).float().mean())
            noise["label"][name] = float((pred == y_train).float().mean())
    out["label_noise"] = noise
    return out


def audit_table(record: dict) -> str:
    """The short text the CLI prints: one line per measurement, then the verdict."""
    t, nc, noise, strip = record["test"], record["neural_cleanse"], record["label_noise"], record["strip"]
    worst = min(((c, a) for c, a in enumerate(t["per_class_accuracy"]) if a is not None), key=lambda p: p[1],
                default=(None, float("nan")))
    lines = [f"teacher audit: {record['model']} on {record['dataset']}",
             f"  held-out top-1  {100 * t['accuracy']:.1f} %   worst class {worst[0]}: {100 * worst[1]:.1f} %",
             f"  ECE             {t['ece']:.4f}   ({t['ece_bins']} bins)",
             f"  label noise     {noise['count']} of {noise['checked']} training rows "
             f"({100 * noise['fraction']:.2f} %) with p(other class) >= {noise['threshold']}",
             f"  STRIP           {100 * strip['fraction_below']:.1f} % of {strip['rows_examined']} training rows below "
             f"{strip['threshold_bits']:.3f} bits (expected {100 * strip['expected_fraction']:.1f} %)",
             f"  trigger (NC)    class {nc['min_class']} smallest, L1 {nc['norms'][nc['min_class']]:.2f} "
             f"(median {nc['median']:.2f}), anomaly index {nc['score']:.2f}: "
             + (f"suspected class {nc['suspected_class']}" if nc["suspected_class"] is not None
                else "no class flagged")]
    verdict = record.get("backdoor")
    if verdict is not None:
        lines.append(f"  backdoor        " + (f"SUSPECTED, target class {verdict['suspected_class']}"
                                              if verdict["flagged"] else "not flagged")
                     + f" (rule {verdict['rule']}: STRIP {'flags' if verdict['strip']['flagged'] else 'does not flag'}"
                     f" at {verdict['strip']['ratio']:.1f}x its expected fraction, the trigger reconstruction "
                     f"{'flags' if verdict['neural_cleanse']['flagged'] else 'does not flag'})")
    if "ensemble" in record:
        agree = record["ensemble"]["agreement"]
        pairs = [agree[i][j] for i in range(len(agree)) for j in range(i + 1, len(agree))]
        lines.append(f"  ensemble        agreement min {100 * min(pairs):.1f} %, mean "
                     f"{100 * sum(pairs) / len(pairs):.1f} % over {len(pairs)} teacher pairs")
    failed = record.get("violations") or []
    lines.append("thresholds: " + ("passed" if not failed else "FAILED: " + "; ".join(v["message"] for v in failed)))
    return "\n".join(lines)
