"""Checkpoints: what they hold, atomic writes, last-N retention, and every kind of damage detected by the
checksums recorded at write time, with a fallback to the previous good checkpoint (a warning, never a
traceback and never an unpickled object)."""

from __future__ import annotations

import errno
import hashlib
import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill import files as files_mod
from kdistill.config import TrainConfig
from kdistill.data import ArrayDataset
from kdistill.distiller import Distiller, Term
from kdistill.engine import Engine
from kdistill.engine import checkpoint as ckpt_mod
from kdistill.engine.checkpoint import list_checkpoints, load_latest, step_of, verify
from kdistill.errors import CheckpointError

CFG = TrainConfig(steps=12, batch_size=16, checkpoint_every=4, keep_checkpoints=3, log_every=4, lr=0.01)


def blobs(n=96, d=5, classes=3):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(classes, d, generator=g)[y] * 3 + torch.randn(n, d, generator=g)
    return ArrayDataset({"x": x, "y": y}, "blobs")


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3))


def fit(run_dir: Path, cfg: TrainConfig = CFG, seed: int = 0, logs: list | None = None) -> tuple[nn.Module, dict]:
    net = model(seed)
    log = logs.append if logs is not None else (lambda msg: None)
    result = Engine(cfg, run_dir, progress=False, seed=3, log=log).fit(Distiller(net, None, [Term("ce", "ce")]),
                                                                        blobs())
    return net, result


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run with checkpoints at steps 4, 8, 12 and its final weights."""
    run_dir = tmp_path_factory.mktemp("trained")
    net, _ = fit(run_dir)
    return run_dir, net


def stage_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "student"


def test_checkpoint_holds_the_whole_training_state(trained):
    run_dir, _ = trained
    newest = list_checkpoints(stage_dir(run_dir))[-1]
    assert sorted(p.name for p in newest.iterdir()) == ["meta.json", "model.safetensors", "rng-rank0.pt", "state.pt"]
    state = torch.load(newest / "state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "step", "position", "world_size", "metrics_window"} <= set(state)
    assert state["position"] == {"epoch": 2, "batch_in_epoch": 0, "steps_per_epoch": 6}
    assert state["scheduler"]["last_epoch"] == 12 and len(state["optimizer"]["state"]) == 4
    rng = torch.load(newest / "rng-rank0.pt", weights_only=True)
    assert {"torch", "numpy_keys", "numpy_meta", "python_state", "python_version"} <= set(rng)
    meta = json.loads((newest / "meta.json").read_text())
    for name, digest in meta["files"].items():
        assert hashlib.sha256((newest / name).read_bytes()).hexdigest() == digest


def test_only_the_last_n_are_kept(tmp_path):
    fit(tmp_path, CFG.model_copy(update={"keep_checkpoints": 2, "checkpoint_every": 2}))
    assert [step_of(p) for p in list_checkpoints(stage_dir(tmp_path))] == [10, 12]


def _flip(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _damages():
    """(label, function(checkpoint folder)) for every damage a kill, a disk or a person can do to one."""
    out = []
    for name in ("model.safetensors", "state.pt", "rng-rank0.pt"):
        out.append((f"{name} truncated to half", lambda c, n=name: (c / n).write_bytes((c / n).read_bytes()[
            :len((c / n).read_bytes()) // 2])))
        out.append((f"{name} emptied", lambda c, n=name: (c / n).write_bytes(b"")))
        out.append((f"{name} deleted", lambda c, n=name: (c / n).unlink()))
        for seed in range(4):
            out.append((f"{name} bit flip #{seed}", lambda c, n=name, s=seed: _flip(c / n, random.Random(s))))
        out.append((f"{name} replaced by text", lambda c, n=name: (c / n).write_text("not a checkpoint")))
    meta_variants = {
        "meta.json deleted": None,
        "meta.json not JSON": "{\"step\": 12, \"files\": {",
        "meta.json not UTF-8": b"\xff\xfe\x00garbage",
        "meta.json a list": "[1, 2, 3]",
        "meta.json without files": json.dumps({"step": 12}),
        "meta.json files not a mapping": json.dumps({"step": 12, "files": 3}),
        "meta.json step is text": "STEP",
        "meta.json step of another checkpoint": "STEP8",
        "meta.json without model entry": "NOMODEL",
    }
    for label, content in meta_variants.items():
        out.append((label, lambda c, v=content: _damage_meta(c, v)))
    return out


def _damage_meta(ckpt: Path, variant) -> None:
    meta_path = ckpt / "meta.json"
    meta = json.loads(meta_path.read_text())
    if variant is None:
        meta_path.unlink()
    elif isinstance(variant, bytes):
        meta_path.write_bytes(variant)
    elif variant == "STEP":
        meta_path.write_text(json.dumps({**meta, "step": "12"}))
    elif variant == "STEP8":
        meta_path.write_text(json.dumps({**meta, "step": 8}))
    elif variant == "NOMODEL":
        meta_path.write_text(json.dumps({**meta, "files": {k: v for k, v in meta["files"].items()
                                                           if k != "model.safetensors"}}))
    else:
        meta_path.write_text(variant)


DAMAGES = _damages()


def test_every_damage_to_the_newest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path):
    run_dir, _ = trained
    assert len(DAMAGES) >= 30
    for label, damage in DAMAGES:
        folder = tmp_path / "ck"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(stage_dir(run_dir), folder)
        newest = list_checkpoints(folder)[-1]
        damage(newest)
        assert verify(newest) is not None, label
        logs: list[str] = []
        loaded = load_latest(folder, log=logs.append)
        assert loaded is not None and loaded["step"] == 8, label
        assert len(logs) == 1 and "step-00000012 is not usable" in logs[0] and "falling back" in logs[0], label
        assert "\n" not in logs[0] and "Traceback" not in logs[0], label


def test_resume_after_damage_uses_the_previous_checkpoint_and_ends_identical(trained, tmp_path):
    run_dir, reference = trained
    shutil.copytree(run_dir, tmp_path / "run")
    newest = list_checkpoints(stage_dir(tmp_path / "run"))[-1]
    shutil.rmtree(newest)  # the run "was killed" before its last checkpoint; now damage the one before
    _flip(list_checkpoints(stage_dir(tmp_path / "run"))[-1] / "state.pt", random.Random(7))
    logs: list[str] = []
    net, result = fit(tmp_path / "run", seed=99, logs=logs)  # another init: everything comes from step 4
    assert result["resumed_from"] == 4
    assert any("state.pt checksum mismatch" in msg for msg in logs)
    assert same_weights(net, reference)


def test_all_checkpoints_damaged_starts_the_stage_again_with_a_warning(trained, tmp_path):
    run_dir, _ = trained
    shutil.copytree(stage_dir(run_dir), tmp_path / "ck")
    for c in list_checkpoints(tmp_path / "ck"):
        (c / "model.safetensors").write_bytes(b"")
    logs: list[str] = []
    assert load_latest(tmp_path / "ck", log=logs.append) is None
    assert len(logs) == 4 and "starts again from step 0" in logs[-1]
    with warnings.catch_warnings(record=True) as caught:  # without a log function: Python warnings
        warnings.simplefilter("always")
        assert load_latest(tmp_path / "ck") is None
    assert [str(w.message) for w in caught][-1].endswith("starts again from step 0") and len(caught) == 4


class _Payload:
    """Unpickling this runs code (it creates a file): what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickled_object_with_a_matching_checksum_is_never_unpickled(trained, tmp_path):
    run_dir, _ = trained
    shutil.copytree(stage_dir(run_dir), tmp_path / "ck")
    newest = list_checkpoints(tmp_path / "ck")[-1]
    marker = tmp_path / "code-ran"
    state = torch.load(newest / "state.pt", weights_only=True)
    state["extra"] = _Payload(str(marker))
    torch.save(state, newest / "state.pt", pickle_protocol=2)
    meta = json.loads((newest / "meta.json").read_text())
    meta["files"]["state.pt"] = hashlib.sha256((newest / "state.pt").read_bytes()).hexdigest()
    (newest / "meta.json").write_text(json.dumps(meta))
    assert verify(newest) is None  # the checksum matches: only weights_only loading protects here
    logs: list[str] = []
    loaded = load_latest(tmp_path / "ck", log=logs.append)
    assert loaded["step"] == 8 and "unreadable (UnpicklingError)" in logs[0]
    assert not marker.exists()


