import gzip
import random
import struct

import numpy as np
import pytest
import torch

from kdistill.config import DataConfig
from kdistill.data import ArrayDataset, concat, digits, fashion_mnist, load_data, mnist1d, read_idx
from kdistill.errors import DataError


def test_mnist1d_split_shapes_and_determinism():
    a = mnist1d(seed=42)
    b = mnist1d(seed=42)
    assert a.train.tensors["x"].shape == (4000, 40) and a.test.tensors["x"].shape == (1000, 40)
    assert a.num_classes == 10
    assert torch.equal(a.train.tensors["x"], b.train.tensors["x"])
    assert set(a.train.tensors["y"].unique().tolist()) == set(range(10))


def test_mnist1d_does_not_touch_global_rng():
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    mnist1d(seed=42)
    assert np.random.rand() == expected_np and random.random() == expected_py


def test_transfer_set_is_unlabeled_fresh_and_joined():
    b = mnist1d(seed=42, transfer_size=300, transfer_seed=7)
    assert b.transfer.tensors["x"].shape == (300, 40) and "y" not in b.transfer.tensors
    # fresh inputs, not copies of training rows
    d = torch.cdist(b.transfer.tensors["x"][:50], b.train.tensors["x"]).min()
    assert d > 1e-3
    joined = b.distill_set()
    assert len(joined) == 4300
    assert (joined.tensors["y"][4000:] == -100).all() and (joined.tensors["y"][:4000] >= 0).all()
    assert torch.equal(joined.tensors["index"], torch.arange(4300))


def test_transfer_seed_equal_to_data_seed_is_refused():
    with pytest.raises(DataError, match="transfer set seed"):
        mnist1d(seed=5, transfer_size=10, transfer_seed=5)


def test_digits_split():
    b = digits(seed=0)
    assert len(b.train) + len(b.test) == 1797
    assert b.train.tensors["x"].shape[1:] == (1, 8, 8)
    assert float(b.train.tensors["x"].max()) <= 1.0


def _write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())


def test_read_idx_roundtrip_and_fashion_loader(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=12, dtype=np.uint8)
    assert np.array_equal(read_idx_roundtrip(tmp_path, images), images)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images, 0x08)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x08)
    b = fashion_mnist(str(tmp_path))
    assert b.train.tensors["x"].shape == (12, 1, 28, 28)
    assert torch.allclose(b.train.tensors["x"][3, 0], torch.from_numpy(images[3]).float() / 255)
    assert torch.equal(b.test.tensors["y"], torch.from_numpy(labels.astype(np.int64)))


def read_idx_roundtrip(tmp_path, array):
    _write_idx(tmp_path / "x.gz", array, 0x08)
    return read_idx(tmp_path / "x.gz")


def test_truncated_idx_is_a_clear_error(tmp_path):
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 4, 28, 28)
    with gzip.open(tmp_path / "bad.gz", "wb") as fh:
        fh.write(header + images.tobytes()[:100])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "bad.gz")


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(str(tmp_path))


@pytest.mark.skipif(not __import__("os").path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    b = load_data(DataConfig(name="fashion_mnist"))
    assert len(b.train) == 60000 and len(b.test) == 10000
    assert b.train.tensors["x"].shape[1:] == (1, 28, 28)


def test_array_dataset_errors():
    with pytest.raises(DataError, match="empty"):
        ArrayDataset({"x": torch.zeros(0, 3)})
    with pytest.raises(DataError, match="rows"):
        ArrayDataset({"x": torch.zeros(3, 2), "y": torch.zeros(2)})
    with pytest.raises(DataError, match="only one has"):
        concat(ArrayDataset({"x": torch.zeros(2, 2), "z": torch.zeros(2)}), ArrayDataset({"x": torch.zeros(2, 2)}),
               "j")
