import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors import safe_open


def test_two_process_ddp_ranks_end_identical(tmp_path):
    """Two CPU processes (gloo) under torchrun: DDP keeps both ranks' students bit-identical."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(Path(__file__).with_name("ddp_job.py")), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(tmp_path / "rank0.safetensors"))
    b = load_file(str(tmp_path / "rank1.safetensors"))
    with safe_open(str(tmp_path / "rank0.safetensors"), "pt") as fh:
        assert fh.metadata()["world_size"] == "2"
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
