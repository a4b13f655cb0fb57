"""On-disk cache of encoder features, keyed by the encoder spec and the exact frames.

Extracting features for all of Fashion-MNIST takes minutes on a small CPU;
benchmarks and tests reuse the same frames many times. The cache key hashes
the :class:`FeatureSpec` (input size, layers, widths, normalisation, weights
SHA-256), the backend name and the frames' bytes, so a different encoder or a
single changed pixel never returns stale features.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_runtime.encoder.backend import FeatureSpec
from edge_runtime.errors import InputError

CACHE_ENV = "EDGE_RUNTIME_CACHE"


class _FeatureSource(Protocol):
    """What the cache needs from an encoder: its spec and a ``features`` method."""

    @property
    def spec(self) -> FeatureSpec: ...

    def features(self, frames: np.ndarray, *, progress: bool | str = False) -> np.ndarray: ...


def cache_dir() -> Path:
    """``$EDGE_RUNTIME_CACHE/features`` if set, else ``~/.cache/edge_runtime/features``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "edge_runtime"
    return base / "features"


def cache_key(encoder: _FeatureSource, images: np.ndarray) -> str:
    """SHA-256 over the encoder's spec, backend name and the frames (shape, dtype, bytes)."""
    h = hashlib.sha256()
    backend = getattr(getattr(encoder, "backend", None), "name", type(encoder).__name__)
    # A CUDA backend's float rounding differs slightly from the CPU's; keep them apart.
    h.update(
        json.dumps({"spec": encoder.spec.to_dict(), "backend": backend}, sort_keys=True).encode()
    )
    arr = np.ascontiguousarray(images)
    h.update(f"{arr.shape}|{arr.dtype.str}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()[:32]


def cached_features(
    encoder: _FeatureSource,
    images: np.ndarray,
    tag: str = "",
    *,
    progress: bool | str = False,
    refresh: bool = False,
) -> np.ndarray:
    """``encoder.features(images)``, read from / written to the on-disk cache.

    ``tag`` only makes file names readable (``<tag>-<hash>.npy``); the hash alone
    decides a hit. A corrupt or mis-shaped cache file is recomputed, never trusted.
    """
    if not isinstance(images, np.ndarray):
        raise InputError(f"images must be a numpy array, got {type(images).__name__}")
    if len(images) == 0:
        raise InputError("images is an empty batch (zero frames)")
    safe_tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)[:40]
    name = (
        f"{safe_tag}-{cache_key(encoder, images)}.npy"
        if safe_tag
        else f"{cache_key(encoder, images)}.npy"
    )
    path = cache_dir() / name
    if path.is_file() and not refresh:
        try:
            feats = np.load(path, allow_pickle=False)
            if feats.shape == (len(images), encoder.spec.dim) and feats.dtype == np.float32:
                return feats
        except (OSError, ValueError):
            pass  # fall through: recompute and overwrite
    feats = np.ascontiguousarray(encoder.features(images, progress=progress), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file and rename: a killed run never leaves a half-written cache entry.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, feats, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return feats