def test_a_skipped_newer_checkpoint_is_set_aside_so_pruning_keeps_good_ones(trained, tmp_path):
    """keep_checkpoints: 1 after a fallback from a damaged step-12 to step-4: writing step 8 must keep step 8 (not
    the damaged, newer-named step 12, which pruning by step would keep)."""
    run_dir, reference = trained
    folder = tmp_path / "ck"
    shutil.copytree(stage_dir(run_dir), folder)
    shutil.rmtree(folder / "step-00000008")
    (folder / "step-00000012" / "model.safetensors").write_bytes(b"damaged")
    assert load_latest(folder, log=lambda msg: None)["step"] == 4
    ckpt_mod.CheckpointWriter(folder, keep=1).write(8, model().state_dict(), {"step": 8})
    assert [p.name for p in list_checkpoints(folder)] == ["step-00000008"]
    assert verify(folder / "step-00000008") is None
    assert (folder / "step-00000012.stale").is_dir()  # kept aside for inspection, never listed or loaded
    # and end to end: the resumed run ends identical with only good checkpoints left
    shutil.copytree(run_dir, tmp_path / "run")
    stage = stage_dir(tmp_path / "run")
    shutil.rmtree(stage / "step-00000008")
    (stage / "step-00000012" / "model.safetensors").write_bytes(b"damaged")
    net, result = fit(tmp_path / "run", CFG.model_copy(update={"keep_checkpoints": 1}), seed=99)
    assert result["resumed_from"] == 4 and same_weights(net, reference)
    assert [p.name for p in list_checkpoints(stage)] == ["step-00000012"] and verify(stage / "step-00000012") is None


