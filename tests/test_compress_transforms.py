"""Structured pruning (torch-pruning), low-rank factorization and architecture specs (reload without the pruner)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill.compress.arch import architecture, load_spec, output_layers, rebuild, save_spec
from kdistill.compress.low_rank import LowRankConv, LowRankLinear, factorize, low_rank, rank_for_energy
from kdistill.errors import KDError
from kdistill.files import load_weights, save_weights
from kdistill.models import build_model

pytest.importorskip("torch_pruning")

from kdistill.compress.prune import prune  # noqa: E402

IMAGE = (3, 16, 16)


def cnn2d(seed=0):
    torch.manual_seed(seed)
    return build_model("cnn2d", {"channels": [16, 32, 64]}, input_shape=IMAGE, num_classes=10)


def resnet(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet", {"depth": 8, "width": 8}, input_shape=IMAGE, num_classes=10)


def image(n=2, seed=1):
    return torch.randn(n, *IMAGE, generator=torch.Generator().manual_seed(seed))


def widths(model):
    return {p: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for p, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))}


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


# -- pruning -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("of,scope,importance", [
    ("macs", "global", "l2"), ("params", "global", "l1"), ("macs", "uniform", "l2"), ("params", "uniform", "random"),
    ("macs", "global", "taylor"), ("macs", "uniform", "random"), ("params", "global", "taylor"),
])
def test_prune_reaches_target(of, scope, importance):
    model, x = cnn2d(), image()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, report = prune(model, x, target=0.5, of=of, scope=scope, importance=importance,
                           taylor_batch=(image(8, 2), torch.randint(0, 10, (8,))))
    assert abs(report["reached"] - 0.5) <= 0.02, report
    measured = 1 - (report["macs_after"] / report["macs_before"] if of == "macs"
                    else report["params_after"] / report["params_before"])
    assert abs(measured - report["reached"]) < 1e-3
    assert report["of"] == of and report["scope"] == scope and report["importance"] == importance
    assert 0 < report["channel_ratio"] < 1
    pruned.eval()
    assert pruned(x).shape == (2, 10)
    w0, w1 = widths(model), widths(pruned)
    assert w1["head"] == 10  # the classifier keeps its outputs
    assert sum(w1.values()) < sum(w0.values())
    assert type(pruned.features[0][0]) is nn.Conv2d and no_hooks(pruned)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    assert all(p.grad is None for p in pruned.parameters())
    print(f"cnn2d {of} {scope} {importance}: reached {report['reached']} in {report['tries']} tries")


def test_prune_resnet_residuals_and_others():
    model, x = resnet(), image()
    pruned, report = prune(model, x, target=0.4, of="macs")
    assert abs(report["reached"] - 0.4) <= 0.02
    pruned.eval()
    assert pruned(x).shape == (2, 10) and pruned.head.out_features == 10
    block = pruned.layer2[0]  # residual add: conv2 and shortcut outputs stay tied
    assert block.conv2.out_channels == block.shortcut[0].out_channels == block.bn2.num_features
    print(f"resnet macs global l2: reached {report['reached']}")

    torch.manual_seed(0)
    mlp = build_model("mlp", {"hidden": [64, 64]}, input_shape=(20,), num_classes=5)
    pm, rm = prune(mlp, torch.randn(3, 20), target=0.5, of="params", scope="uniform", iterative_steps=2)
    assert abs(rm["reached"] - 0.5) <= 0.02 and pm(torch.randn(3, 20)).shape == (3, 5) and pm[-1].out_features == 5
    torch.manual_seed(0)
    c1 = build_model("cnn1d", {"channels": 32, "depth": 3}, input_shape=(32,), num_classes=4)
    pc, rc = prune(c1, torch.randn(2, 32), target=0.3)
    assert abs(rc["reached"] - 0.3) <= 0.02 and pc.eval()(torch.randn(2, 32)).shape == (2, 4)
    # round_to: channel counts stay multiples of 8 (coarser steps, so a looser tolerance)
    pr, rr = prune(cnn2d(), image(), target=0.5, round_to=8, tolerance=0.1)
    assert all(w % 8 == 0 for p, w in widths(pr).items() if p != "head") and abs(rr["reached"] - 0.5) <= 0.1
    print(f"mlp params uniform: reached {rm['reached']}; cnn1d macs: reached {rc['reached']}; "
          f"cnn2d round_to 8: reached {rr['reached']}")


@pytest.mark.parametrize("target", [0, 1, -0.1, 1.5, True])
def test_prune_bad_target(target):
    with pytest.raises(KDError) as err:
        prune(cnn2d(), image(), target=target)
    assert "compress.prune" in str(err.value) and "\n" not in str(err.value)


def test_prune_bad_options_and_unreachable():
    with pytest.raises(KDError, match="unknown importance"):
        prune(cnn2d(), image(), target=0.5, importance="l3")
    with pytest.raises(KDError, match="no module 'nope'"):
        prune(cnn2d(), image(), target=0.5, ignore=["nope"])
    with pytest.raises(KDError, match="reached"):  # everything but the head ignored: nothing can go
        prune(cnn2d(), image(), target=0.5, ignore=["features"])


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


def test_prune_bert_mlp_only():
    model = tiny_bert()
    example = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    for scope in ("global", "uniform"):
        pruned, report = prune(model, example, target=0.25, of="macs", scope=scope)
        assert abs(report["reached"] - 0.25) <= 0.02, report
        out = pruned(**example).last_hidden_state
        assert out.shape == (2, 8, 32)
        layer = pruned.encoder.layer[0]
        assert layer.intermediate.dense.out_features < 64
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features
        assert layer.attention.self.query.out_features == 32 and layer.output.dense.out_features == 32
        print(f"bert {scope}: reached {report['reached']}, ffn widths "
              f"{[m.intermediate.dense.out_features for m in pruned.encoder.layer]}")
    assert pruned.config.intermediate_size == pruned.encoder.layer[0].intermediate.dense.out_features  # uniform
    fresh = rebuild(tiny_bert(), architecture(pruned))  # reload from the builder + spec
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    assert fresh.config.intermediate_size == pruned.config.intermediate_size
    assert torch.equal(fresh.eval()(**example).last_hidden_state, pruned.eval()(**example).last_hidden_state)
    with pytest.raises(KDError, match="reached"):
        prune(model, example, target=0.9, of="macs")  # attention and hidden size are kept


def test_prune_unsupported_model_is_one_line(monkeypatch):
    import torch_pruning as tp

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported op\nsecond line")

    monkeypatch.setattr(tp.pruner, "BasePruner", refuse)
    with pytest.raises(KDError) as err:
        prune(cnn2d(), image(), target=0.3)
    assert "torch-pruning cannot handle CNN2d: RuntimeError: unsupported op" in str(err.value)
    assert "\n" not in str(err.value)


# -- low rank ----------------------------------------------------------------------------------------------------
def test_split_is_exact_at_full_rank_float64():
    torch.manual_seed(0)
    layer = nn.Linear(24, 40).double()
    new, kept = factorize(layer, 24)
    x = torch.randn(5, 24, dtype=torch.float64)
    assert kept == pytest.approx(1.0) and isinstance(new, LowRankLinear) and new.down.weight.dtype == torch.float64
    assert torch.allclose(new(x), layer(x), atol=1e-10)
    conv = nn.Conv2d(12, 20, 1, stride=2, padding=1).double()
    cnew, _ = factorize(conv, 12)
    xi = torch.randn(2, 12, 7, 7, dtype=torch.float64)
    assert isinstance(cnew, LowRankConv) and torch.allclose(cnew(xi), conv(xi), atol=1e-10)
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert rank_for_energy(s, 1.0) == 3 and rank_for_energy(s, 9 / 14) == 1 and rank_for_energy(s, 0.7) == 2


def test_low_rank_energy_one_reproduces_low_rank_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).double()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.copy_(torch.randn(64, 4, dtype=torch.float64) @ torch.randn(4, 64, dtype=torch.float64))
    x = torch.randn(6, 64, dtype=torch.float64)
    small, report = low_rank(model, x, energy=1.0)
    assert set(report["layers"]) == {"0", "2"} and all(v["rank"] == 4 for v in report["layers"].values())
    assert {"path": "4", "why": "output layer"} in report["kept"]
    assert torch.allclose(small(x), model(x), atol=1e-5)
    assert report["params_after"] < report["params_before"]
    assert isinstance(model[0], nn.Linear)  # the input is untouched


def test_low_rank_rank_skip_and_errors():
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [64, 64, 64]}, input_shape=(48,), num_classes=5)
    x = torch.randn(3, 48)
    small, report = low_rank(model, x, rank=8, skip=["3"])
    assert set(report["layers"]) == {"1", "5"} and report["layers"]["1"] == {**report["layers"]["1"], "rank": 8}
    kept = {k["path"]: k["why"] for k in report["kept"]}
    assert kept["3"] == "skipped" and kept["7"] == "output layer"
    assert isinstance(small[1], LowRankLinear) and type(small[3]) is nn.Linear and type(small[7]) is nn.Linear
    assert small(x).shape == (3, 5)
    assert report["params_after"] == sum(p.numel() for p in small.parameters()) < report["params_before"]
    _, big = low_rank(model, x, rank=40)  # 40 * (64 + 64) > 64 * 64: would grow, kept
    assert not big["layers"] and any("would not shrink" in k["why"] for k in big["kept"])
    for kwargs in ({"rank": 4, "energy": 0.9}, {}, {"energy": 0.0}, {"energy": 1.5}, {"rank": 0}):
        with pytest.raises(KDError):
            low_rank(model, x, **kwargs)
    assert output_layers(model, x) == ["7"]


# -- architecture specs: reload without torch-pruning ------------------------------------------------------------
def reload_check(builder, compressed, x, tmp_path):
    spec = architecture(compressed)
    save_spec(tmp_path / "arch.json", spec)
    save_weights(tmp_path / "w.safetensors", compressed.state_dict())
    fresh = builder(seed=5)
    assert architecture(fresh) != spec
    rebuild(fresh, load_spec(tmp_path / "arch.json"))
    fresh.load_state_dict(load_weights(tmp_path / "w.safetensors"), strict=True)
    assert architecture(fresh) == spec
    compressed.eval(), fresh.eval()
    assert torch.equal(fresh(x), compressed(x))


def test_arch_reload_pruned_and_low_rank(tmp_path):
    x = image()
    pruned, _ = prune(cnn2d(), x, target=0.5)
    reload_check(cnn2d, pruned, x, tmp_path)
    pruned_r, _ = prune(resnet(), x, target=0.5, scope="uniform", tolerance=0.1)
    reload_check(resnet, pruned_r, x, tmp_path)

    def mlp(seed=0):
        torch.manual_seed(seed)
        return build_model("mlp", {"hidden": [64, 64]}, input_shape=(32,), num_classes=4)

    xm = torch.randn(3, 32)
    small, _ = prune(mlp(), xm, target=0.3, of="params")
    small, rep = low_rank(small, xm, rank=4, min_features=8)
    assert rep["layers"]
    reload_check(mlp, small, xm, tmp_path)
    spec = json.loads((tmp_path / "arch.json").read_text())
    assert any(v["type"] == "LowRankLinear" for v in spec["modules"].values())


def test_arch_reload_without_torch_pruning(tmp_path):
    x = image()
    pruned, _ = prune(resnet(), x, target=0.5)
    pruned.eval()
    save_spec(tmp_path / "arch.json", architecture(pruned))
    save_weights(tmp_path / "w.safetensors", pruned.state_dict())
    save_weights(tmp_path / "io.safetensors", {"x": x, "y": pruned(x)})
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch_pruning"] = None  # import blocked
        import torch
        from kdistill.compress.arch import load_spec, rebuild
        from kdistill.files import load_weights
        from kdistill.models import build_model
        model = build_model("resnet", {{"depth": 8, "width": 8}}, input_shape=(3, 16, 16), num_classes=10)
        rebuild(model, load_spec({str(tmp_path / 'arch.json')!r}))
        model.load_state_dict(load_weights({str(tmp_path / 'w.safetensors')!r}), strict=True)
        io = load_weights({str(tmp_path / 'io.safetensors')!r})
        assert torch.equal(model.eval()(io["x"]), io["y"])
        assert "torch_pruning" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_arch_bad_specs(tmp_path):
    model = cnn2d()
    spec = architecture(model)
    spec["modules"]["head"] = {"type": "Mystery", "args": {}}
    with pytest.raises(KDError, match="unknown layer type 'Mystery'"):
        rebuild(cnn2d(), spec)
    with pytest.raises(KDError, match="no module 'nope'"):
        rebuild(cnn2d(), {"format": 1, "modules": {"nope": {"type": "Linear", "args": {}}}})
    with pytest.raises(KDError, match="not found"):
        load_spec(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(KDError, match="cannot read"):
        load_spec(tmp_path / "bad.json")


def test_kxk_conv_channel_decomposition_is_exact_at_full_rank_and_reloads(tmp_path):
    """A 3x3 conv (stride 2, padding 1, dilation 1) as an r-channel 3x3 conv then a 1x1 conv: at the full rank
    of its (out, in * 9) matrix the float64 model gives the same outputs; a truncated one shrinks and reloads."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 20, 3, stride=2, padding=1).double()
    full = min(20, 6 * 9)
    new, kept = factorize(conv, full)
    x = torch.randn(3, 6, 9, 9, dtype=torch.float64)
    assert isinstance(new, LowRankConv) and new.down.kernel_size == (3, 3) and new.up.kernel_size == (1, 1)
    assert kept == pytest.approx(1.0) and torch.allclose(new(x), conv(x), atol=1e-10)
    model = build_model("cnn2d", {"channels": [16, 32, 64]}, input_shape=(1, 28, 28), num_classes=10)
    example = torch.randn(2, 1, 28, 28)
    small, report = low_rank(model, example, rank=8)
    assert "features.2.0" in report["layers"] and report["layers"]["features.2.0"]["in"] == 16 * 9
    assert report["params_after"] < report["params_before"]
    assert any(k["path"] == "head" for k in report["kept"])
    save_spec(tmp_path / "a.json", architecture(small))
    fresh = build_model("cnn2d", {"channels": [16, 32, 64]}, input_shape=(1, 28, 28), num_classes=10)
    rebuild(fresh, load_spec(tmp_path / "a.json"))
    fresh.load_state_dict(small.state_dict())
    small.eval(), fresh.eval()
    assert torch.equal(fresh(example), small(example))
