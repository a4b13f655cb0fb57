"""V4L2 / USB cameras (``/dev/videoN``) through PyAV's ``v4l2`` input format."""

from __future__ import annotations

import os
import stat

from edge_runtime.sources.base import SourceError
from edge_runtime.sources.video import ContainerSource, open_container


class V4l2Source(ContainerSource):
    live = True
    read_failure = "camera read failed"

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.path = uri[len("v4l2://") :] if uri.startswith("v4l2://") else uri

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


def open_v4l2(uri: str) -> V4l2Source:
    return V4l2Source(uri)
