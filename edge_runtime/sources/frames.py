"""The one conversion from a decoded picture to the frame the runtime's encoder expects.

Every source's frames pass through :meth:`FrameFormat.convert` on the reader thread, so a
batch is always frames of one shape: the shape the base domain was fitted on (a stream file's
frames) or, with no such reference, the encoder's square input. Resizing and colour
conversion go through FFmpeg's swscale (PyAV), bilinear, for video frames and numpy images
alike, so a camera picture and an image file of the same scene become the same frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from edge_runtime.fleet.thumbnails import to_uint8
from edge_runtime.sources.base import SourceError, as_image

_NUMPY_FORMATS = {1: "gray", 3: "rgb24", 4: "rgba"}


@dataclass(frozen=True)
class FrameFormat:
    """Frames of ``height`` x ``width`` with ``channels`` 1 (grey, (H, W)) or 3 (RGB)."""

    height: int
    width: int
    channels: int = 3

    def __post_init__(self) -> None:
        if self.height < 2 or self.width < 2:
            raise SourceError(f"frame size must be at least 2x2, got {self.height}x{self.width}")
        if self.channels not in (1, 3):
            raise SourceError(f"frame channels must be 1 or 3, got {self.channels}")

    @classmethod
    def like(cls, shape: tuple[int, ...]) -> FrameFormat:
        """The format of frames shaped like ``shape`` ((H, W) or (H, W, C)); RGBA -> RGB."""
        channels = 1 if len(shape) == 2 or shape[2] == 1 else 3
        return cls(int(shape[0]), int(shape[1]), channels)

    @classmethod
    def parse(cls, text: str) -> FrameFormat:
        """``HxW`` (RGB) or ``HxWxC``, e.g. ``28x28x1``."""
        parts = text.lower().split("x")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) not in (2, 3):
            raise SourceError(f"frame shape must be HxW or HxWxC (e.g. 224x224x3), got {text!r}")
        return cls(*nums)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.height, self.width) if self.channels == 1 else (self.height, self.width, 3)

    @property
    def _pix_fmt(self) -> str:
        return "gray" if self.channels == 1 else "rgb24"

    def convert(self, data: Any) -> np.ndarray:
        """A decoded picture -> uint8 frame of :attr:`shape`.

        A float image with NaN or Inf cannot be resized or quantised honestly; it becomes an
        all-NaN float32 frame of the right shape, which the runtime rejects and counts.
        """
        if isinstance(data, av.VideoFrame):
            out = data.reformat(self.width, self.height, self._pix_fmt, interpolation="BILINEAR")
            return out.to_ndarray()
        img = as_image(data, "frame")
        if img.dtype != np.uint8:
            if not np.isfinite(img).all():
                return np.full(self.shape, np.nan, np.float32)
            img = to_uint8(img)
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        if img.shape == self.shape:
            return img
        frame = av.VideoFrame.from_ndarray(
            np.ascontiguousarray(img), format=_NUMPY_FORMATS[1 if img.ndim == 2 else img.shape[2]]
        )
        return self.convert(frame)


def stack_frames(frames: list[np.ndarray]) -> np.ndarray:
    """One batch from converted frames; a NaN frame makes the batch float32 in [0, 1]."""
    if all(f.dtype == np.uint8 for f in frames):
        return np.stack(frames)
    return np.stack([f.astype(np.float32) / 255.0 if f.dtype == np.uint8 else f for f in frames])
