"""The wiring check: every mistake in the pairing of data, teacher, student and objective is one line naming the
problem and the fix, exit 2, before any training step (no checkpoint, no metrics line, no weights file)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdistill.distiller import Distiller, Term
from kdistill.errors import DataError, WiringError
from kdistill.wiring import check_placement, dry_run

from tests import reliability_models
from tests.reliability_support import config, run_inprocess, write_config, write_idx_dataset

M = "tests.reliability_models:"


def bad(**over):
    """(config overrides, IDX dataset overrides) of one fault."""
    return over


FAULTS = {
    "class counts differ": (
        bad(student={"name": M + "wrong_classes", "kwargs": {}}, distill={"alpha": 1.0}, baseline=False), {},
        ["term 'kd': student output (32, 9) and teacher output (32, 10) differ (class counts must match)",
         "give the student as many outputs as the teacher has classes"]),
    "labels beyond the student's outputs": (
        bad(student={"name": M + "wrong_classes", "kwargs": {}}), {},
        ["labels outside 0..8 for a student with 9 outputs"]),
    "labels beyond the classes in the data": (
        {}, {"labels": np.r_[np.full(639, 3), 10].astype(np.uint8)},
        ["dataset 'fashion_mnist': labels outside 0..9 (min 3, max 10)", "relabel to 0..num_classes-1"]),
    "tap path that does not exist": (
        bad(teacher={"name": "cnn2d", "kwargs": {"channels": [8, 16]}},
            distill={"terms": [{"loss": "ce"}, {"loss": "hint", "student": "feat", "teacher": "tfeat"}],
                     "taps": {"feat": "1", "tfeat": "feature.2"}}), {},
        ["no module 'feature.2' in CNN2d", "closest: features.2"]),
    "adapter impossible": (
        bad(teacher={"name": "cnn2d", "kwargs": {"channels": [8, 16]}},
            distill={"terms": [{"loss": "ce"}, {"loss": "hint", "student": "feat", "teacher": "tfeat"}],
                     "taps": {"feat": "1", "tfeat": "features.0"}}), {},
        ["cannot adapt a student feature of shape (32, 16) to a teacher feature of shape (32, 8, 28, 28)",
         "tap layers of the same kind"]),
    "dtype differs": (
        bad(teacher={"name": M + "double_mlp", "kwargs": {}}), {},
        ["the teacher's parameters are float64 but the inputs are float32", "(stage 'student')",
         "build the teacher in float32"]),
    "device differs (weights never materialized)": (
        bad(student={"name": M + "meta_mlp", "kwargs": {}}), {},
        ["the student has parameters on the 'meta' device"]),
    "forward fails on the data": (
        bad(student={"name": M + "sequence_model", "kwargs": {}}), {},
        ["the student's forward fails on the first batch (inputs (32, 1, 28, 28) float32 on cpu): ",
         "make the student accept the dataset's inputs"]),
    "vocabulary differs": (
        bad(teacher={"name": M + "vocab_model", "kwargs": {"vocab_size": 100}},
            student={"name": M + "vocab_model", "kwargs": {"vocab_size": 120}}), {},
        ["student vocabulary size 120 != teacher vocabulary size 100"]),
    "empty dataset": (
        {}, {"images": np.zeros((0, 28, 28), np.uint8), "labels": np.zeros(0, np.uint8)},
        ["dataset 'fashion_mnist' is empty"]),
    "NaN and Inf in the inputs": (
        {}, {"images": np.where(np.arange(640 * 784).reshape(640, 28, 28) % 9973 == 0, np.nan,
                                np.ones((640, 28, 28))).astype(">f4")},
        ["dataset 'fashion_mnist': inputs contain NaN or Inf"]),
    "student batch larger than the data (found before the teacher trains)": (
        bad(train={"batch_size": 1000}), {},
        ["dataset 'fashion_mnist' has 640 samples, fewer than one batch of 1000", "use batch_size <= 640"]),
    "model keyword the factory does not take": (
        bad(student={"name": "mlp", "kwargs": {"hiden": [16]}}), {},
        ["cannot build 'mlp'", "hiden"]),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_wiring_fault_is_one_line_exit_2_before_training(fault, tmp_path, capsys):
    over, data, expected = FAULTS[fault]
    root = write_idx_dataset(tmp_path / "data", **data)
    cfg = config(root, **over)
    path = write_config(tmp_path, cfg)
    run_dir = tmp_path / "run"
    code, out, err = run_inprocess(["run", path, "--out", run_dir, "--no-progress"], capsys)
    assert code == 2, (fault, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdistill: error: "), err
    assert "Traceback" not in out + err
    for part in expected:
        assert part in lines[0], (part, lines[0])
    # before any training: nothing but the resolved config in the run directory
    if run_dir.exists():
        assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_the_engine_runs_the_same_check_for_any_distiller():
    """The check is the engine's too (`Engine.fit` calls `dry_run`): here on a hand-built distiller."""
    student = reliability_models.mlp((5,), 3)
    teacher = reliability_models.double_mlp((5,), 3)
    batch = {"x": torch.randn(4, 5), "y": torch.tensor([0, 1, 2, 0])}
    with pytest.raises(WiringError, match="teacher's parameters are float64 but the inputs are float32"):
        dry_run(Distiller(student, teacher, [Term("kd", "kd")]), batch)
    with pytest.raises(DataError, match="1 row\\(s\\) of 'x' contain NaN or Inf"):
        dry_run(Distiller(student, None, [Term("ce", "ce")]), {**batch, "x": batch["x"].index_fill(0,
                                                                                                torch.tensor([2]),
                                                                                                float("inf"))})
    dry_run(Distiller(student, reliability_models.mlp((5,), 3), [Term("kd", "kd")]), batch)  # a good pairing


def test_device_mismatch_is_named():
    student = reliability_models.mlp((5,), 3)
    with pytest.raises(WiringError, match=r"the student's parameters are on cpu but the batch is on meta"):
        check_placement(student, torch.empty(4, 5, device="meta"), "student")
