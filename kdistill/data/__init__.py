"""Datasets: built-in real data (offline), the user's own data from the config, and in-memory array datasets."""

from kdistill.data.arrays import ArrayDataset, DataBundle, check_labels, concat
from kdistill.data.builtin import digits, fashion_mnist, load_data, mnist1d, read_idx
from kdistill.data.user import load_user_data, load_without_train

__all__ = ["ArrayDataset", "DataBundle", "check_labels", "concat", "digits", "fashion_mnist", "load_data",
           "load_user_data", "load_without_train", "mnist1d", "read_idx"]
