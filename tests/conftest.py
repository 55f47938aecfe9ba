import os

import pytest
import torch


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
