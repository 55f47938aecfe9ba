"""Hot-loop hygiene of the engine: no host syncs between log points, one student forward per micro-batch, the
teacher under inference mode (or not run at all from a cache), channels_last inputs, cache reads in the loader."""

import collections
import traceback

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from kdistill.config import TrainConfig
from kdistill.data import ArrayDataset
from kdistill.distiller import Distiller, LiveTeacher, Term
from kdistill.engine import Engine
from kdistill.teachers import CacheSpec, build_cache

# ops that make the host wait for the device: reading a value (.item(), bool(), float(), int()), data-dependent
# shapes (nonzero, boolean-mask indexing, masked_select)
_SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}


class SyncCounter(TorchDispatchMode):
    """Counts host-sync ops by the kdistill line that caused them. Ops inside torch.optim are skipped: its step
    counters live on the host by design (no device sync on an accelerator), as do the CPU-only label range checks
    of the losses (`_check_labels`, skipped for tensors on an accelerator)."""

    def __init__(self):
        super().__init__()
        self.hits = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name == "aten.index.Tensor" and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] or []))
        if name in _SYNC_OPS or bool_index:
            stack = traceback.extract_stack()[:-1]
            if not any("/torch/optim/" in f.filename or f.name == "_check_labels" for f in stack):
                ours = [f for f in stack if "/kdistill/" in f.filename]
                where = f"{ours[-1].filename.split('kdistill/')[-1]}:{ours[-1].lineno}" if ours else "?"
                self.hits[where] += 1
        return func(*args, **(kwargs or {}))


def blobs(n=192, d=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(classes, d, generator=g)[y] * 3 + torch.randn(n, d, generator=g)
    return ArrayDataset({"x": x, "y": y}, "blobs")


def net(seed, d=6, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, classes))


def teachers(tmp_path, data):
    teacher = net(1)
    yield "live", LiveTeacher(teacher)
    yield "dense cache", build_cache(LiveTeacher(teacher), data, tmp_path / "dense")
    yield "topk cache", build_cache(LiveTeacher(teacher), data, tmp_path / "topk",
                                    CacheSpec(kind="topk", k=2, temperature=2.0))


def test_no_host_sync_between_log_points(tmp_path):
    data = blobs()
    terms = [Term("ce", "ce", 0.1), Term("kd", "kd", 0.9, params={"temperature": 2.0})]
    for label, teacher in teachers(tmp_path, data):
        counts = []
        for steps in (4, 12):  # same log points (only the last step): the difference is the per-step syncs
            cfg = TrainConfig(steps=steps, batch_size=32, log_every=1000, grad_accum=2, clip_grad_norm=1.0)
            with SyncCounter() as counter:
                Engine(cfg, None, progress=False).fit(Distiller(net(0), teacher, terms), data)
            counts.append(counter.hits)
        assert counts[1] == counts[0], f"{label}: per-step host syncs at {counts[1] - counts[0]}"


def test_one_student_forward_per_micro_batch_and_teacher_in_inference_mode(tmp_path):
    data = blobs()
    for label, teacher in teachers(tmp_path, data):
        student, calls = net(0), collections.Counter()
        student.register_forward_pre_hook(lambda m, a: calls.update(["student"]))
        teacher_model = net(1)
        if label == "live":
            teacher = LiveTeacher(teacher_model)

        def teacher_hook(module, args):
            calls.update(["teacher"])
            calls.update(["teacher in inference mode"] if torch.is_inference_mode_enabled() else [])

        teacher_model.register_forward_pre_hook(teacher_hook)
        cfg = TrainConfig(steps=5, batch_size=32, grad_accum=2, log_every=2)
        terms = [Term("kd", "kd", params={"temperature": 2.0})]
        Engine(cfg, None, progress=False).fit(Distiller(student, teacher, terms), data)
        assert calls["student"] == 5 * 2 + 1, label  # + the dry run on the first batch
        if label == "live":
            assert calls["teacher"] == calls["teacher in inference mode"] == 5 * 2 + 1
        else:
            assert calls["teacher"] == 0, label  # a cached teacher never runs the model


def test_channels_last_inputs_and_weights():
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset({"x": torch.randn(64, 3, 8, 8, generator=g), "y": torch.randint(0, 3, (64,), generator=g)})
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    seen = []
    for model in (student, teacher):
        model[0].register_forward_pre_hook(lambda m, a: seen.append(
            a[0].is_contiguous(memory_format=torch.channels_last)
            and m.weight.is_contiguous(memory_format=torch.channels_last)))
    cfg = TrainConfig(steps=3, batch_size=16, channels_last=True, log_every=1)
    Engine(cfg, None, progress=False).fit(Distiller(student, teacher, [Term("kd", "kd")]), data)
    assert len(seen) == 2 * (3 + 1) and all(seen)


def test_compile_flag_compiles_the_student(monkeypatch):
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    student = net(0)
    Engine(TrainConfig(steps=1, batch_size=32, compile=True), None, progress=False).fit(
        Distiller(student, None, [Term("ce", "ce")]), blobs())
    assert compiled == [student]


class RowsOnly(torch.utils.data.Dataset):
    """A map-style dataset with no `batch` method: the engine uses a DataLoader (workers, pinning)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


@pytest.mark.parametrize("workers", [0, 1])
def test_cache_reads_happen_in_the_data_loader(tmp_path, workers):
    data = blobs()
    teacher = build_cache(LiveTeacher(net(1)), data, tmp_path)
    reads = []
    gather = teacher.reader.gather
    teacher.reader.gather = lambda rows: reads.append(len(rows)) or gather(rows)
    cfg = TrainConfig(steps=4, batch_size=32, num_workers=workers, log_every=2)
    Engine(cfg, None, progress=False).fit(Distiller(net(0), teacher, [Term("kd", "kd")]), RowsOnly(data))
    if workers:
        assert reads == [] and teacher.reader._maps is None  # every read ran in the worker process
    else:
        assert reads == [32] * (4 + 1)  # collate + prefetch in the main process, nothing in the step itself
