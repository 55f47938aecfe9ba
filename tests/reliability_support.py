"""Shared pieces of the reliability tests: a seconds-long deterministic config and ways to run the CLI."""

from __future__ import annotations

import copy
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from kdistill.cli import main

REPO = Path(__file__).resolve().parents[1]
MODELS = "tests.reliability_models:mlp"

# a small Fashion-MNIST-format dataset (written by `write_idx_dataset`: reading it needs no heavy import, so a
# fresh process starts fast) with every stage: teacher (trained), baseline, student; the models come from
# tests/reliability_models.py so that faults can be injected by environment variables
CONFIG = {
    "seed": 0,
    "data": {"name": "fashion_mnist", "root": None},
    "teacher": {"name": MODELS, "kwargs": {"hidden": [32], "role": "teacher"},
                "train": {"steps": 30, "batch_size": 32, "log_every": 1, "checkpoint_every": 4}},
    "student": {"name": MODELS, "kwargs": {"hidden": [16]}},
    "distill": {"alpha": 0.9, "temperature": 2.0},
    "train": {"steps": 30, "batch_size": 32, "log_every": 1, "checkpoint_every": 7, "eval_every": 10,
              "deterministic": True},
    "eval": {"latency_repeats": 1, "throughput_batch": 8},
}
STEPS = 30
WEIGHTS = ("teacher.safetensors", "baseline.safetensors", "student.safetensors")


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (the MNIST format): magic 0, 0, dtype code, ndim; big-endian uint32 dims; the data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D}
    array = np.ascontiguousarray(array)
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    Path(path).write_bytes(header + array.tobytes())


def write_idx_dataset(folder: Path, train: int = 640, test: int = 160, *, images=None, labels=None) -> Path:
    """Fashion-MNIST files (28 x 28, 10 classes) with learnable synthetic classes: class c is a bright bar at
    rows 2c+4..2c+5 on uniform noise. `images` / `labels` replace the training split's arrays."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        y = rng.integers(0, 10, size=n).astype(np.uint8)
        x = rng.integers(0, 120, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            x[i, 2 * c + 4:2 * c + 6, 4:24] = 250
        if prefix == "train":
            x = x if images is None else images
            y = y if labels is None else labels
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y)
    return folder


def config(root: Path, **over) -> dict:
    cfg = copy.deepcopy(CONFIG)
    cfg["data"]["root"] = str(root)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(folder: Path, cfg: dict) -> Path:
    path = Path(folder) / "config-in.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_inprocess(args: list[str], capsys) -> tuple[int, str, str]:
    """`kdistill ARGS` in this process: (exit code, stdout, stderr)."""
    from tests import reliability_models

    reliability_models.reset_counts()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "kdistill.cli", *[str(a) for a in args]]


def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDISTILL_TEST_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra})
    return env


def run_subprocess(*args, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`python -m kdistill.cli ARGS` in a fresh process (the way a user runs it), from the repository root."""
    return subprocess.run(cli_command(*args), cwd=REPO, env=cli_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(run_dir: Path) -> list[str]:
    """Half-written files or folders (``*.tmp``) anywhere in a run directory."""
    return sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).rglob("*") if p.name.endswith(".tmp"))
