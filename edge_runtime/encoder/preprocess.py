"""Frame validation and preprocessing: uint8 frames of any size → normalised tensors."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def validate_frames(frames: np.ndarray | torch.Tensor, *, name: str = "frames") -> np.ndarray:
    """Check a batch of frames and return it as a numpy array.

    Accepts (N,H,W) grayscale or (N,H,W,C) with C in {1,3,4}; uint8, or float in
    [0, 1]. Raises :class:`InputError` naming the problem otherwise.
    """
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise InputError(
            f"{name} must be a numpy array or torch tensor, got {type(frames).__name__}"
        )
    if frames.ndim not in (3, 4):
        raise InputError(
            f"{name} must have rank 3 (N,H,W) or 4 (N,H,W,C), got rank {frames.ndim} "
            f"with shape {tuple(frames.shape)}"
        )
    if frames.shape[0] == 0:
        raise InputError(f"{name} is an empty batch (zero frames)")
    if frames.ndim == 4 and frames.shape[3] not in (1, 3, 4):
        raise InputError(
            f"{name} must have 1, 3 or 4 channels last, got shape {tuple(frames.shape)}"
        )
    if frames.shape[1] < 2 or frames.shape[2] < 2:
        raise InputError(f"{name} frames are too small: shape {tuple(frames.shape)}")
    if frames.dtype == np.uint8:
        return frames
    if np.issubdtype(frames.dtype, np.floating):
        bad = ~np.isfinite(frames.reshape(len(frames), -1)).all(axis=1)
        if bad.any():
            idx = np.flatnonzero(bad)[:5].tolist()
            raise InputError(f"{name} contain NaN or Inf values (frames {idx})")
        return frames
    raise InputError(f"{name} must be uint8 or float, got dtype {frames.dtype}")


def finite_mask(frames: np.ndarray) -> np.ndarray:
    """Per-frame mask of frames with only finite values (uint8 frames always are)."""
    if frames.dtype == np.uint8:
        return np.ones(len(frames), dtype=bool)
    return np.isfinite(frames.reshape(len(frames), -1)).all(axis=1)


def preprocess(
    frames: np.ndarray | torch.Tensor,
    input_size: int,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """Validated frames → float32 (N,3,S,S), resized bilinearly and normalised."""
    arr = validate_frames(frames)
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # torch warns on read-only buffers (e.g. cached datasets)
        arr = arr.copy()
    x = torch.from_numpy(arr)
    x = x.float() / 255.0 if arr.dtype == np.uint8 else x.float()
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[2] != input_size or x.shape[3] != input_size:
        downscale = x.shape[2] > input_size or x.shape[3] > input_size
        x = F.interpolate(
            x,
            size=(input_size, input_size),
            mode="bilinear",
            align_corners=False,
            antialias=downscale,
        )
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()
