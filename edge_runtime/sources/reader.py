"""A reader thread per source, and its drop policy: the newest frame wins.

The thread pulls frames from its (shaped) source into a small buffer that the serving thread
takes from. A live source (a camera, RTSP, a paced file) cannot be asked to wait, so its
buffer holds one frame and a new frame replaces one the runtime has not taken yet; each such
replacement is counted in :attr:`SourceReader.dropped`. Any other source waits until the
runtime has taken its frame (up to ``depth`` frames ahead, so batches fill without a thread
hand-off per frame), and drops nothing.

All readers of one serve loop share one :class:`threading.Condition`, so the loop sleeps until
any source has a frame. What happens to a source (it opened, ended, failed, reported a gap)
is queued as a :class:`Notice` for the serving thread to turn into events.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.sources.base import RawFrame
from edge_runtime.sources.shaping import ShapedSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Notice:
    """Something that happened to a source, for the event log (``source_<kind>``)."""

    source: str
    kind: str
    details: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0


class SourceReader:
    """Reads one source on a daemon thread; see the module docstring."""

    def __init__(
        self,
        source: ShapedSource,
        wakeup: threading.Condition,
        notices: queue.Queue[Notice],
        *,
        depth: int = 32,
    ) -> None:
        self.source = source
        self.name = source.name
        self.live = source.live
        self._depth = 1 if self.live else max(1, int(depth))
        self._buf: deque[RawFrame] = deque()
        self._cv = wakeup
        self._notices = notices
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.decoded = 0  # frames that reached the buffer, dropped ones included
        self.dropped = 0
        self.ended = False  # the source ended or failed; nothing more will come
        self.error: str | None = None
        source.notify = self._notify

    def _notify(self, kind: str, details: dict[str, Any]) -> None:
        self._notices.put(Notice(self.name, kind, dict(details), time.time()))

    def start(self) -> SourceReader:
        self._thread = threading.Thread(target=self._run, name=f"source:{self.name}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for raw in self.source.frames():
                if not self._put(raw):
                    break
            if not self._stop.is_set():
                self._notify("ended", {"decoded": self.decoded})
        except Exception as exc:  # any failure of one source ends that source only
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("source %s failed: %s", self.name, self.error)
            self._notify("failed", {"error": self.error, "decoded": self.decoded})
        finally:
            with self._cv:
                self.ended = True
                self._cv.notify_all()

    def _put(self, raw: RawFrame) -> bool:
        with self._cv:
            if self.live:
                if self._buf:
                    self._buf.popleft()
                    self.dropped += 1
            else:
                while len(self._buf) >= self._depth and not self._stop.is_set():
                    self._cv.wait(0.1)
                if self._stop.is_set():
                    return False
            self._buf.append(raw)
            self.decoded += 1
            self._cv.notify_all()
        return True

    def take(self) -> RawFrame | None:
        """The oldest buffered frame, or None; the caller holds the shared condition."""
        if not self._buf:
            return None
        raw = self._buf.popleft()
        self._cv.notify_all()  # a waiting non-live reader may go on
        return raw

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def finished(self) -> bool:
        """Ended and every frame it produced was taken."""
        return self.ended and not self._buf

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.source.close()
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
