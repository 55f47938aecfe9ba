import contextlib
import os

import pytest
import torch
from torch import nn

from kdistill.data import ArrayDataset

# a finished run writes report.html (about a second with its plots): only the tests about the report need it, and
# they turn it on with `report_on()`; the others would pay it in every run they make
os.environ["KDISTILL_REPORT"] = "off"


@contextlib.contextmanager
def report_on():
    """Runs made inside write their report.html, as they do outside the tests."""
    os.environ["KDISTILL_REPORT"] = "on"
    try:
        yield
    finally:
        os.environ["KDISTILL_REPORT"] = "off"


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # tiny models: one thread avoids oversubscription on small CI machines
    prev = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("KDISTILL_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(prev)


def tiny_config(**over):
    """A config dict for a seconds-long offline KD run on mnist1d."""
    cfg = {
        "data": {"name": "mnist1d", "train_size": 512, "transfer": {"size": 256, "seed": 1}},
        "teacher": {"name": "cnn1d", "kwargs": {"channels": 8, "depth": 3},
                    "train": {"steps": 20, "batch_size": 64, "log_every": 10}},
        "student": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "distill": {"alpha": 0.9, "temperature": 2.0},
        "train": {"steps": 20, "batch_size": 64, "log_every": 10, "checkpoint_every": 10},
        "eval": {"latency_repeats": 2, "throughput_batch": 8},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def blobs(n=256, d=6, classes=3, seed=0):
    """Gaussian blobs: an easy, seconds-long classification task."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return ArrayDataset({"x": centers[y] + torch.randn(n, d, generator=g), "y": y}, "blobs")


def mlp(seed=0, d=6, classes=3, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, classes))