def test_a_half_written_checkpoint_folder_is_ignored_and_removed(trained, tmp_path):
    run_dir, reference = trained
    shutil.copytree(run_dir, tmp_path / "run")
    folder = stage_dir(tmp_path / "run")
    (folder / "step-00000012").rename(folder / "step-00000012.tmp")
    (folder / "step-00000012.tmp" / "meta.json").unlink()
    assert [step_of(p) for p in list_checkpoints(folder)] == [4, 8]
    net, result = fit(tmp_path / "run", seed=99)
    assert result["resumed_from"] == 8 and same_weights(net, reference)
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000004", "step-00000008", "step-00000012"]


@pytest.mark.parametrize("failing", ["_torch_save_bytes", "safetensors_bytes", "meta"])
def test_full_disk_during_a_checkpoint_write(trained, tmp_path, monkeypatch, failing):
    """ENOSPC in the middle of the third checkpoint write: one line, earlier checkpoints intact and loadable,
    nothing half-written left; the next run resumes from step 8 and ends as if nothing happened."""
    run_dir, reference = trained
    calls = {"n": 0}
    full = OSError(errno.ENOSPC, "No space left on device")
    if failing == "meta":
        original_open = open

        def fake_open(path, mode="r", *args, **kwargs):
            if str(path).endswith("step-00000012.tmp/meta.json") and "w" in mode:
                raise full
            return original_open(path, mode, *args, **kwargs)

        monkeypatch.setattr("builtins.open", fake_open)
    else:
        module = ckpt_mod if failing == "_torch_save_bytes" else files_mod  # where the writer looks it up
        original = getattr(module, failing)

        def fail_third(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > (4 if failing == "_torch_save_bytes" else 2):
                raise full
            return original(*args, **kwargs)

        monkeypatch.setattr(module, failing, fail_third)
    with pytest.raises(CheckpointError) as info:
        fit(tmp_path)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message and "step-00000012" in message
    assert "earlier checkpoints are intact" in message
    folder = stage_dir(tmp_path)
    assert [step_of(p) for p in list_checkpoints(folder)] == [4, 8]
    assert all(verify(c) is None for c in list_checkpoints(folder))
    assert not any(p.name.endswith(".tmp") for p in folder.iterdir())
    net, result = fit(tmp_path, seed=99)
    assert result["resumed_from"] == 8 and same_weights(net, reference)


def test_weights_files_are_byte_reproducible(tmp_path):
    """Equal tensors and metadata give equal bytes (safetensors alone orders metadata by a per-process hash)."""
    state = {"b.weight": torch.randn(3, 4), "a.bias": torch.randn(2).double(), "10.x": torch.arange(3)}
    meta = {f"key{i}": i for i in range(8)}
    ckpt_mod.save_weights(tmp_path / "a.safetensors", state, meta)
    ckpt_mod.save_weights(tmp_path / "b.safetensors", dict(reversed(state.items())),
                          dict(reversed(meta.items())))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    loaded = ckpt_mod.load_weights(tmp_path / "a.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
