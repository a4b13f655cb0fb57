"""V4L2 / USB cameras (``/dev/videoN``) through PyAV's ``v4l2`` input format."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import Any

import av

from edge_runtime.sources.base import BaseSource, RawFrame, SourceError
from edge_runtime.sources.video import decode_frames, open_container


class V4l2Source(BaseSource):
    live = True

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.path = uri[len("v4l2://") :] if uri.startswith("v4l2://") else uri
        self._container: Any = None
        self._iterating = False

    def open(self) -> None:
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            raise SourceError(
                f"{self.name}: no such video device (is the camera plugged in? see ls /dev/video*)"
            ) from None
        if not stat.S_ISCHR(mode):
            raise SourceError(f"{self.name}: not a character device, so not a V4L2 camera")
        self._container = open_container(self.path, self.name, format="v4l2")

    def frames(self) -> Iterator[RawFrame]:
        if self._container is None:
            raise SourceError(f"{self.name}: not open")
        self._iterating = True
        try:
            for raw in decode_frames(self._container):
                if self.closed:
                    return
                yield raw
        except av.FFmpegError as exc:
            raise SourceError(f"{self.name}: camera read failed: {exc}") from exc
        finally:
            self._release()

    def close(self) -> None:
        # FFmpeg's contexts are not thread-safe: while the reader thread decodes, only it may
        # close the container (its generator's finally); close() just asks it to stop.
        super().close()
        if not self._iterating:
            self._release()

    def _release(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


def open_v4l2(uri: str) -> V4l2Source:
    return V4l2Source(uri)
