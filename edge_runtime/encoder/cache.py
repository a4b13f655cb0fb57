"""On-disk cache of encoder features, keyed by the encoder spec and the exact frames.

Extracting features for all of Fashion-MNIST takes minutes on a small CPU;
benchmarks and tests reuse the same frames many times. The cache key hashes
the :class:`FeatureSpec` (input size, layers, widths, normalisation, weights
SHA-256), the backend name and the frames' bytes, so a different encoder or a
single changed pixel never returns stale features.

:func:`cached_encoded` does the same for :meth:`Encoder.encode` results (pooled features
plus the maps of tapped blocks), keyed also by the taps and the input conditioning.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

from edge_runtime.encoder.backend import Encoded, FeatureSpec, normalise_taps
from edge_runtime.encoder.condition import get_conditioner
from edge_runtime.errors import InputError

CACHE_ENV = "EDGE_RUNTIME_CACHE"


class _FeatureSource(Protocol):
    """What the cache needs from an encoder: its spec and a ``features`` method."""

    @property
    def spec(self) -> FeatureSpec: ...

    def features(self, frames: np.ndarray, *, progress: bool | str = False) -> np.ndarray: ...


class _EncodedSource(Protocol):
    """What :func:`cached_encoded` needs: a spec and an ``encode`` method."""

    @property
    def spec(self) -> FeatureSpec: ...

    def encode(
        self,
        frames: np.ndarray,
        taps: Sequence[int] = (),
        condition: str = "none",
        *,
        progress: bool | str = False,
    ) -> Encoded: ...


def cache_dir() -> Path:
    """``$EDGE_RUNTIME_CACHE/features`` if set, else ``~/.cache/edge_runtime/features``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "edge_runtime"
    return base / "features"


def cache_key(encoder: _FeatureSource | _EncodedSource, images: np.ndarray) -> str:
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
    _check_images(images)
    path = cache_dir() / _file_name(tag, cache_key(encoder, images), ".npy")
    if path.is_file() and not refresh:
        try:
            feats = np.load(path, allow_pickle=False)
            if feats.shape == (len(images), encoder.spec.dim) and feats.dtype == np.float32:
                return feats
        except (OSError, ValueError):
            pass  # fall through: recompute and overwrite
    feats = np.ascontiguousarray(encoder.features(images, progress=progress), dtype=np.float32)
    _atomic_save(path, lambda fh: np.save(fh, feats, allow_pickle=False))
    return feats


# Maps go to disk as float16 (half the bytes: block 3 alone is 6,144 values a frame at 64 px)
# unless a value would overflow it. Bump the format to invalidate entries if this changes.
_MAPS_FORMAT = "float16-v1"
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _disk_map(m: np.ndarray) -> np.ndarray:
    m = np.ascontiguousarray(m, dtype=np.float32)
    peak = float(np.max(np.abs(m), initial=0.0))
    # `not <` also keeps NaN/inf maps in float32, unaltered.
    return m if not peak < _FLOAT16_MAX else m.astype(np.float16)


def cached_encoded(
    encoder: _EncodedSource,
    images: np.ndarray,
    taps: Sequence[int],
    condition: str = "none",
    tag: str = "",
    *,
    progress: bool | str = False,
    refresh: bool = False,
) -> Encoded:
    """``encoder.encode(images, taps, condition)``, read from / written to the on-disk cache.

    The key is :func:`cache_key` (spec, backend, frames) plus the sorted taps and the
    conditioning name. One uncompressed ``.npz`` per entry, loaded with
    ``allow_pickle=False``, written to a temporary file and renamed. Features are stored
    and returned as float32, bitwise what ``encode`` gives. **Maps are stored as float16**
    (relative rounding <= 2^-11; float32 only where a value would overflow float16) and
    returned as float32; a miss returns the same rounded maps a later hit will, so the
    result never depends on the cache's state. A corrupt or mis-shaped file is recomputed.
    """
    _check_images(images)
    taps = normalise_taps(taps)
    get_conditioner(condition)  # an unknown name fails before any hashing or encoding
    h = hashlib.sha256(cache_key(encoder, images).encode())
    h.update(
        json.dumps({"taps": list(taps), "condition": condition, "maps": _MAPS_FORMAT}).encode()
    )
    path = cache_dir() / _file_name(tag, h.hexdigest()[:32], ".npz")
    n, dim = len(images), encoder.spec.dim
    if path.is_file() and not refresh:
        hit = _load_encoded(path, n, dim, taps)
        if hit is not None:
            return hit
    got = encoder.encode(images, taps, condition, progress=progress)
    arrays = {"features": np.ascontiguousarray(got.features, dtype=np.float32)}
    # Numeric arrays only, so nothing is pickled (savez's allow_pickle is numpy>=2.1 only).
    arrays.update({f"tap_{b}": _disk_map(got.maps[b]) for b in taps})
    _atomic_save(path, lambda fh: np.savez(fh, **arrays))
    return Encoded(
        features=arrays["features"],
        maps={b: arrays[f"tap_{b}"].astype(np.float32) for b in taps},
    )


def _load_encoded(path: Path, n: int, dim: int, taps: tuple[int, ...]) -> Encoded | None:
    """The entry at ``path`` if every array is there with the right shape and dtype."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if set(data.files) != {"features", *(f"tap_{b}" for b in taps)}:
                return None
            feats = data["features"]
            if feats.shape != (n, dim) or feats.dtype != np.float32:
                return None
            maps: dict[int, np.ndarray] = {}
            for b in taps:
                m = data[f"tap_{b}"]
                if m.ndim != 4 or len(m) != n or m.dtype not in (np.float16, np.float32):
                    return None
                maps[b] = m.astype(np.float32)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None  # a truncated or foreign file: recompute and overwrite
    return Encoded(features=feats, maps=maps)


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray):
        raise InputError(f"images must be a numpy array, got {type(images).__name__}")
    if len(images) == 0:
        raise InputError("images is an empty batch (zero frames)")


def _file_name(tag: str, digest: str, suffix: str) -> str:
    """``<tag>-<hash><suffix>``: the tag only makes names readable; the hash decides a hit."""
    safe_tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)[:40]
    return f"{safe_tag}-{digest}{suffix}" if safe_tag else f"{digest}{suffix}"


def _atomic_save(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write to a temporary file and rename: a killed run never leaves a half-written entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=f"{path.suffix}.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
