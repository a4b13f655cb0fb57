"""Video files (mp4, mkv, avi, mov) decoded by PyAV; also the decode loop the other PyAV
sources (RTSP, V4L2) share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av

from edge_runtime.sources.base import BaseSource, RawFrame, SourceError

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm")


def open_container(target: str, where: str, **kwargs: Any) -> Any:
    """``av.open`` with FFmpeg's errors turned into a SourceError naming the source."""
    try:
        container = av.open(target, **kwargs)
    except (av.FFmpegError, OSError) as exc:
        raise SourceError(f"{where}: cannot open: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise SourceError(f"{where}: has no video stream")
    return container


def decode_frames(container: Any, start: int = 0) -> Iterator[RawFrame]:
    """The first video stream's frames, numbered from ``start``; FFmpeg errors propagate."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame-threaded decoding: the serving thread keeps a core
    n = start
    for frame in container.decode(stream):
        yield RawFrame(frame, n, None if frame.time is None else float(frame.time))
        n += 1


class ContainerSource(BaseSource):
    """A source that opens one PyAV container and decodes it to the end (files, cameras).

    Subclasses set ``_container`` in ``open`` and name what a decode error means in
    ``read_failure``."""

    read_failure = "decoding failed"

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self._container: Any = None
        self._iterating = False

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
            raise SourceError(f"{self.name}: {self.read_failure}: {exc}") from exc
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


class VideoFileSource(ContainerSource):
    """Every frame of a video file, in order; ends at the end of the file."""

    def __init__(self, uri: str) -> None:
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        super().__init__(uri)
        self.path = Path(path)

    def open(self) -> None:
        if not self.path.is_file():
            raise SourceError(f"{self.name}: no such video file")
        self._container = open_container(str(self.path), self.name)


def open_video(uri: str) -> VideoFileSource:
    return VideoFileSource(uri)
