"""Input conditioning: a filter applied to frames at their native resolution, before the
encoder's resize and normalisation.

Sensor noise (salt-and-pepper from dead pixels, shot noise) survives a bilinear resize
and shifts early-block activations; a 3x3 median or Gaussian at the camera's resolution
removes much of it for the cost of one small filter. Which one helps is measured by the
adaptor search, so each is a named entry of :data:`CONDITIONERS`: adding one is a
function plus one registry line.

Every conditioner keeps shape and dtype: (N,H,W) or (N,H,W,C), uint8 (rounded back to
uint8) or float. Edges are replicated. A NaN pixel spreads to its 3x3 neighbourhood and
the frame stays non-finite, so the pipeline still rejects it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.errors import ConfigError, InputError

# Filter this many pixels (planes x H x W) at a time, so the float working copies stay at a
# few tens of MB whatever the batch and frame size.
_CHUNK_PIXELS = 1 << 22
_BLUR_SIGMA = 0.8


class UnknownConditionerError(ConfigError, InputError):
    """An unknown conditioner name; caught as either a config or an input error."""


def _planes(frames: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Apply ``fn`` ((B,1,H,W) float → same) to every channel plane of ``frames``."""
    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else frames
    if not isinstance(arr, np.ndarray) or arr.ndim not in (3, 4):
        shape = getattr(arr, "shape", None)
        raise InputError(f"frames to condition must be (N,H,W) or (N,H,W,C), got {shape}")
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"frames to condition must be uint8 or float, got {arr.dtype}")
    if arr.size == 0:
        return arr.copy()
    n, h, w = arr.shape[:3]
    c = arr.shape[3] if arr.ndim == 4 else 1
    work = torch.float64 if arr.dtype == np.float64 else torch.float32
    src = np.ascontiguousarray(arr)
    if not src.flags.writeable:  # torch warns on read-only buffers (frozen datasets)
        src = src.copy()
    x = torch.from_numpy(src)
    # (N,H,W,C) → (N*C,1,H,W): each channel filtered on its own.
    planes = x.reshape(n, h, w, c).permute(0, 3, 1, 2).reshape(n * c, 1, h, w)
    out = torch.empty(planes.shape, dtype=work)
    step = max(1, _CHUNK_PIXELS // (h * w))
    with torch.inference_mode():
        for i in range(0, n * c, step):
            out[i : i + step] = fn(planes[i : i + step].to(work))
        # uint8 in, uint8 out: round (blur gives fractions) rather than truncate.
        result = out.round_().clamp_(0, 255).to(torch.uint8) if arr.dtype == np.uint8 else out
        result = result.reshape(n, c, h, w).permute(0, 2, 3, 1).reshape(arr.shape)
        return np.ascontiguousarray(result.numpy()).astype(arr.dtype, copy=False)


# Devillard's median-of-9 exchange network: 19 min/max pairs on 9 shifted views of the
# padded plane. Elementwise ops, no 9x unfold buffer: ~4x faster than unfold + median on a
# 640x480 frame. Every output is one of the 9 inputs (uint8 frames stay exact), and
# minimum/maximum propagate NaN.
_MEDIAN9 = (
    (1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
    (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2),
)  # fmt: skip


def _median3(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    v = [padded[..., i : i + h, j : j + w] for i in range(3) for j in range(3)]
    for a, b in _MEDIAN9:
        v[a], v[b] = torch.minimum(v[a], v[b]), torch.maximum(v[a], v[b])
    return v[4]


def _gaussian_kernel(sigma: float, dtype: torch.dtype) -> torch.Tensor:
    t = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype).view(1, 1, 3, 3)


def _blur(x: torch.Tensor) -> torch.Tensor:
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, _gaussian_kernel(_BLUR_SIGMA, x.dtype))


def none(frames: np.ndarray) -> np.ndarray:
    """Identity: the same array, not a copy."""
    return frames


def median3(frames: np.ndarray) -> np.ndarray:
    """3x3 median per channel, edges replicated: removes isolated dead/hot pixels."""
    return _planes(frames, _median3)


def blur(frames: np.ndarray) -> np.ndarray:
    """3x3 Gaussian (sigma 0.8) per channel, edges replicated: damps pixel noise."""
    return _planes(frames, _blur)


CONDITIONERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": none,
    "median3": median3,
    "blur": blur,
}


def get_conditioner(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The conditioner called ``name``; UnknownConditionerError listing the choices."""
    try:
        return CONDITIONERS[name]
    except (KeyError, TypeError):
        raise UnknownConditionerError(
            f"unknown input conditioning {name!r}; choose one of {sorted(CONDITIONERS)}"
        ) from None


def condition(frames: np.ndarray, name: str) -> np.ndarray:
    """``frames`` filtered by conditioner ``name``; same shape and dtype."""
    return get_conditioner(name)(frames)
