"""ONNX export and the deployment runtime: fp32 parity of the built-in models and of a tiny BERT (dict inputs,
dynamic batch and sequence), int8 dynamic / static agreement and size, `OrtModel` in the evaluation helpers,
interleaved torch + onnxruntime timing (keys only, never values), one-line errors."""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from kdistill.compress.export import (ExportError, OrtModel, export_onnx, file_bytes, parity,  # noqa: E402
                                      quantize_onnx)
from kdistill.data import ArrayDataset  # noqa: E402
from kdistill.errors import KDError  # noqa: E402
from kdistill.evaluate import predict_logits  # noqa: E402
from kdistill.evaluate.deploy import deployed_row, deployed_table, deployed_timing  # noqa: E402
from kdistill.models import build_model  # noqa: E402

BUILTIN = {
    "mlp": ({"hidden": [32]}, (40,)),
    "cnn1d": ({"channels": 8, "depth": 3}, (40,)),
    "cnn2d": ({"channels": [8, 16]}, (3, 12, 12)),
    "resnet": ({"depth": 8, "width": 8}, (3, 12, 12)),
}


def held_out(shape, sizes=(1, 3, 17), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=g) for n in sizes]


def randomize_batchnorm(model):
    """Non-trivial running statistics, so that eval-mode BatchNorm is really exercised."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_models_export_with_fp32_parity_at_any_batch(name, tmp_path):
    kwargs, shape = BUILTIN[name]
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(name, kwargs, input_shape=shape, num_classes=10)).eval()
    path = export_onnx(model, torch.randn(4, *shape), tmp_path / f"{name}.onnx")
    assert path.is_file() and not list(tmp_path.glob(".*tmp*"))  # written atomically, no temp file left
    ort = OrtModel(path)
    assert ort.input_names == ["input"]
    result = parity(model, ort, held_out(shape))
    assert result["samples"] == 21
    assert result["max_abs_diff"] <= 1e-4, result
    assert result["top1_agreement"] == 1.0


def blobs(n, d=64, classes=10, seed=0):
    """n samples of 10 Gaussian blobs (fixed centers; `seed` draws the samples)."""
    centers = torch.randn(classes, d, generator=torch.Generator().manual_seed(1234)) * 0.6
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g), y


@pytest.fixture(scope="module")
def trained_mlp(tmp_path_factory):
    """A weights-heavy MLP (64 -> 256 -> 256 -> 10) trained for a few steps on Gaussian blobs, exported fp32."""
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [256, 256]}, input_shape=(64,), num_classes=10)
    x, y = blobs(1024)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        idx = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    folder = tmp_path_factory.mktemp("int8")
    return model, export_onnx(model, x[:8], folder / "fp32.onnx"), folder


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_agrees_with_fp32_and_is_smaller(mode, trained_mlp):
    model, fp32, folder = trained_mlp
    calibration = [blobs(64, seed=10 + i)[0] for i in range(4)] if mode == "static" else None
    int8 = quantize_onnx(fp32, folder / f"{mode}.onnx", mode, calibration=calibration)
    test_x, test_y = blobs(512, seed=99)
    fp32_logits = OrtModel(fp32)(test_x)
    int8_logits = OrtModel(int8)(test_x)
    agreement = float((int8_logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean())
    ratio = file_bytes(int8) / file_bytes(fp32)
    accuracy = float((fp32_logits.argmax(-1) == test_y).float().mean())
    print(f"{mode}: agreement {agreement:.4f}, size ratio {ratio:.3f}, fp32 accuracy {accuracy:.3f}, "
          f"max |diff| {float((int8_logits - fp32_logits).abs().max()):.4f}")
    assert accuracy > 0.5  # the model learned something: its logits are not ties
    assert agreement >= 0.9
    assert ratio < 0.5  # int8 weights: about a quarter of fp32 plus the graph
    assert parity(model, OrtModel(int8), [test_x])["top1_agreement"] == agreement


def test_quantize_errors_are_one_line(trained_mlp, tmp_path):
    _, fp32, _ = trained_mlp
    with pytest.raises(KDError) as err:
        quantize_onnx(fp32, tmp_path / "q.onnx", "int4")
    assert "int4" in str(err.value) and "dynamic" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(KDError) as err:
        quantize_onnx(fp32, tmp_path / "q.onnx", "static")
    assert "calibration" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "q.onnx").exists()


def test_ort_model_in_predict_logits_at_threads_and_copies(trained_mlp):
    model, fp32, _ = trained_mlp
    x, y = blobs(300, seed=5)
    data = ArrayDataset({"x": x, "y": y}, "blobs")
    ort = OrtModel(fp32)
    got = predict_logits(ort, data, batch_size=128)
    assert got.dtype == torch.float32 and got.shape == (300, 10)
    assert torch.allclose(got, predict_logits(model, data), atol=1e-4)
    assert ort.at_threads(1) is ort
    two = ort.at_threads(2)
    assert isinstance(two, OrtModel) and two.threads == 2 and two.session.get_session_options() \
        .intra_op_num_threads == 2
    assert ort.at_threads(2).session is two.session  # one session per thread count
    assert torch.allclose(two(x), got, atol=1e-5)
    assert ort.eval() is ort and ort.train() is ort and not any(p.requires_grad for p in ort.parameters())
    assert torch.allclose(copy.deepcopy(ort)(x[:4]), got[:4])
    assert ort.file_bytes == fp32.stat().st_size
    assert ort({"x": x[:2], "y": y[:2]}).shape == (2, 10)  # an ArrayDataset batch: 'x' feeds the one input


def test_deployed_timing_rows_and_table(trained_mlp):
    model, fp32, _ = trained_mlp
    x = blobs(8)[0]
    timing = deployed_timing({"torch": model, "onnx": OrtModel(fp32)}, x[:1], x, repeats=3)
    assert timing["threads"][0] == 1 and timing["primary_threads"] == 1 and timing["batch_sizes"] == [1, 32]
    for count in timing["threads"]:
        for name in ("torch", "onnx"):
            entry = timing["by_threads"][str(count)][name]
            assert {"latency_ms_b1", "latency_ms_b32", "throughput", "latency_spread_b1", "latency_spread_b32",
                    "throughput_spread"} <= set(entry)
    rows = [deployed_row("torch", runtime="torch", file=None, metric={"accuracy": 0.9}, agreement=None,
                         timing=timing),
            deployed_row("onnx", runtime="onnxruntime", file=fp32, metric={"accuracy": 0.9}, agreement=1.0,
                         timing=timing)]
    assert rows[1]["bytes"] == fp32.stat().st_size and rows[1]["accuracy"] == 0.9 and rows[1]["threads"] == 1
    assert set(rows[1]["by_threads"]) == {str(c) for c in timing["threads"]}
    table = deployed_table(rows)
    assert table.splitlines()[0].split() == ["name", "runtime", "metric", "agreement", "MB", "ms@1", "ms@32",
                                             "samples/s", "threads"]
    assert len(table.splitlines()) == 4 and "accuracy 0.9" in table
    with pytest.raises(KDError):
        deployed_row("x", runtime="tflite", file=None, metric={}, agreement=None, timing=timing)


def test_deployed_timing_takes_dict_examples():
    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, a, b):
            return self.lin(a + b)

    examples = {"a": torch.randn(5, 4), "b": torch.randn(5, 4)}
    timing = deployed_timing({"kw": Keywords()}, examples, examples, threads=1, repeats=1)
    assert timing["threads"] == [1] and timing["by_threads"]["1"]["kw"]["throughput"] > 0


class Spectrum(nn.Module):
    """A layer whose operator the ONNX exporter cannot translate."""

    def forward(self, x):
        return torch.linalg.eigvals(x.reshape(-1, 2, 2)).real.reshape(x.shape[0], -1)


class WithSpectrum(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.blocks = nn.Sequential(nn.ReLU(), Spectrum())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.blocks(self.proj(x)))


def test_unsupported_operator_is_one_line_naming_operator_and_module(tmp_path):
    with pytest.raises(ExportError) as err:
        export_onnx(WithSpectrum(), torch.randn(4, 8), tmp_path / "bad.onnx")
    message = str(err.value)
    print(message)
    assert "\n" not in message and "aten." in message and "eig" in message
    assert "'blocks.1' (Spectrum)" in message and "replace" in message
    assert not list(tmp_path.iterdir())  # nothing left behind


class Gate(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # Python control flow on a tensor value: not traceable


def test_untraceable_control_flow_is_one_line_naming_module_and_source_line(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), Gate())
    with pytest.raises(ExportError) as err:
        export_onnx(model, torch.randn(3, 4), tmp_path / "gate.onnx")
    message = str(err.value)
    assert "\n" not in message and "module '1' (Gate)" in message and "x.sum() > 0" in message
    assert "test_export.py:" in message and "data-dependent" in message


def test_tiny_bert_exports_with_dict_inputs_dynamic_batch_and_sequence(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()

    def tokens(batch, length, seed):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length // 2:] = 0  # one padded row
        return {"input_ids": torch.randint(1, 100, (batch, length), generator=g), "attention_mask": mask}

    path = export_onnx(bert, tokens(2, 7, 0), tmp_path / "bert.onnx", where="teacher")
    ort = OrtModel(path)
    assert sorted(ort.input_names) == ["attention_mask", "input_ids"]
    batches = [tokens(1, 5, 1), tokens(3, 11, 2), tokens(4, 16, 3)]
    result = parity(bert, ort, batches)
    assert result["samples"] == 8 and result["max_abs_diff"] <= 1e-4, result
    extra = {**tokens(2, 6, 4), "labels": torch.zeros(2, dtype=torch.long)}  # keys not in the model: dropped
    assert ort(extra).shape == (2, 6, 32)
