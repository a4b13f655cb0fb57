"""Synthetic domain shifts on uint8 image batches.

Each corruption takes a batch (N,H,W) or (N,H,W,C), a ``severity`` 1..5 and a
``seed``, and returns a new uint8 batch of the same shape; the input is never
modified. Higher severity moves images further from the originals. Spatial
parameters (blur width, fog scale) are given for 28x28 frames and scale with
the frame size, so a severity means the same visual change at any resolution.
Everything is vectorised over the batch (numpy, plus torch for resampling).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.errors import InputError

Corruption = Callable[[np.ndarray, int, int], np.ndarray]

SEVERITIES = (1, 2, 3, 4, 5)

# Per-severity parameters, index = severity - 1.
_ROTATION_DEG = (12.0, 24.0, 40.0, 60.0, 90.0)
_NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)  # fraction of full scale
_BLUR_SIGMA_28 = (0.5, 0.8, 1.1, 1.5, 2.0)  # pixels at 28x28
_CONTRAST = (0.5, 0.35, 0.25, 0.15, 0.08)  # remaining contrast factor
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)  # fraction of full scale added
_FOG_ALPHA = (0.3, 0.42, 0.55, 0.67, 0.78)  # haze opacity
_INVERSION = (0.65, 0.75, 0.85, 0.93, 1.0)  # blend weight of the negative


def _check(images: np.ndarray, severity: int) -> None:
    if not isinstance(images, np.ndarray):
        raise InputError(f"images must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise InputError(f"images must be uint8, got {images.dtype}")
    if images.ndim not in (3, 4):
        raise InputError(
            f"images must have rank 3 (N,H,W) or 4 (N,H,W,C), got shape {images.shape}"
        )
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)):
        raise InputError(f"severity must be an integer 1..5, got {severity!r}")
    if severity not in SEVERITIES:
        raise InputError(f"severity must be 1..5, got {severity}")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _to_nchw(images: np.ndarray) -> torch.Tensor:
    # astype copies, so the tensor never aliases a read-only (cached) dataset array.
    x = torch.from_numpy(images.astype(np.float32))
    return x.unsqueeze(1) if images.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def _from_nchw(x: torch.Tensor, like: np.ndarray) -> np.ndarray:
    x = x.squeeze(1) if like.ndim == 3 else x.permute(0, 2, 3, 1)
    return _to_uint8(x.numpy())


def _size_scale(images: np.ndarray) -> float:
    return max(images.shape[1], images.shape[2]) / 28.0


def rotation(images: np.ndarray, severity: int = 3, seed: int = 0) -> np.ndarray:
    """Rotate each image by ±angle(severity) with ±15% jitter, zero (black) fill."""
    _check(images, severity)
    if len(images) == 0:
        return images.copy()
    rng = np.random.default_rng(seed)
    base = _ROTATION_DEG[severity - 1]
    sign = rng.choice((-1.0, 1.0), size=len(images))
    angle = np.deg2rad(sign * base * rng.uniform(0.85, 1.15, size=len(images)))
    cos, sin = np.cos(angle), np.sin(angle)
    theta = np.zeros((len(images), 2, 3), dtype=np.float32)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    x = _to_nchw(images)
    grid = F.affine_grid(torch.from_numpy(theta), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _from_nchw(out, images)


def gaussian_noise(images: np.ndarray, severity: int = 3, seed: int = 0) -> np.ndarray:
    """Add i.i.d. Gaussian noise with std a fraction of full scale."""
    _check(images, severity)
    rng = np.random.default_rng(seed)
    std = 255.0 * _NOISE_STD[severity - 1]
    noise = rng.standard_normal(images.shape, dtype=np.float32) * np.float32(std)
    return _to_uint8(images.astype(np.float32) + noise)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """(n,n) matrix applying a 1-D Gaussian blur with reflected borders.

    A dense matrix product beats a single-channel conv2d on CPU by ~10x for
    frames this small, and reflection keeps the borders from darkening.
    """
    k = _gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    m = torch.zeros(n, n, dtype=torch.float32)
    rows = torch.arange(n)
    for j, w in enumerate(k):
        src = rows + j - r
        # Reflect indices ("reflect" mode: -1 -> 1, n -> n-2), repeatedly for wide kernels.
        period = max(1, 2 * (n - 1))
        src = torch.remainder(src, period)
        src = torch.where(src >= n, period - src, src)
        m.index_put_((rows, src), w.expand(n), accumulate=True)
    return m


def _separable_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of an (N,C,H,W) tensor."""
    bh = _blur_matrix(x.shape[2], sigma)
    bw = _blur_matrix(x.shape[3], sigma)
    return bh @ x @ bw.T


def blur(images: np.ndarray, severity: int = 3, seed: int = 0) -> np.ndarray:
    """Gaussian blur (deterministic; ``seed`` is accepted for a uniform signature)."""
    _check(images, severity)
    if len(images) == 0:
        return images.copy()
    sigma = _BLUR_SIGMA_28[severity - 1] * _size_scale(images)
    return _from_nchw(_separable_blur(_to_nchw(images), sigma), images)


def _per_image_mean(x: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, x.ndim))
    return x.mean(axis=axes, keepdims=True)


def contrast(images: np.ndarray, severity: int = 3, seed: int = 0) -> np.ndarray:
    """Shrink contrast towards each image's mean grey level."""
    _check(images, severity)
    x = images.astype(np.float32)
    c = np.float32(_CONTRAST[severity - 1])
    mean = _per_image_mean(x) if len(x) else 0.0
    return _to_uint8((x - mean) * c + mean)


