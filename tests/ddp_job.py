"""Run by tests/test_ddp.py under torchrun: a tiny KD job; each rank saves its final student weights."""

import sys

import torch
from torch import nn

from kdistill.config import TrainConfig
from kdistill.data import ArrayDataset
from kdistill.distiller import Distiller, Term
from kdistill.engine import Engine, get_accelerator, save_weights


def main(out: str) -> None:
    torch.set_num_threads(1)
    acc = get_accelerator("no")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = ArrayDataset({"x": x, "y": y}, "toy")
    # different init per rank on purpose: DDP must broadcast rank 0's weights
    torch.manual_seed(acc.process_index)
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    torch.manual_seed(100)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    d = Distiller(student, teacher, [Term("ce", "ce", 0.5), Term("kd", "kd", 0.5, params={"temperature": 2.0})])
    cfg = TrainConfig(steps=30, batch_size=16, grad_accum=2, lr=0.01, log_every=10, clip_grad_norm=1.0)
    Engine(cfg, None, progress=False).fit(d, data)
    # the teacher is not wrapped: it is a plain module outside the DDP student side
    assert type(d.teacher.model) is nn.Sequential
    assert type(d.module).__name__ != "DistributedDataParallel"  # unwrapped after fit
    save_weights(f"{out}/rank{acc.process_index}.safetensors", d.export_student().state_dict(),
                 {"world_size": acc.num_processes})


if __name__ == "__main__":
    main(sys.argv[1])
