"""Every scheme runs end to end from a config (Python and CLI), evaluates what it promises, and a re-run of a
finished run directory loads its rounds instead of training them again."""

import copy
import json

import pytest
import yaml

from kdistill.cli import main
from kdistill.config import parse_config
from kdistill.schemes import SCHEMES, run

TRAIN = {"steps": 60, "batch_size": 64, "lr": 0.01, "log_every": 20}   # enough for digits to beat chance clearly
CNN = {"name": "cnn2d", "kwargs": {"channels": [4, 8]}, "train": TRAIN}
BASE = {
    "data": {"name": "digits"},
    "student": {"name": "mlp", "kwargs": {"hidden": [16]}},
    "distill": {"alpha": 0.9, "temperature": 2.0},
    "train": TRAIN,
    "baseline": False,
    "eval": {"latency_repeats": 1, "throughput_batch": 2},
}
CASES = {
    "offline": ({}, {"teacher", "student"}),
    "mutual": ({"name": "mutual", "peers": 2}, {"peer0", "peer1", "peer ensemble"}),
    "born_again": ({"name": "born_again", "generations": 2},
                   {"gen0 (labels only)", "gen1", "gen2", "ensemble gen1..2"}),
    "byot": ({"name": "byot", "exits": {"hidden": "2"}}, {"student (final exit)", "exit hidden"}),
    "snapshot": ({"name": "snapshot"}, {"student (PS-KD)"}),
    "multi_teacher": ({"name": "multi_teacher", "combine": "agreement",
                       "teachers": [CNN, {"name": "mlp", "kwargs": {"hidden": [32]}, "train": TRAIN}]},
                      {"teacher0", "teacher1", "teachers combined (agreement)", "student"}),
    "specialists": ({"name": "specialists", "num_specialists": 2, "group_size": 2},
                    {"generalist", "generalist + specialists", "student"}),
    "assistant": ({"name": "assistant"}, {"teacher", "assistant1", "student, KD from teacher",
                                          "student, KD via assistants"}),
    "lifelong": ({"name": "lifelong", "old_classes": [0, 1, 2], "new_classes": [3, 4]},
                 {"old model (before the new task)", "LwF: old task", "fine-tuning: old task"}),
    "cross_modal": ({"name": "cross_modal", "student_view": "downsample:2"},
                    {"teacher (teacher view)", "student, KD (student view)"}),
    "selective": ({"name": "selective", "threshold": 0.01}, {"teacher", "student, selective KD"}),
}
TEACHERLESS = {"mutual", "born_again", "byot", "snapshot", "multi_teacher", "lifelong"}


def config(name):
    data = copy.deepcopy(BASE)
    scheme, _ = CASES[name]
    if scheme:
        data["scheme"] = scheme
    if name not in TEACHERLESS:
        data["teacher"] = copy.deepcopy(CNN)
    if name == "assistant":                # geometric spacing needs a teacher larger than the student
        data["teacher"]["kwargs"]["channels"] = [16, 32]
    return data


def test_every_scheme_has_a_case():
    assert set(CASES) == set(SCHEMES)


# what each scheme must show on digits (10 classes, chance 0.1) beyond running: (model, what, threshold)
AGREES = {"mutual": [("peer0", 0.8), ("peer1", 0.8)], "born_again": [("gen1", 0.6)], "byot": [("exit hidden", 0.6)],
          "multi_teacher": [("student", 0.6)], "specialists": [("student", 0.5)],
          "assistant": [("assistant1", 0.6), ("student, KD via assistants", 0.6)],
          "cross_modal": [("student, KD (student view)", 0.35)], "selective": [("student, selective KD", 0.35)]}


@pytest.mark.parametrize("name", sorted(set(CASES) - {"offline"}))
def test_scheme_runs_from_a_config(name):
    summary = run(parse_config(config(name)), None, progress=False, log=lambda m: None)
    assert summary["scheme"] == name
    assert CASES[name][1] <= set(summary["models"])
    # every model learned: at least 3x chance (lifelong rows are per-task: 3 or 2 classes)
    floor = 0.8 if name == "lifelong" else 0.3
    assert all(m["accuracy"] >= floor for m in summary["models"].values()), summary["models"]
    for model, threshold in AGREES.get(name, []):      # the student follows its teacher (or peer, or exit's final)
        assert summary["models"][model]["agreement"] >= threshold, (model, summary["models"][model])
    if name == "mutual":                               # the ensemble is at least as good as its worse peer
        models = summary["models"]
        assert models["peer ensemble"]["accuracy"] >= min(models["peer0"]["accuracy"], models["peer1"]["accuracy"])
    if name == "lifelong":                             # LwF forgets less of the old task than fine-tuning
        models = summary["models"]
        assert models["LwF: old task"]["accuracy"] >= models["fine-tuning: old task"]["accuracy"]
    if name == "specialists":                          # two of ten ~balanced classes at half the data: ~log 4
        assert all(1.2 < shift < 1.6 for shift in summary["dustbin_shifts"])


def test_specialists_and_cross_modal_report_their_structure():
    s = run(parse_config(config("specialists")), None, progress=False, log=lambda m: None)
    assert len(s["groups"]) == 2 and all(len(g) == 2 for g in s["groups"])
    assert not set(s["groups"][0]) & set(s["groups"][1])
    c = run(parse_config(config("cross_modal")), None, progress=False, log=lambda m: None)
    assert c["teacher_input_shape"] == [1, 8, 8] and c["student_input_shape"] == [1, 4, 4]


def test_cli_runs_a_scheme_and_a_rerun_loads_finished_rounds(tmp_path, capsys):
    path = tmp_path / "byot.yaml"
    path.write_text(yaml.safe_dump(config("byot")))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "exit hidden" in printed and "scheme: byot" in printed
    first = json.loads((out / "summary.json").read_text())
    assert (out / "byot.safetensors").is_file() and (out / "byot.side.safetensors").is_file()
    assert main(["run", str(out), "--no-progress"]) == 0
    assert "done earlier" in capsys.readouterr().out
    again = json.loads((out / "summary.json").read_text())
    accuracies = lambda s: {k: v["accuracy"] for k, v in s["models"].items()}  # noqa: E731
    assert accuracies(again) == accuracies(first)                  # exit heads restored with the side state
    assert main(["eval", str(out)]) == 2                           # eval is for offline runs: one clear line
    assert "is a 'byot' run" in capsys.readouterr().err
