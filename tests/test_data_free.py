"""Data-free distillation: DeepInversion terms against float64 references, BN hooks, the synthesis cache, DFAD steps,
the data-free run that never reads the training split, and the config's one-line errors."""

import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from kdistill.datafree.config import DeepInversionConfig, DFADConfig
from kdistill.datafree.inversion import (BNStatistics, bn_feature_loss, competition_loss, l2_prior,
                                         synthesize_batch, tv_prior)
from kdistill.errors import WiringError
from kdistill.models.zoo import CNN2d, MLP


def _teacher(seed=0, channels=(4, 8), shape=(1, 8, 8)):
    torch.manual_seed(seed)
    model = CNN2d(shape, 3, channels)
    with torch.no_grad():  # running statistics that differ from a fresh layer's (0, 1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _manual_bn_inputs(model: CNN2d, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every BatchNorm layer of a CNN2d, by an explicit float64 forward (no hooks)."""
    model = model.double()
    h, found = x.double(), []
    for layer in model.features:
        if isinstance(layer, nn.Sequential):
            conv, bn, _ = layer
            c = conv(h)
            found.append(c)
            h = torch.relu((c - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var + bn.eps)[None, :, None, None]
                           * bn.weight[None, :, None, None] + bn.bias[None, :, None, None])
        else:
            h = layer(h)
    return found


def test_bn_hooks_and_r_feature_match_a_float64_computation():
    model = _teacher()
    x = torch.rand(6, 1, 8, 8)
    with BNStatistics(model) as stats:
        model(x)
        assert len(stats.pairs) == 2
        loss = bn_feature_loss(stats.pairs, first_weight=3.0)
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed on exit
    expected = 0.0
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for i, (c, bn) in enumerate(zip(_manual_bn_inputs(model, x), bns)):
        flat = c.permute(1, 0, 2, 3).reshape(c.shape[1], -1).detach().numpy()
        mean = flat.mean(1)
        var = ((flat - mean[:, None]) ** 2).mean(1)  # biased, as BatchNorm normalises
        term = np.sqrt(((mean - bn.running_mean.double().numpy()) ** 2).sum()) + \
            np.sqrt(((var - bn.running_var.double().numpy()) ** 2).sum())
        expected += (3.0 if i == 0 else 1.0) * term
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)


def test_no_batchnorm_is_a_one_line_wiring_error():
    with pytest.raises(WiringError) as err:
        BNStatistics(MLP((4,), 3, (8,)))
    assert "BatchNorm" in str(err.value) and "dfad" in str(err.value) and "\n" not in str(err.value)


def test_priors_and_competition_match_explicit_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64)
    a = x.numpy()
    tv = np.mean([((np.diff(a[i], axis=1) ** 2).mean() + (np.diff(a[i], axis=2) ** 2).mean()) for i in range(3)])
    assert float(tv_prior(x)) == pytest.approx(tv, rel=1e-12)
    assert float(l2_prior(x)) == pytest.approx(np.mean([np.sqrt((a[i] ** 2).sum()) for i in range(3)]), rel=1e-12)
    t, s = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    temp, rows = 2.0, []
    for ti, si in zip(t.numpy(), s.numpy()):
        p, q = np.exp(ti / temp) / np.exp(ti / temp).sum(), np.exp(si / temp) / np.exp(si / temp).sum()
        m = (p + q) / 2
        rows.append(1 - 0.5 * ((p * np.log(p / m)).sum() + (q * np.log(q / m)).sum()))
    assert float(competition_loss(t, s, temp)) == pytest.approx(np.mean(rows), rel=1e-12)
    assert float(competition_loss(t, t, temp)) == pytest.approx(1.0)