def brightness(images: np.ndarray, severity: int = 3, seed: int = 0) -> np.ndarray:
    """Add a constant brightness offset (saturating at white)."""
    _check(images, severity)
    return _to_uint8(images.astype(np.float32) + np.float32(255.0 * _BRIGHTNESS[severity - 1]))


def fog(images: np.ndarray, severity: int = 3, seed: int = 0) -> np.ndarray:
    """Blend each image with a bright, smooth random haze field (different per image)."""
    _check(images, severity)
    if len(images) == 0:
        return images.copy()
    rng = np.random.default_rng(seed)
    n, h, w = images.shape[:3]
    # Low-frequency field: coarse noise upsampled bicubically, then normalised to [0,1].
    coarse = torch.from_numpy(rng.standard_normal((n, 1, 4, 4), dtype=np.float32))
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    lo = field.amin(dim=(2, 3), keepdim=True)
    hi = field.amax(dim=(2, 3), keepdim=True)
    field = ((field - lo) / (hi - lo + 1e-6)).numpy()[:, 0]
    haze = 255.0 * (0.55 + 0.45 * field)  # light grey to white
    if images.ndim == 4:
        haze = haze[..., None]
    a = np.float32(_FOG_ALPHA[severity - 1])
    return _to_uint8(images.astype(np.float32) * (1.0 - a) + haze.astype(np.float32) * a)


def inversion(images: np.ndarray, severity: int = 3, seed: int = 0) -> np.ndarray:
    """Blend towards the photographic negative; severity 5 is the full negative."""
    _check(images, severity)
    t = np.float32(_INVERSION[severity - 1])
    x = images.astype(np.float32)
    return _to_uint8(x * (1.0 - t) + (255.0 - x) * t)


_IMPULSE_FRACTION = (0.03, 0.06, 0.09, 0.17, 0.27)  # pixels hit (half salt, half pepper)
_JPEG_QUALITY = (25, 18, 15, 10, 7)
_PIXELATE = (0.5, 0.4, 0.3, 0.22, 0.15)  # fraction of the side kept before upsampling

# The JPEG standard's luminance quantisation table (Annex K), scaled by quality as libjpeg does.
_JPEG_LUMA = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float32,
)


def impulse_noise(images: np.ndarray, severity: int = 3, seed: int = 0) -> np.ndarray:
    """Salt-and-pepper noise: a fraction of pixels set to black or white (all channels of a hit
    pixel alike, as a dead or stuck sensor pixel is)."""
    _check(images, severity)
    rng = np.random.default_rng(seed)
    out = images.copy()
    u = rng.random(images.shape[:3], dtype=np.float32)
    p = np.float32(_IMPULSE_FRACTION[severity - 1])
    out[u < p / 2] = 0
    out[(u >= p / 2) & (u < p)] = 255
    return out


def _dct_matrix(n: int = 8) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m.astype(np.float32)


def block_artifacts(images: np.ndarray, severity: int = 3, seed: int = 0) -> np.ndarray:
    """JPEG-like 8x8 block compression: per-block DCT, coefficients quantised with the JPEG
    luminance table at quality 25..7, inverse DCT. Blocks stay 8 px at every frame size (that is
    what a codec does), so on 28x28 frames this is heavy. Deterministic; ``seed`` is unused."""
    _check(images, severity)
    if len(images) == 0:
        return images.copy()
    q = _JPEG_QUALITY[severity - 1]
    scale = 5000.0 / q if q < 50 else 200.0 - 2.0 * q
    table = np.clip(np.floor((_JPEG_LUMA * scale + 50.0) / 100.0), 1, 255).astype(np.float32)
    x = images.astype(np.float32)
    if x.ndim == 3:
        x = x[..., None]
    n, h, w, c = x.shape
    ph, pw = -h % 8, -w % 8
    x = np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge") - 128.0
    hb, wb = x.shape[1] // 8, x.shape[2] // 8
    blocks = x.reshape(n, hb, 8, wb, 8, c).transpose(0, 1, 3, 5, 2, 4)  # (n,hb,wb,c,8,8)
    d = _dct_matrix()
    coef = d @ blocks @ d.T
    coef = np.rint(coef / table) * table
    rec = d.T @ coef @ d
    rec = rec.transpose(0, 1, 4, 2, 5, 3).reshape(n, hb * 8, wb * 8, c)[:, :h, :w] + 128.0
    out = _to_uint8(rec)
    return out[..., 0] if images.ndim == 3 else out


def pixelate(images: np.ndarray, severity: int = 3, seed: int = 0) -> np.ndarray:
    """Area-downsample to a fraction of the side, then nearest-neighbour back up (blocky)."""
    _check(images, severity)
    if len(images) == 0:
        return images.copy()
    h, w = images.shape[1:3]
    f = _PIXELATE[severity - 1]
    small = (max(1, round(h * f)), max(1, round(w * f)))
    x = F.interpolate(_to_nchw(images), size=small, mode="area")
    return _from_nchw(F.interpolate(x, size=(h, w), mode="nearest"), images)


CORRUPTIONS: dict[str, Corruption] = {
    "rotation": rotation,
    "gaussian_noise": gaussian_noise,
    "blur": blur,
    "contrast": contrast,
    "brightness": brightness,
    "fog": fog,
    "inversion": inversion,
    "impulse_noise": impulse_noise,
    "block_artifacts": block_artifacts,
    "pixelate": pixelate,
}


def corrupt(images: np.ndarray, name: str, severity: int = 3, seed: int = 0) -> np.ndarray:
    """Apply the corruption ``name`` from :data:`CORRUPTIONS`; returns a new uint8 batch."""
    fn = CORRUPTIONS.get(name)
    if fn is None:
        raise InputError(
            f"unknown corruption {name!r}: choose one of {', '.join(sorted(CORRUPTIONS))}"
        )
    return fn(images, severity, seed)
