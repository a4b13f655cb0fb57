"""The frame-source contract: what every camera, stream, file or folder looks like to serving.

A :class:`FrameSource` is opened once, yields :class:`RawFrame` items (decoded pictures with
a source-local frame number and a timestamp) until it ends or is closed, and reports what
happens to it on the way (a dropped connection, a gap, a file it could not read) through its
``notify`` callback. It does not convert, pace or drop frames: the reader thread
(:mod:`edge_runtime.sources.reader`) does that the same way for every kind, so a new kind is
only the code that talks to its device or format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edge_runtime.errors import InputError

#: ``notify(kind, details)``: a source's report of something that happened to it (an event).
Notify = Callable[[str, dict[str, Any]], None]


class SourceError(InputError):
    """A source that cannot be opened or read: the message says which and why."""


@dataclass(frozen=True)
class RawFrame:
    """One decoded picture as the source delivers it.

    ``data`` is an ``av.VideoFrame`` (PyAV sources, so the one conversion can use swscale) or
    a numpy image (H, W) / (H, W, C). ``number`` counts the frames this source delivered,
    from 0; ``pts_s`` is the source's own timestamp in seconds, None when it has none.
    """

    data: Any
    number: int
    pts_s: float | None = None
    tag: str | None = None  # what the frame is called at its source (an image's file name)
    decoded_at: float = 0.0  # time.perf_counter() when it left the decoder (set by shaping)


def _ignore(kind: str, details: dict[str, Any]) -> None:
    pass


@runtime_checkable
class FrameSource(Protocol):
    """A camera, stream, file or folder of frames.

    ``live`` sources (cameras, RTSP) keep producing whether or not the runtime keeps up, so
    the reader drops their stale frames; other sources wait for the runtime.
    """

    name: str
    live: bool
    notify: Notify

    def open(self) -> None: ...

    def frames(self) -> Iterator[RawFrame]: ...

    def close(self) -> None: ...


class BaseSource:
    """Shared bookkeeping: a name, the live flag, a notify callback and a closed flag that a
    blocking ``frames`` loop checks so :meth:`close` from another thread ends it."""

    live = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.notify: Notify = _ignore
        self.closed = False

    def open(self) -> None:
        pass

    def frames(self) -> Iterator[RawFrame]:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True


def as_image(data: Any, where: str) -> np.ndarray:
    """A numpy image (H, W) or (H, W, C) with C in 1, 3, 4, uint8 or float; else SourceError."""
    arr = np.asarray(data)
    ok_rank = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))
    if not ok_rank or min(arr.shape[:2], default=0) < 2:
        raise SourceError(f"{where}: not an image (H,W) or (H,W,C): shape {arr.shape}")
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise SourceError(f"{where}: image dtype must be uint8 or float, got {arr.dtype}")
    return arr