def test_synthesis_lowers_the_loss_and_leaves_the_teacher_untouched():
    model = _teacher()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = DeepInversionConfig(batches=1, batch_size=12, steps=8, lr=0.1, jitter=1)
    seen = []
    x, y = synthesize_batch(model, (1, 8, 8), 3, settings, seed=1,
                            on_step=lambda step, terms: seen.append(float(sum(terms.values()).detach())))
    assert x.shape == (12, 1, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert sorted(torch.bincount(y).tolist()) == [4, 4, 4]  # every class equally often
    assert seen[-1] < seen[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_synthesised_set_is_cached_reused_and_continued(tmp_path):
    from kdistill.datafree.synthesis import deepinversion_set

    model = _teacher()
    settings = DeepInversionConfig(batches=2, batch_size=6, steps=2)
    lines = []
    x1, y1, info1 = deepinversion_set(model, (1, 8, 8), 3, settings, seed=0, folder=tmp_path, log=lines.append)
    assert info1["batches_made"] == 2 and len(list(tmp_path.glob("*.safetensors"))) == 1
    x2, y2, info2 = deepinversion_set(model, (1, 8, 8), 3, settings, seed=0, folder=tmp_path, log=lines.append)
    assert info2["batches_made"] == 0 and torch.equal(x1, x2) and torch.equal(y1, y2)
    more = settings.model_copy(update={"steps": 3})  # other settings: another file
    _, _, info3 = deepinversion_set(model, (1, 8, 8), 3, more, seed=0, folder=tmp_path, log=lines.append)
    assert info3["batches_made"] == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2
    other = _teacher(seed=5)  # another teacher: another file
    _, _, info4 = deepinversion_set(other, (1, 8, 8), 3, settings, seed=0, folder=tmp_path, log=lines.append)
    assert info4["batches_made"] == 2 and len(list(tmp_path.glob("*.safetensors"))) == 3
    # a partial set (1 of 2 batches) is continued, its first batch kept
    part = tmp_path / "part"
    xa, _, _ = deepinversion_set(model, (1, 8, 8), 3, settings.model_copy(update={"batches": 1}), seed=0,
                                 folder=part, log=lines.append)
    files = list(part.glob("*.safetensors"))
    files[0].rename(tmp_path / "moved")  # key includes the batch count: store the partial file under the full key
    from kdistill.datafree.cache import SynthesisCache, synthesis_key

    key = synthesis_key(model, (1, 8, 8), 3, "deepinversion", settings.model_dump(mode="json"), 0)
    cache = SynthesisCache(part, key)
    cache.save([xa], [torch.zeros(6, dtype=torch.long)], complete=False)
    xb, _, info5 = deepinversion_set(model, (1, 8, 8), 3, settings, seed=0, folder=part, log=lines.append)
    assert info5["batches_made"] == 1 and torch.equal(xb[:6], xa)


def test_adaptive_synthesis_trains_a_competing_student(tmp_path):
    from kdistill.datafree.synthesis import deepinversion_set

    model = _teacher()
    made = []

    def factory():
        torch.manual_seed(3)
        made.append(CNN2d((1, 8, 8), 3, (4,)))
        return made[-1]

    settings = DeepInversionConfig(batches=2, batch_size=6, steps=2, compete_weight=1.0, student_steps=2)
    x, _, info = deepinversion_set(model, (1, 8, 8), 3, settings, seed=0, folder=tmp_path, student_factory=factory,
                                   log=lambda line: None)
    assert len(made) == 1 and x.shape[0] == 12 and info["batches_made"] == 2


def test_dfad_steps_move_the_discrepancy_the_right_way():
    from kdistill.datafree.dfad import Generator, dfad_generator_step, dfad_student_step, discrepancy

    teacher, student = _teacher(), _teacher(seed=9, channels=(4,))
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    gen = Generator((1, 8, 8), z_dim=8)
    z = torch.randn(16, 8)
    t64, s64 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    assert float(discrepancy(t64, s64)) == pytest.approx(np.abs(t64.numpy() - s64.numpy()).mean(), rel=1e-12)

    def gap():
        with torch.no_grad():
            gen.train()
            x = gen(z)
            return float(discrepancy(teacher(x), student.eval()(x)))

    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_state = {k: v.clone() for k, v in student.state_dict().items()}
    before = gap()
    student.eval()
    dfad_generator_step(gen, teacher, student, torch.optim.SGD(gen.parameters(), lr=0.05), z)
    after_gen = gap()
    assert after_gen > before  # the generator ascends the discrepancy
    assert all(torch.equal(student_state[k], v) for k, v in student.state_dict().items())
    dfad_student_step(gen, teacher, student, torch.optim.SGD(student.parameters(), lr=0.05), z)
    student.eval()
    assert gap() < after_gen  # the student descends it
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())


# -- the job: data.train none never reads the training split -----------------------------------------------------
def _write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())


