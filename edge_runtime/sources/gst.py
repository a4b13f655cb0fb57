"""GStreamer pipelines (``gst:...``, e.g. ``nvarguscamerasrc`` on a Jetson CSI camera) through
OpenCV built with GStreamer, as JetPack's OpenCV is.

The pipeline must end in an ``appsink``; OpenCV delivers BGR frames, turned to RGB here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from edge_runtime.sources.base import BaseSource, RawFrame, SourceError


def _opencv_with_gstreamer(where: str) -> Any:
    try:
        import cv2
    except ImportError:
        raise SourceError(
            f"{where}: gst: sources need OpenCV built with GStreamer (python3-opencv on "
            "JetPack); cv2 is not installed"
        ) from None
    info = cv2.getBuildInformation()
    line = next((x for x in info.splitlines() if "GStreamer" in x), "")
    if "YES" not in line:
        raise SourceError(
            f"{where}: this OpenCV ({cv2.__version__}) was built without GStreamer; use "
            "JetPack's python3-opencv or build OpenCV with -DWITH_GSTREAMER=ON"
        )
    return cv2


class GstSource(BaseSource):
    live = True

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.pipeline = uri[len("gst:") :].lstrip("/") if uri.startswith("gst:") else uri
        self._cap: Any = None
        self._cv2: Any = None

    def open(self) -> None:
        if not self.pipeline.strip():
            raise SourceError(f"{self.name}: empty GStreamer pipeline")
        self._cv2 = _opencv_with_gstreamer(self.name)
        self._cap = self._cv2.VideoCapture(self.pipeline, self._cv2.CAP_GSTREAMER)
        if not self._cap.isOpened():
            raise SourceError(f"{self.name}: GStreamer could not start the pipeline")

    def frames(self) -> Iterator[RawFrame]:
        if self._cap is None:
            raise SourceError(f"{self.name}: not open")
        n = 0
        while not self.closed:
            ok, bgr = self._cap.read()
            if not ok:
                return
            pts_ms = self._cap.get(self._cv2.CAP_PROP_POS_MSEC)
            yield RawFrame(bgr[:, :, ::-1], n, pts_ms / 1000.0 if pts_ms > 0 else None)
            n += 1

    def close(self) -> None:
        super().close()
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def open_gst(uri: str) -> GstSource:
    return GstSource(uri)
