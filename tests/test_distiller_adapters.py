"""Adapters: built lazily with the right projection, trained with the student, checkpointed, restored on resume,
and absent from the exported student. Which terms get one: only losses that compare tensors element by element."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdistill.adapters import Resize, build_adapter
from kdistill.config import TrainConfig
from kdistill.data import ArrayDataset
from kdistill.distiller import Distiller, Term
from kdistill.engine import Engine
from kdistill.engine.checkpoint import list_checkpoints
from kdistill.errors import WiringError
from kdistill.losses import hint
from kdistill.models import build_model


# -- build_adapter: the projection for each kind of shape mismatch ------------------------------------------------

def test_vector_mismatch_gets_a_linear_layer():
    a = build_adapter(torch.Size([5, 8]), torch.Size([5, 16]))
    assert isinstance(a, nn.Linear) and (a.in_features, a.out_features) == (8, 16)
    assert a(torch.randn(3, 8)).shape == (3, 16)


def test_channel_mismatch_gets_a_1x1_conv_and_no_resize():
    a = build_adapter(torch.Size([5, 4, 7, 7]), torch.Size([5, 16, 7, 7]))
    assert isinstance(a, nn.Conv2d) and a.kernel_size == (1, 1) and (a.in_channels, a.out_channels) == (4, 16)
    assert a(torch.randn(3, 4, 7, 7)).shape == (3, 16, 7, 7)
    a1 = build_adapter(torch.Size([5, 4, 10]), torch.Size([5, 8, 10]))
    assert isinstance(a1, nn.Conv1d) and a1.kernel_size == (1,)


def test_spatial_mismatch_gets_conv_then_resize():
    a = build_adapter(torch.Size([5, 4, 14, 14]), torch.Size([5, 16, 7, 7]))
    assert isinstance(a, nn.Sequential)
    assert isinstance(a[0], nn.Conv2d) and isinstance(a[1], Resize) and a[1].size == (7, 7)
    assert a(torch.randn(2, 4, 14, 14)).shape == (2, 16, 7, 7)
    only_resize = build_adapter(torch.Size([5, 16, 14, 14]), torch.Size([5, 16, 7, 7]))
    assert isinstance(only_resize, Resize)
    x = torch.randn(2, 16, 14, 14)
    # bilinear halving without corner alignment = the mean of each 2x2 block
    assert torch.allclose(only_resize(x), nn.functional.avg_pool2d(x, 2), atol=1e-6)


def test_maps_cannot_be_adapted_to_vectors():
    with pytest.raises(WiringError, match="different number of dimensions"):
        build_adapter(torch.Size([5, 4, 7, 7]), torch.Size([5, 64]))


# -- the distiller's rule -----------------------------------------------------------------------------------------

def tiny_pair(seed: int = 0):
    torch.manual_seed(seed)
    student = build_model("cnn2d", {"channels": [2, 3]}, input_shape=(1, 8, 8), num_classes=5)
    teacher = build_model("cnn2d", {"channels": [4, 6]}, input_shape=(1, 8, 8), num_classes=5)
    return student, teacher


def tiny_data(n: int = 64) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    return ArrayDataset({"x": torch.randn(n, 1, 8, 8, generator=g), "y": torch.randint(0, 5, (n,), generator=g)})


STUDENT_TAPS = {"maps": "features", "big_maps": "features.0", "emb": "pool"}   # (B,3,4,4) (B,2,8,8) (B,3,1,1)
TEACHER_TAPS = {"maps": "features", "emb": "pool"}                             # (B,6,4,4) (B,6,1,1)


def make_distiller(terms, seed=0):
    student, teacher = tiny_pair(seed)
    return Distiller(student, teacher, terms, student_taps=STUDENT_TAPS, teacher_taps=TEACHER_TAPS)


def test_only_same_shape_losses_get_adapters():
    terms = [Term("ce", "ce"), Term("kd", "kd"),
             Term("hint_maps", "hint", student="maps", teacher="maps"),          # channels differ -> 1x1 conv
             Term("hint_spatial", "hint", student="big_maps", teacher="maps"),   # spatial too -> conv + resize
             Term("hint_emb", "hint", student="emb", teacher="emb"),
             Term("at", "at", student="maps", teacher="maps"),
             Term("sp", "sp", student="maps", teacher="maps"),
             Term("rkd", "rkd_distance", student="emb", teacher="emb"),
             Term("pkt", "pkt", student="emb", teacher="emb"),
             Term("cc", "cc", student="emb", teacher="emb"),
             Term("crd", "crd", student="emb", teacher="emb", params={"queue_size": 8, "embed_dim": 4})]
    d = make_distiller(terms)
    d.build(tiny_data().batch(torch.arange(8)))
    assert set(d.side.adapters) == {"hint_maps", "hint_spatial", "hint_emb"}
    assert isinstance(d.side.adapters["hint_maps"], nn.Conv2d)
    assert isinstance(d.side.adapters["hint_spatial"], nn.Sequential)
    assert isinstance(d.side.adapters["hint_emb"], nn.Conv2d)  # (B,3,1,1) -> (B,6,1,1): a 1x1 conv
    assert set(d.side.loss_modules) == {"crd"}
    out = d(tiny_data().batch(torch.arange(8)))
    assert set(out.terms) == {t.name for t in terms} and all(torch.isfinite(v) for v in out.terms.values())


def test_equal_shapes_get_no_adapter():
    student = tiny_pair()[0]
    teacher = tiny_pair()[0]  # the same architecture: equal tap shapes
    d = Distiller(student, teacher, [Term("hint", "hint", student="maps", teacher="maps")],
                  student_taps={"maps": "features"}, teacher_taps={"maps": "features"})
    d.build(tiny_data().batch(torch.arange(4)))
    assert len(d.side.adapters) == 0


def test_adapters_disabled_is_a_one_line_error():
    student, teacher = tiny_pair()
    d = Distiller(student, teacher, [Term("hint", "hint", student="maps", teacher="maps")],
                  student_taps=STUDENT_TAPS, teacher_taps=TEACHER_TAPS, adapters=False)
    with pytest.raises(WiringError, match=r"term 'hint'.*\(8, 3, 4, 4\).*\(8, 6, 4, 4\)") as err:
        d.build(tiny_data().batch(torch.arange(8)))
    assert "\n" not in str(err.value)


def test_wiring_errors_surface_at_build_naming_the_term():
    # attention transfer needs maps on both sides: a map vs the teacher's logits fails at build, before training
    student, teacher = tiny_pair()
    d = Distiller(student, teacher, [Term("attn", "at", student="maps", teacher="head")],
                  student_taps={"maps": "features"}, teacher_taps={"head": "head"})
    with pytest.raises(WiringError, match=r"term 'attn' \(at\)") as err:
        d.build(tiny_data().batch(torch.arange(8)))
    assert "\n" not in str(err.value)
    d = make_distiller([Term("kd", "kd", params={"temprature": 2.0})])
    with pytest.raises(WiringError, match=r"term 'kd' \(kd\).*temprature"):
        d.build(tiny_data().batch(torch.arange(8)))


def test_hint_term_is_the_loss_of_the_adapted_student_feature():
    d = make_distiller([Term("hint", "hint", weight=3.0, student="maps", teacher="maps")])
    batch = tiny_data().batch(torch.arange(8))
    d.build(batch)
    out = d(batch)
    with torch.no_grad():
        feats = {}
        h = d.student.features.register_forward_hook(lambda m, i, o: feats.setdefault("s", o))
        d.student(batch["x"])
        h.remove()
        t = d.teacher(batch)["maps"]
        expected = 3.0 * ((d.side.adapters["hint"](feats["s"]) - t) ** 2).mean()
    assert torch.allclose(out.terms["hint"], expected, rtol=1e-5)
    assert torch.allclose(expected, 3.0 * hint(d.side.adapters["hint"](feats["s"]), t), rtol=1e-6)


def test_adapter_gets_gradients():
    d = make_distiller([Term("ce", "ce"), Term("hint", "hint", student="big_maps", teacher="maps")])
    batch = tiny_data().batch(torch.arange(8))
    d.build(batch)
    d(batch).loss.backward()
    conv = d.side.adapters["hint"][0]
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in d.teacher.model.parameters())


# -- training, checkpoints, resume, export ------------------------------------------------------------------------

def _fit(run_dir, steps=6, seed=0, after_build=None):
    d = make_distiller([Term("ce", "ce"), Term("hint", "hint", student="maps", teacher="maps")], seed=seed)
    if after_build is not None:  # observe the adapter the engine's dry run builds, before any step
        build = d.build
        d.build = lambda batch: (build(batch), after_build(d))[0]
    cfg = TrainConfig(steps=steps, batch_size=16, lr=1e-2, schedule="constant", log_every=2)
    result = Engine(cfg, run_dir, stage="student", seed=0, progress=False, log=lambda m: None).fit(d, tiny_data())
    return d, result


def test_adapter_trains_is_checkpointed_restored_and_not_exported(tmp_path):
    init = {}
    d, result = _fit(tmp_path, after_build=lambda d: init.update(
        {k: v.detach().clone() for k, v in d.side.adapters["hint"].state_dict().items()}))
    assert result["resumed_from"] is None
    adapter = d.side.adapters["hint"]
    trained = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
    # it is in the optimizer: six steps moved it from its initial weights
    assert init["weight"].shape == trained["weight"].shape == (6, 3, 1, 1)
    assert (init["weight"] - trained["weight"]).abs().max() > 1e-3

    # in the checkpoint's model.safetensors
    ckpt = list_checkpoints(tmp_path / "checkpoints" / "student")[-1]
    saved = load_file(str(ckpt / "model.safetensors"))
    assert torch.equal(saved["adapters.hint.weight"], trained["weight"])

    # a new process (new distiller) resuming the same run dir gets the trained adapter back
    d2, result2 = _fit(tmp_path)
    assert result2["resumed_from"] == 6
    assert torch.equal(d2.side.adapters["hint"].weight, trained["weight"])

    # the exported student is the plain student class: no adapter (or loss-module) keys
    exported = d.export_student()
    keys = set(exported.state_dict())
    assert not any(k.startswith(("adapters", "loss_modules")) or "hint" in k for k in keys)
    plain = build_model("cnn2d", {"channels": [2, 3]}, input_shape=(1, 8, 8), num_classes=5)
    assert keys == set(plain.state_dict())
    plain.load_state_dict(exported.state_dict())  # strict
    assert all(not list(m._forward_hooks) for m in exported.modules())  # taps removed after the forward


def test_hidden_state_losses_get_a_linear_projection_on_the_width():
    # TinyBERT's W_h: (B, T, D_s) -> (B, T, D_t), the term sees the projected student states
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    teacher = nn.Sequential(nn.Linear(4, 16))
    d = Distiller(student, teacher, [Term("hid", "hidden_mse", student="h", teacher="h")],
                  student_taps={"h": "0"}, teacher_taps={"h": "0"})
    batch = {"x": torch.randn(2, 5, 4)}
    d.build(batch)
    adapter = d.side.adapters["hid"]
    assert isinstance(adapter, nn.Linear) and (adapter.in_features, adapter.out_features) == (8, 16)
    with torch.no_grad():
        expected = ((adapter(student[0](batch["x"])) - teacher(batch["x"])) ** 2).mean()
    assert torch.allclose(d(batch).terms["hid"], expected, rtol=1e-5)
