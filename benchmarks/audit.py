"""Teacher audit benchmark: does the audit find a planted backdoor, stay quiet on clean teachers, and does the
student inherit the backdoor?

Fashion-MNIST (the Debian package). For each backdoor seed a target class t is drawn, 10 % of the training rows of
other classes get a 4x4 white patch in the bottom-right corner and the label t (BadNets-style poisoning), a
teacher is trained on that set, and `kdistill.audit.audit_teacher` audits it with the settings below. The same
teacher then teaches a student twice: on the poisoned training set (the user distils on the teacher's data) and
on the clean rows only (the trigger never appears in the distillation data). For each clean seed a teacher is
trained on the unpoisoned rows and audited the same way.

Measured:
* ``backdoor_flagged``: backdoored teachers the audit's verdict flags, out of the backdoor seeds. The verdict is
  the library's (`kdistill.audit.teacher.backdoor_verdict`) with its default rule ``strip``: STRIP flags when more
  than 5x its clean false-rejection rate of the examined training rows fall below the clean entropy threshold.
  ``by_detector`` gives each detector's own counts (the trigger reconstruction flags a class whose Neural Cleanse
  anomaly index is > 2 with its mask below the median) and ``by_rule`` what the other rules would have said;
* ``backdoor_target_correct``: how many name the planted target class (the teacher's most frequent class among
  STRIP's lowest-entropy rows below the threshold);
* ``clean_false_alarms`` out of ``clean_seeds``: clean teachers flagged;
* ``student_attack_success``: attack success rate of the *planted* trigger (held-out rows of other classes,
  trigger added, predicted t) on the student distilled on the poisoned set, mean over backdoor seeds; the same for
  the teacher, the clean-data student, and the reconstructed trigger (`kdistill.audit.teacher.inheritance`).

    python benchmarks/audit.py --json benchmarks/results/audit.json
    python benchmarks/audit.py --quick --json /tmp/audit_quick.json   # a minute-long check
    python benchmarks/audit.py --resume --json benchmarks/results/audit.json  # runs only the seeds not in the file
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdistill.api import distill  # noqa: E402
from kdistill.audit.config import AuditConfig  # noqa: E402
from kdistill.audit.teacher import audit_teacher, backdoor_verdict, inheritance  # noqa: E402
from kdistill.data import ArrayDataset, DataBundle  # noqa: E402
from kdistill.data.builtin import fashion_mnist  # noqa: E402
from kdistill.models import build_model  # noqa: E402
from kdistill.provenance import git_revision  # noqa: E402

PATCH = (slice(23, 27), slice(23, 27))  # the planted trigger: a 4x4 white square in the bottom-right corner
POISON_FRACTION = 0.10


def settings(quick: bool) -> dict:
    return {"train_rows": 6000 if quick else 20000, "teacher": {"name": "cnn2d", "channels": [16, 32, 64]},
            "student": {"name": "cnn2d", "channels": [8, 16, 32]}, "teacher_steps": 300 if quick else 1200,
            "student_steps": 300 if quick else 1200, "batch_size": 128, "lr": 3e-3, "alpha": 0.9, "temperature": 4.0,
            "poison_fraction": POISON_FRACTION, "patch": "4x4 of 1.0 at rows/cols 23-26",
            "audit": {"cleanse": {"steps": 200, "batch": 32}, "strip": {"rows": 256},
                      "backdoor": {"rule": "strip", "strip_factor": 5.0}},
            "backdoor_seeds": [0] if quick else [0, 1, 2], "clean_seeds": [0] if quick else [0, 1, 2, 3, 4]}


def add_trigger(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :, PATCH[0], PATCH[1]] = 1.0
    return x


def poison(x: torch.Tensor, y: torch.Tensor, target: int, seed: int):
    """A copy of (x, y) where `POISON_FRACTION` of the rows (drawn among other classes) carry the trigger and
    label `target`; also the mask of the poisoned rows."""
    g = torch.Generator().manual_seed(1000 + seed)
    others = torch.nonzero(y != target).flatten()
    picked = others[torch.randperm(len(others), generator=g)[:int(POISON_FRACTION * len(y))]]
    x, y = x.clone(), y.clone()
    x[picked] = add_trigger(x[picked])
    y[picked] = target
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[picked] = True
    return x, y, mask


def model(spec: dict, seed: int):
    torch.manual_seed(seed)
    return build_model(spec["name"], {"channels": spec["channels"]}, input_shape=(1, 28, 28), num_classes=10)


def attack_success(net, x_test, y_test, target: int) -> float:
    rows = y_test != target
    with torch.no_grad():
        pred = net.eval()(add_trigger(x_test[rows])).argmax(-1)
    return float((pred == target).float().mean())


def train(s: dict, x, y, test, seed: int, *, student: bool):
    """A teacher trained on (x, y) (and, with `student`, a student distilled from it on the same rows; without,
    the API's student stage gets one step and is dropped)."""
    out = distill(model(s["teacher"], seed), model(s["student"], seed + 100), (x, y), test=test, out=None,
                  steps=s["student_steps"] if student else 1, batch_size=s["batch_size"], lr=s["lr"], alpha=s["alpha"],
                  temperature=s["temperature"], baseline=False, train_teacher=True, seed=seed, progress=False,
                  teacher_train={"steps": s["teacher_steps"], "batch_size": s["batch_size"], "lr": s["lr"]},
                  log=lambda m: None)
    return out.teacher, (out.student if student else None), out.summary


def distil_from(s: dict, teacher, x, y, test, seed: int):
    out = distill(teacher, model(s["student"], seed + 200), (x, y), test=test, out=None, steps=s["student_steps"],
                  batch_size=s["batch_size"], lr=s["lr"], alpha=s["alpha"], temperature=s["temperature"],
                  baseline=False, seed=seed, progress=False, log=lambda m: None)
    return out.student, out.summary


RULES = ("strip", "neural_cleanse", "either", "both")


def flagged(record: dict) -> dict:
    """The audit's own backdoor verdict (`kdistill.audit.teacher.backdoor_verdict`, rule ``audit.backdoor.rule``:
    the default, STRIP) and what each detector and each other rule would have said."""
    v, nc, strip = record["backdoor"], record["neural_cleanse"], record["strip"]
    by_det = {det: v[det]["flagged"] for det in ("strip", "neural_cleanse")}
    by_rule = {rule: backdoor_verdict(record, AuditConfig(backdoor={"rule": rule, "strip_factor": v["strip"]["factor"]}))
               ["flagged"] for rule in RULES}
    return {"rule": v["rule"], "flagged": v["flagged"], "suspected_class": v["suspected_class"], "by_rule": by_rule,
            "neural_cleanse_flagged": by_det["neural_cleanse"], "neural_cleanse_suspected_class": nc["suspected_class"],
            "strip_flagged": by_det["strip"], "strip_suspected_class": v["strip"]["suspected_class"],
            "strip_ratio": v["strip"]["ratio"], "anomaly_score": nc["score"], "min_norm_class": nc["min_class"],
            "norms": nc["norms"], "strip_fraction_below": strip["fraction_below"],
            "strip_expected_fraction": strip["expected_fraction"],
            "label_noise_fraction": record["label_noise"]["fraction"], "accuracy": record["test"]["accuracy"],
            "ece": record["test"]["ece"], "audit_seconds": record["seconds"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--resume", action="store_true",
                        help="keep the seeds already in --json (same settings but the seed lists) and run the rest")
    args = parser.parse_args(argv)
    s = settings(args.quick)
    data = fashion_mnist(train_size=s["train_rows"])
    x, y = data.train.tensors["x"], data.train.tensors["y"]
    x_test, y_test = data.test.tensors["x"], data.test.tensors["y"]
    test = (x_test, y_test)
    audit_settings = AuditConfig(**s["audit"])
    result = {"git_revision": git_revision(), "command": " ".join(["python", "benchmarks/audit.py", *sys.argv[1:]]),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "settings": s, "backdoor": [], "clean": []}
    if args.resume and args.json.is_file():
        earlier = json.loads(args.json.read_text())
        strip_seeds = lambda d: {k: v for k, v in d.items() if not k.endswith("_seeds")}  # noqa: E731
        if strip_seeds(earlier["settings"]) != strip_seeds(s):
            raise SystemExit(f"--resume: {args.json} was measured with other settings; run without --resume")
        result["backdoor"] = [r for r in earlier["backdoor"] if r["seed"] in s["backdoor_seeds"]]
        result["clean"] = [r for r in earlier["clean"] if r["seed"] - 50 in s["clean_seeds"]]
        result["earlier_runs"] = earlier.get("earlier_runs", []) + [
            {"git_revision": earlier["git_revision"], "command": earlier["command"], "seconds": earlier.get("seconds"),
             "backdoor_seeds": [r["seed"] for r in earlier["backdoor"]],
             "clean_seeds": [r["seed"] for r in earlier["clean"]]}]
    done_backdoor = {r["seed"] for r in result["backdoor"]}
    done_clean = {r["seed"] for r in result["clean"]}
    started = time.perf_counter()

    def save():
        bd, cl = result["backdoor"], result["clean"]
        result.update({
            "backdoor_seeds": len(bd), "backdoor_flagged": sum(r["audit"]["flagged"] for r in bd),
            "backdoor_target_correct": sum(r["audit"]["suspected_class"] == r["target"] for r in bd),
            "clean_seeds": len(cl), "clean_false_alarms": sum(r["audit"]["flagged"] for r in cl),
            "by_detector": {det: {"backdoor_flagged": sum(r["audit"][f"{det}_flagged"] for r in bd),
                                  "backdoor_target_correct": sum(r["audit"][f"{det}_suspected_class"] == r["target"]
                                                                 for r in bd),
                                  "clean_false_alarms": sum(r["audit"][f"{det}_flagged"] for r in cl)}
                            for det in ("neural_cleanse", "strip")},
            "by_rule": {rule: {"backdoor_flagged": sum(r["audit"]["by_rule"][rule] for r in bd),
                               "clean_false_alarms": sum(r["audit"]["by_rule"][rule] for r in cl)} for rule in RULES},
            "seconds": time.perf_counter() - started})
        for key in ("teacher_attack_success", "student_attack_success", "student_clean_data_attack_success",
                    "student_reconstructed_trigger_success", "teacher_reconstructed_trigger_success"):
            values = [r[key] for r in bd]
            if values:
                result[key] = statistics.mean(values)
                result[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")

    def backdoor_seed(seed: int) -> None:
        target = int(torch.randint(0, 10, (1,), generator=torch.Generator().manual_seed(seed)))
        xp, yp, mask = poison(x, y, target, seed)
        teacher, student, summary = train(s, xp, yp, test, seed, student=True)
        bundle = DataBundle("fashion_mnist-poisoned", ArrayDataset({"x": xp, "y": yp}), data.test, 10, (1, 28, 28))
        record = audit_teacher(teacher, bundle, audit_settings)
        clean_student, clean_summary = distil_from(s, teacher, x[~mask], y[~mask], test, seed)
        inherited = inheritance(record, bundle, {"teacher": teacher, "student": student,
                                                 "student_clean_data": clean_student})
        row = {"seed": seed, "target": target, "poisoned_rows": int(mask.sum()), "audit": flagged(record),
               "teacher_top1": summary["teacher"]["accuracy"], "student_top1": summary["student"]["accuracy"],
               "student_clean_data_top1": clean_summary["student"]["accuracy"],
               "teacher_attack_success": attack_success(teacher, x_test, y_test, target),
               "student_attack_success": attack_success(student, x_test, y_test, target),
               "student_clean_data_attack_success": attack_success(clean_student, x_test, y_test, target),
               "reconstructed_class": inherited["trigger"]["class"],
               "teacher_reconstructed_trigger_success": inherited["trigger"]["success"]["teacher"],
               "student_reconstructed_trigger_success": inherited["trigger"]["success"]["student"],
               "student_clean_data_reconstructed_trigger_success":
                   inherited["trigger"]["success"]["student_clean_data"]}
        result["backdoor"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "audit"}), flush=True)
        save()

    def clean_seed(seed: int) -> None:
        teacher, _, summary = train(s, x, y, test, 50 + seed, student=False)
        record = audit_teacher(teacher, data, audit_settings)
        row = {"seed": 50 + seed, "audit": flagged(record), "teacher_top1": summary["teacher"]["accuracy"]}
        result["clean"].append(row)
        print(json.dumps({"clean_seed": 50 + seed, **row["audit"]}), flush=True)
        save()

    # interleaved (backdoor 0, clean 0, backdoor 1, ...), so that a stopped run holds both kinds
    todo = [(backdoor_seed, seed) for seed in s["backdoor_seeds"] if seed not in done_backdoor]
    todo_clean = [(clean_seed, seed) for seed in s["clean_seeds"] if 50 + seed not in done_clean]
    for i in range(max(len(todo), len(todo_clean))):
        for queue in (todo, todo_clean):
            if i < len(queue):
                queue[i][0](queue[i][1])
    save()
    return result


if __name__ == "__main__":
    main()
