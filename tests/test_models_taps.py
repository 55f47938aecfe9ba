import pytest
import torch
from torch import nn

from kdistill.errors import ConfigError, TapError
from kdistill.models import build_model, count_params
from kdistill.taps import Taps


@pytest.mark.parametrize("name,shape,kwargs", [
    ("mlp", (40,), {"hidden": [8, 8]}),
    ("cnn1d", (40,), {"channels": 4, "depth": 3}),
    ("cnn2d", (1, 28, 28), {"channels": [4, 8]}),
    ("resnet", (1, 28, 28), {"depth": 8, "width": 4}),
])
def test_builtin_models_give_logits(name, shape, kwargs):
    model = build_model(name, kwargs, input_shape=shape, num_classes=7)
    assert model(torch.randn(3, *shape)).shape == (3, 7)


def test_resnet_width_depth_knobs_change_size():
    small = build_model("resnet", {"depth": 8, "width": 4}, input_shape=(1, 8, 8), num_classes=10)
    deeper = build_model("resnet", {"depth": 14, "width": 4}, input_shape=(1, 8, 8), num_classes=10)
    wider = build_model("resnet", {"depth": 8, "width": 8}, input_shape=(1, 8, 8), num_classes=10)
    assert count_params(small) < count_params(deeper) and count_params(small) < count_params(wider)
    with pytest.raises(ConfigError, match="6n\\+2"):
        build_model("resnet", {"depth": 9}, input_shape=(1, 8, 8), num_classes=10)


def make_linear(in_features: int = 3, out_features: int = 2):
    return nn.Linear(in_features, out_features)


def test_user_model_by_import_path_and_errors():
    m = build_model("tests.test_models_taps:make_linear", {"in_features": 5})
    assert isinstance(m, nn.Linear) and m.in_features == 5
    with pytest.raises(ConfigError, match="cannot import"):
        build_model("no_such_pkg.mod:f")
    with pytest.raises(ConfigError, match="no attribute"):
        build_model("tests.test_models_taps:nope")
    with pytest.raises(ConfigError, match="keyword"):
        build_model("tests.test_models_taps:make_linear", {"bogus": 1})


class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.body(x)
        return self.head(h), {"hidden": h}


def test_taps_capture_by_path_index_and_key():
    net = TupleNet()
    taps = Taps(net, {"body": "body", "h": ":1.hidden", "logits": ":0"})
    x = torch.randn(5, 4)
    with taps:
        out = net(x)
        values = taps.pop()
    assert torch.equal(values["body"], net.body(x))
    assert torch.equal(values["h"], out[1]["hidden"]) and torch.equal(values["logits"], out[0])
    # hooks are removed on exit
    assert not net.body._forward_hooks


def test_unknown_tap_path_lists_closest_names():
    net = TupleNet()
    with pytest.raises(TapError) as err:
        Taps(net, {"t": "bdy"})
    assert "closest: body" in str(err.value) and "\n" not in str(err.value)


def test_bad_selector_is_clear():
    net = TupleNet()
    taps = Taps(net, {"t": ":5"})
    with taps, pytest.raises(TapError, match="length 2"):
        net(torch.randn(2, 4))


def test_taps_on_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    taps = Taps(model, {"layer1": "encoder.layer.1:0", "emb": "embeddings", "last": ":last_hidden_state"})
    with taps, torch.no_grad():
        out = model(input_ids=ids)
        values = taps.pop()
    assert values["layer1"].shape == (2, 7, 16)
    assert torch.allclose(values["last"], out.last_hidden_state)
    assert torch.allclose(values["layer1"], out.last_hidden_state)
    with pytest.raises(TapError, match="encoder.layer.1"):
        Taps(model, {"x": "encoder.layers.1"})
