"""RTSP streams through PyAV (FFmpeg's RTSP client over TCP), reconnecting with capped
exponential backoff.

A camera that drops out is the normal case on a device, not an error: the source waits
``min_backoff_s``, then twice as long each failed attempt up to ``max_backoff_s``, and tries
again forever (until closed). When frames flow again it reports the gap: the seconds between
the last frame before the outage and the first after it, and the frames that span would have
held at the stream's frame rate.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import av

from edge_runtime.sources.base import BaseSource, RawFrame, SourceError
from edge_runtime.sources.video import decode_frames, open_container


class RtspSource(BaseSource):
    live = True

    def __init__(
        self,
        uri: str,
        *,
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        open_timeout_s: float = 5.0,
        read_timeout_s: float = 3.0,
    ) -> None:
        super().__init__(uri)
        if not 0 < min_backoff_s <= max_backoff_s:
            raise SourceError(f"{uri}: backoff must satisfy 0 < min <= max")
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout = (open_timeout_s, read_timeout_s)
        self._container: Any = None
        self._wake = threading.Event()  # close() cuts a backoff sleep short
        self.reconnects = 0
        self._iterating = False

    def _connect(self) -> Any:
        return open_container(
            self.name, self.name, options={"rtsp_transport": "tcp"}, timeout=self.timeout
        )

    def open(self) -> None:
        # The first connection must work: a wrong address at start is a configuration error,
        # not an outage to wait out.
        self._container = self._connect()

    def frames(self) -> Iterator[RawFrame]:
        self._iterating = True
        try:
            yield from self._frames()
        finally:
            self._drop_container()

    def _frames(self) -> Iterator[RawFrame]:
        n = 0
        fps = 0.0
        last_t: float | None = None  # wall clock of the last frame before an outage
        attempts = 0
        while not self.closed:
            if self._container is None:
                try:
                    self._container = self._connect()
                except SourceError as exc:
                    attempts += 1
                    delay = min(self.max_backoff_s, self.min_backoff_s * 2 ** (attempts - 1))
                    self.notify(
                        "source_reconnect_failed",
                        {"attempt": attempts, "retry_in_s": round(delay, 3), "error": str(exc)},
                    )
                    self._wake.wait(delay)
                    continue
            rate = self._container.streams.video[0].average_rate
            fps = float(rate) if rate else fps
            first = True
            try:
                for raw in decode_frames(self._container, n):
                    if self.closed:
                        return
                    now = time.monotonic()
                    if first and last_t is not None:
                        gap = now - last_t
                        self.reconnects += 1
                        self.notify(
                            "source_gap",
                            {
                                "seconds": round(gap, 3),
                                "frames_missed": round(gap * fps) if fps else None,
                                "attempts": attempts,
                                "fps": fps or None,
                            },
                        )
                        attempts = 0
                    first = False
                    last_t = now
                    n = raw.number + 1
                    yield raw
                reason = "the stream ended"
            except (av.FFmpegError, OSError) as exc:
                reason = str(exc)
            if self.closed:
                return
            self._drop_container()
            self.notify("source_disconnected", {"reason": reason, "frames": n})
            if last_t is None:
                last_t = time.monotonic()

    def _drop_container(self) -> None:
        if self._container is not None:
            # A dead connection may fail to close; it is gone either way.
            with contextlib.suppress(av.FFmpegError, OSError):
                self._container.close()
            self._container = None

    def close(self) -> None:
        # FFmpeg's contexts are not thread-safe: while the reader thread decodes, only it may
        # close the connection (frames()' finally, within the read timeout).
        super().close()
        self._wake.set()
        if not self._iterating:
            self._drop_container()


def open_rtsp(uri: str) -> RtspSource:
    return RtspSource(uri)
