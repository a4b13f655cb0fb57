"""The on-disk feature cache (edge_runtime.encoder.cache) with the real encoder on 8 frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.data.datasets import load_fashion_mnist
from edge_runtime.encoder import Encoder, FeatureSpec, TorchBackend
from edge_runtime.encoder.cache import cache_dir, cache_key, cached_features
from edge_runtime.errors import InputError


class CountingEncoder:
    """The real encoder, counting how often it is asked to extract."""

    def __init__(self, enc: Encoder):
        self.enc, self.calls = enc, 0
        self.backend = enc.backend

    @property
    def spec(self) -> FeatureSpec:
        return self.enc.spec

    def features(self, frames: np.ndarray, *, progress: bool | str = False) -> np.ndarray:
        self.calls += 1
        return self.enc.features(frames, progress=progress)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(TorchBackend.mobilenet(input_size=32, layers=(6, 18)), batch_size=8)


def test_cache_hits_and_keys(
    encoder: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path / "features"
    frames = np.ascontiguousarray(load_fashion_mnist("test")[0][:8])
    enc = CountingEncoder(encoder)
    first = cached_features(enc, frames, "t")
    assert enc.calls == 1 and first.shape == (8, encoder.spec.dim) and first.dtype == np.float32
    again = cached_features(enc, frames, "t")
    assert enc.calls == 1  # served from disk
    np.testing.assert_array_equal(again, first)
    np.testing.assert_allclose(first, encoder.features(frames), rtol=1e-5, atol=1e-5)
    # One changed pixel, or another encoder spec, is another key.
    changed = frames.copy()
    changed[0, 0, 0] ^= 1
    assert cache_key(enc, changed) != cache_key(enc, frames)
    other = Encoder(TorchBackend.mobilenet(input_size=32, layers=(18,)), batch_size=8)
    assert cache_key(other, frames) != cache_key(enc, frames)
    # A corrupt cache entry is recomputed, not trusted.
    (path,) = list((tmp_path / "features").glob("t-*.npy"))
    path.write_bytes(b"garbage")
    fixed = cached_features(enc, frames, "t")
    assert enc.calls == 2
    np.testing.assert_array_equal(fixed, first)
    with pytest.raises(InputError):
        cached_features(enc, frames[:0], "t")
