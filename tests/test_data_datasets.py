"""Offline dataset loaders return the real data with the documented shapes and dtypes."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.data import datasets
from edge_runtime.data.datasets import (
    FASHION_CLASSES,
    load_fashion_mnist,
    load_mnist_digits,
    load_natural_images,
    load_sklearn_digits,
    natural_crops,
)
from edge_runtime.errors import DataUnavailableError, InputError


@pytest.mark.parametrize(("split", "n"), [("train", 60000), ("test", 10000)])
def test_fashion_mnist_shapes_and_balance(split: str, n: int) -> None:
    x, y = load_fashion_mnist(split)
    assert x.shape == (n, 28, 28) and x.dtype == np.uint8
    assert y.shape == (n,) and y.dtype == np.int64
    # The real dataset: exactly balanced over 10 classes, real pixel range.
    assert np.bincount(y).tolist() == [n // 10] * 10
    assert x.max() == 255 and x.min() == 0
    assert len(FASHION_CLASSES) == 10
    # Known first labels of the official files (ankle boot, T-shirt, T-shirt, dress).
    if split == "train":
        assert y[:4].tolist() == [9, 0, 0, 3]


def test_fashion_cached_and_read_only() -> None:
    a, _ = load_fashion_mnist("test")
    b, _ = load_fashion_mnist("test")
    assert a is b
    with pytest.raises(ValueError):
        a[0, 0, 0] = 1


def test_fashion_bad_split() -> None:
    with pytest.raises(InputError, match="split"):
        load_fashion_mnist("validation")


def test_fashion_missing_dir_names_the_package(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test")


def test_fashion_truncated_file(tmp_path, monkeypatch) -> None:
    import gzip
    import shutil

    src = datasets.FASHION_MNIST_DEFAULT_DIR
    shutil.copy(src / "t10k-labels-idx1-ubyte.gz", tmp_path)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(DataUnavailableError, match="truncated"):
        load_fashion_mnist("test")


def test_mnist_digits() -> None:
    x, y = load_mnist_digits()
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8
    assert y.dtype == np.int64 and sorted(np.unique(y).tolist()) == list(range(10))
    assert np.bincount(y).tolist() == [500] * 10
    # Digits are white strokes on black: mostly dark, some saturated pixels.
    assert x.mean() < 60 and x.max() == 255


def test_sklearn_digits() -> None:
    x, y = load_sklearn_digits()
    assert x.shape == (1797, 8, 8) and x.dtype == np.uint8
    assert y.dtype == np.int64 and y.max() == 9
    assert x.max() == 255  # 16 scaled to 255


def test_natural_images_and_crops() -> None:
    photos = load_natural_images()
    assert len(photos) == 2 and all(p.shape == (427, 640, 3) for p in photos)
    crops = natural_crops(16, size=28, seed=3)
    assert crops.shape == (16, 28, 28) and crops.dtype == np.uint8
    assert np.array_equal(crops, natural_crops(16, size=28, seed=3))
    assert not np.array_equal(crops, natural_crops(16, size=28, seed=4))
    # Crops are not all alike: per-crop means vary.
    assert crops.reshape(16, -1).mean(axis=1).std() > 5
    rgb = natural_crops(4, size=32, seed=0, gray=False)
    assert rgb.shape == (4, 32, 32, 3)
    with pytest.raises(InputError):
        natural_crops(-1)
