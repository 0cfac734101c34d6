"""Image data sets for the training experiments, all read from local disk (nothing is
downloaded).

- ``"digits"``: the 1,797 handwritten digits (8x8, one channel, 10 classes; UCI ML
  hand-written digits) that ship inside scikit-learn. Real images at a scale two CPU cores
  can train 1000-layer networks on. Split 80/20 into train and test, stratified by class,
  with a fixed seed.
- ``"cifar10"``: CIFAR-10 from a local copy of the python version (the folder
  ``cifar-10-batches-py`` holding ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``,
  as unpacked from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz).

Inputs are standardised per channel with the training set's mean and standard deviation.
"""
import os
import pickle
from dataclasses import dataclass

import numpy as np

from . import _checks

DATASETS = ("digits", "cifar10")


@dataclass(frozen=True)
class Data:
    """A data set in memory: float32 images (N, C, H, W) and int64 labels (N,)."""
    name: str
    x_train: object
    y_train: object
    x_test: object
    y_test: object
    classes: int
    description: str

    @property
    def shape(self):
        return tuple(self.x_train.shape[1:])


def _standardise(x_train, x_test):
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True)
    return (x_train - mean) / std, (x_test - mean) / std


def _tensors(name, x_train, y_train, x_test, y_test, description):
    import torch
    x_train, x_test = _standardise(x_train.astype(np.float64), x_test.astype(np.float64))
    return Data(name, torch.as_tensor(x_train, dtype=torch.float32),
                torch.as_tensor(y_train, dtype=torch.int64),
                torch.as_tensor(x_test, dtype=torch.float32),
                torch.as_tensor(y_test, dtype=torch.int64),
                int(max(y_train.max(), y_test.max())) + 1, description)


def load_digits(test_fraction=0.2, seed=0):
    """scikit-learn's digits: 1,438 train and 359 test images of 1x8x8 (default split)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise ImportError("the 'digits' data set ships with scikit-learn: pip install "
                          "'propagation[train]' (or scikit-learn)") from err
    test_fraction = _checks.finite_float("test_fraction", test_fraction, low=0.0, high=1.0)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    digits = sk_load_digits()
    x = digits.images[:, None, :, :]  # (1797, 1, 8, 8), values 0..16
    y = digits.target.astype(np.int64)
    # Stratified split: per class, a seeded permutation; the first test_fraction to test.
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[:int(round(test_fraction * len(idx)))]] = True
    return _tensors("digits", x[~test], y[~test], x[test], y[test],
                    f"scikit-learn digits (8x8 grey, {int((~test).sum())} train / "
                    f"{int(test.sum())} test images)")


def _unpickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def load_cifar10(root):
    """CIFAR-10 from ``root``: the folder ``cifar-10-batches-py`` or the folder holding it.

    Reads the python-version batches (50,000 train and 10,000 test images of 3x32x32).
    """
    if root is None:
        raise ValueError("data_root must name a local CIFAR-10 folder for dataset='cifar10' "
                         "(the python version, cifar-10-batches-py); nothing is downloaded")
    root = os.path.expanduser(str(root))
    if os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        root = os.path.join(root, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise FileNotFoundError(
            f"data_root={root!r} is not a CIFAR-10 python-version folder: missing "
            f"{', '.join(missing)}. Unpack cifar-10-python.tar.gz from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html and pass the cifar-10-batches-py "
            f"folder")

    def read(name):
        d = _unpickle(os.path.join(root, name))
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return x, np.asarray(d[b"labels"], dtype=np.int64)
    parts = [read(n) for n in names[:5]]
    x_test, y_test = read("test_batch")
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return _tensors("cifar10", x_train, y_train, x_test, y_test,
                    f"CIFAR-10 ({len(y_train)} train / {len(y_test)} test images, 3x32x32)")


def load(name, root=None):
    """The data set ``name`` (one of :data:`DATASETS`); ``root`` is CIFAR-10's folder."""
    _checks.choice("dataset", name, DATASETS)
    return load_digits() if name == "digits" else load_cifar10(root)
