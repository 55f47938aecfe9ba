"""Safe loading of user weights: safetensors, or `torch.load(weights_only=True)` for .pt/.pth; full unpickling
(which runs code from the file) only with --trust-checkpoint, and a message that says why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests import reliability_models
from tests.reliability_support import config, run_inprocess, write_config, write_idx_dataset


class Payload:
    """Unpickling this runs code (it creates a file): what a malicious .pt file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def teacher_state():
    return reliability_models.mlp((1, 28, 28), 10, hidden=(32,), role="teacher").state_dict()


def run_with_teacher_weights(tmp_path, capsys, weights: Path, *extra):
    root = tmp_path / "data"
    if not root.is_dir():
        write_idx_dataset(root)
    cfg = config(root, teacher={"weights": str(weights)}, baseline=False, train={"steps": 4})
    path = write_config(tmp_path, cfg)
    return run_inprocess(["run", path, "--out", tmp_path / f"run-{weights.name}", "--no-progress", *extra], capsys)


def one_line_error(code, err) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_a_plain_state_dict_loads_without_trust(tmp_path, capsys, suffix):
    torch.save(teacher_state(), tmp_path / f"teacher{suffix}")
    code, out, err = run_with_teacher_weights(tmp_path, capsys, tmp_path / f"teacher{suffix}")
    assert code == 0, err
    assert not (tmp_path / f"run-teacher{suffix}" / "teacher.safetensors").exists()  # loaded, not trained


def test_pickled_objects_are_refused_without_trust_and_loaded_with_it(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": teacher_state(), "note": Payload(marker)}, tmp_path / "teacher.pt")
    code, out, err = run_with_teacher_weights(tmp_path, capsys, tmp_path / "teacher.pt")
    line = one_line_error(code, err)
    assert "holds Python objects beyond tensors" in line and "(teacher.weights)" in line
    assert "--trust-checkpoint" in line and "arbitrary code" in line
    assert not marker.exists()  # nothing in the file was executed
    assert not (tmp_path / "run-teacher.pt" / "metrics.jsonl").exists()
    code, out, err = run_with_teacher_weights(tmp_path, capsys, tmp_path / "teacher.pt", "--trust-checkpoint")
    assert code == 0, err
    assert marker.exists()  # full unpickling did run the file's code: the reason it needs the flag


def test_damaged_and_mismatched_weights_are_one_line(tmp_path, capsys):
    state = teacher_state()
    save_file(state, str(tmp_path / "t.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "t.safetensors").read_bytes()[:300])
    torch.save(state, tmp_path / "t.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "t.pt").read_bytes()[:300])
    other = reliability_models.mlp((1, 28, 28), 10, hidden=(24,)).state_dict()
    other["extra.bias"] = torch.zeros(3)
    del other["1.bias"]
    save_file(other, str(tmp_path / "other.safetensors"))
    (tmp_path / "t.npz").write_bytes(b"npz")
    cases = {
        "cut.safetensors": ["cannot read weights", "cut.safetensors", "the file is damaged"],
        "cut.pt": ["cannot read", "cut.pt", "(teacher.weights)", "the file is damaged or not a PyTorch file"],
        "other.safetensors": ["do not fit the model", "missing: 1.bias", "unexpected: extra.bias",
                              "shape file vs model: 1.weight (24, 784) vs (32, 784)",
                              "use weights saved from the same model name and kwargs"],
        "t.npz": ["unknown weights format '.npz'", "use .safetensors"],
        "missing.safetensors": ["weights file not found"],
    }
    for name, parts in cases.items():
        code, out, err = run_with_teacher_weights(tmp_path, capsys, tmp_path / name)
        line = one_line_error(code, err)
        for part in parts:
            assert part in line, (name, part, line)
