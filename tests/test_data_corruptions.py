"""Corruptions: change images, keep shape/dtype, grow with severity, are seeded."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edge_runtime.data.corruptions import CORRUPTIONS, corrupt
from edge_runtime.errors import InputError

STOCHASTIC = ("rotation", "gaussian_noise", "fog")


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_changes_images_and_grows_with_severity(name, fashion_slice) -> None:
    x = fashion_slice[0][:64]
    before = x.copy()
    dists = []
    for sev in range(1, 6):
        y = corrupt(x, name, sev, seed=7)
        assert y.shape == x.shape and y.dtype == np.uint8
        dists.append(_distance(x, y))
    assert np.array_equal(x, before), "input must not be modified"
    assert dists[0] > 1.0, f"{name} severity 1 barely changes images: {dists}"
    assert all(a < b for a, b in itertools.pairwise(dists)), f"{name}: {dists}"


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_is_seeded(name, fashion_slice) -> None:
    x = fashion_slice[0][:16]
    assert np.array_equal(corrupt(x, name, 3, seed=1), corrupt(x, name, 3, seed=1))
    if name in STOCHASTIC:
        assert not np.array_equal(corrupt(x, name, 3, seed=1), corrupt(x, name, 3, seed=2))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_on_rgb_batches(name, fashion_slice) -> None:
    gray = fashion_slice[0][:8]
    rgb = np.repeat(gray[..., None], 3, axis=3)
    y = corrupt(rgb, name, 4, seed=0)
    assert y.shape == rgb.shape and y.dtype == np.uint8
    assert _distance(rgb, y) > 1.0
    if name not in ("gaussian_noise",):  # channel-independent noise differs per channel
        # Gray-in-RGB stays gray, and matches the gray result.
        assert np.array_equal(y[..., 0], y[..., 2])
        assert np.array_equal(y[..., 0], corrupt(gray, name, 4, seed=0))


def test_specific_effects(fashion_slice) -> None:
    x = fashion_slice[0][:32]
    assert np.array_equal(corrupt(x, "inversion", 5), 255 - x)
    low = corrupt(x, "contrast", 5)
    per_image_std = lambda a: a.reshape(len(a), -1).astype(float).std(axis=1)  # noqa: E731
    assert np.all(per_image_std(low) < 0.2 * per_image_std(x) + 1)
    assert corrupt(x, "fog", 4).mean() > x.mean() + 50  # haze brightens
    assert corrupt(x, "brightness", 3).mean() > x.mean()
    # Blur removes high frequencies: smaller neighbour differences.
    b = corrupt(x, "blur", 3).astype(float)
    assert np.abs(np.diff(b, axis=2)).mean() < 0.7 * np.abs(np.diff(x.astype(float), axis=2)).mean()
    # Rotation by ~90 degrees moves mass: a trouser (tall) becomes wide.
    r = corrupt(x, "rotation", 5)
    assert _distance(r, x) > 30


def test_bad_arguments(fashion_slice) -> None:
    x = fashion_slice[0][:4]
    with pytest.raises(InputError, match="unknown corruption"):
        corrupt(x, "snow", 3)
    for bad in (0, 6, 2.5, True):
        with pytest.raises(InputError, match="severity"):
            corrupt(x, "blur", bad)
    with pytest.raises(InputError, match="uint8"):
        corrupt(x.astype(np.float32), "blur", 3)
    with pytest.raises(InputError, match="rank"):
        corrupt(x[0], "blur", 3)


def test_empty_batch(fashion_slice) -> None:
    x = fashion_slice[0][:0]
    for name in CORRUPTIONS:
        assert corrupt(x, name, 2).shape == (0, 28, 28)