@pytest.fixture
def tiny_fashion(tmp_path):
    """A Fashion-MNIST folder with 40 test images and a teacher's weights file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fm"
    root.mkdir()
    for prefix, n in (("train", 50), ("t10k", 40)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28), dtype=np.uint8), 0x08)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8), 0x08)
    from kdistill.files import save_weights

    torch.manual_seed(0)
    save_weights(tmp_path / "teacher.safetensors", CNN2d((1, 28, 28), 10, (4, 8)).state_dict())
    return tmp_path


def _config(folder, **over):
    cfg = {"data": {"name": "fashion_mnist", "root": str(folder / "fm"), "train": "none"},
           "teacher": {"name": "cnn2d", "kwargs": {"channels": [4, 8]}, "weights": str(folder / "teacher.safetensors")},
           "student": {"name": "cnn2d", "kwargs": {"channels": [4]}},
           "train": {"steps": 3, "batch_size": 8, "log_every": 3, "checkpoint_every": 3},
           "eval": {"latency_repeats": 1, "throughput_batch": 4, "threads": 1},
           "data_free": {"method": "deepinversion", "deepinversion": {"batches": 1, "batch_size": 8, "steps": 2}}}
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def _forbid_training_split(monkeypatch):
    import kdistill.data.builtin as builtin

    real = builtin.read_idx

    def guarded(path):
        assert "train-" not in str(path), f"the training split was read: {path}"
        return real(path)

    def refuse(*args, **kwargs):
        raise AssertionError("the training-split loader was called")

    monkeypatch.setattr(builtin, "read_idx", guarded)
    monkeypatch.setattr(builtin, "fashion_mnist", refuse)
    monkeypatch.setattr(builtin, "load_data", refuse)


@pytest.mark.parametrize("method", ["deepinversion", "dfad"])
def test_data_free_run_never_reads_the_training_split(tiny_fashion, monkeypatch, method):
    from kdistill.config import parse_config
    from kdistill.tasks.classification import _run

    _forbid_training_split(monkeypatch)
    over = {"data_free": {"method": method, "deepinversion": {"batches": 1, "batch_size": 8, "steps": 2},
                          "dfad": {"iterations": 2, "student_steps": 1, "batch_size": 8, "z_dim": 4}}}
    cfg = parse_config(_config(tiny_fashion, **over))
    out = tiny_fashion / f"run-{method}"
    summary = _run(cfg, out, progress=False, log=lambda line: None)
    assert summary["data_free"]["method"] == method and summary["data_free"]["train"] == "none"
    assert "baseline" not in summary and 0 <= summary["student"]["accuracy"] <= 1
    assert (out / "student.safetensors").is_file()
    if method == "deepinversion":
        assert summary["data_free"]["transfer_size"] == 8 and list((out / "synthesis").glob("*.safetensors"))
        # the rerun reuses the finished stage and the synthesised set
        again = _run(cfg, out, progress=False, log=lambda line: None)
        assert again["data_free"]["synthesis"]["batches_made"] == 0
        from kdistill.tasks.classification import _evaluate

        evaluated = _evaluate(out, log=lambda line: None)  # kdistill eval RUN_DIR: still without the training split
        assert evaluated["student"]["accuracy"] == pytest.approx(summary["student"]["accuracy"])


def _cli_error(tmp_path, capsys, cfg):
    from kdistill.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["run", str(path), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_config_mistakes_are_one_line_exit_2(tiny_fashion, capsys, monkeypatch):
    _forbid_training_split(monkeypatch)
    base = _config(tiny_fashion)
    err = _cli_error(tiny_fashion, capsys, {k: v for k, v in base.items() if k != "teacher"})
    assert "teacher" in err
    no_weights = {**base, "teacher": {"name": "cnn2d"}}
    assert "teacher.weights" in _cli_error(tiny_fashion, capsys, no_weights)
    assert "data_free" in _cli_error(tiny_fashion, capsys, {k: v for k, v in base.items() if k != "data_free"})
    labels = {**base, "distill": {"terms": [{"loss": "ce"}, {"loss": "kd"}]}}
    assert "needs labels" in _cli_error(tiny_fashion, capsys, labels)
    both = _config(tiny_fashion, data_free={"method": "dfad"})
    both["data"] = {**both["data"], "transfer": {"boundary": {"steps": 1}}}
    assert "boundary" in _cli_error(tiny_fashion, capsys, both)
    from kdistill.files import save_weights

    torch.manual_seed(0)
    save_weights(tiny_fashion / "mlp.safetensors", MLP((1, 28, 28), 10, (8,)).state_dict())
    mlp_teacher = {**base, "teacher": {"name": "mlp", "kwargs": {"hidden": [8]},
                                       "weights": str(tiny_fashion / "mlp.safetensors")}}
    err = _cli_error(tiny_fashion, capsys, mlp_teacher)
    assert "BatchNorm" in err and "dfad" in err


def test_dump_and_reload_keeps_the_data_free_sections(tiny_fashion):
    from kdistill.config import parse_config
    from kdistill.tasks import dump_config

    cfg = parse_config(_config(tiny_fashion))
    again = parse_config(yaml.safe_load(dump_config(cfg)))
    assert again.data.train == "none" and again.data_free.method == "deepinversion"
    assert json.loads(again.model_dump_json()) == json.loads(cfg.model_dump_json())
    assert math.isclose(again.data_free.deepinversion.lr, 0.15)
