"""Datasets: built-in real data (offline) and in-memory array datasets."""

from kdistill.data.arrays import ArrayDataset, DataBundle, check_labels, concat
from kdistill.data.builtin import digits, fashion_mnist, load_data, mnist1d, read_idx

__all__ = ["ArrayDataset", "DataBundle", "check_labels", "concat", "digits", "fashion_mnist", "load_data",
           "mnist1d", "read_idx"]
