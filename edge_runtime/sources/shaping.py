"""What every source gets the same way: conversion to the runtime's frame format, a frame-rate
cap, and (for files) delivery at a camera's rate.

:func:`open_source` is the entry point: URI -> the kind's source (:mod:`.registry`) wrapped in
a :class:`ShapedSource`, opened. The wrapper is itself a :class:`FrameSource` whose frames are
converted numpy frames (:class:`~.frames.FrameFormat`), stamped with when they were decoded.

* ``fps_cap``: frames closer than ``1/fps_cap`` s (by the source's timestamps, else the wall
  clock) to the last one kept are skipped and counted in :attr:`ShapedSource.capped`.
* ``rate`` (files, stream files, folders): frame ``n`` is delivered ``n / rate`` s after the
  first, as a camera would deliver it; the source then counts as ``live`` and, when the runtime
  falls behind, its stale frames are dropped like a camera's. Without it a file is read as fast
  as the runtime takes its frames and nothing is dropped.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Iterator

from edge_runtime.sources.base import FrameSource, Notify, RawFrame, SourceError
from edge_runtime.sources.frames import FrameFormat
from edge_runtime.sources.registry import make_source


class ShapedSource:
    """A source's frames converted, capped and (``rate``) paced; see the module docstring."""

    def __init__(
        self,
        inner: FrameSource,
        frame_format: FrameFormat,
        *,
        fps_cap: float | None = None,
        rate: float | None = None,
    ) -> None:
        for what, value in (("fps_cap", fps_cap), ("rate", rate)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise SourceError(f"{inner.name}: {what} must be a number > 0, got {value}")
        if rate is not None and inner.live:
            raise SourceError(f"{inner.name}: a live source arrives at its own rate; no rate=")
        self.inner = inner
        self.name = inner.name
        self.format = frame_format
        self.fps_cap = fps_cap
        self.rate = rate
        self.capped = 0
        self.convert_errors = 0
        self._stop = threading.Event()

    @property
    def live(self) -> bool:
        return self.inner.live or self.rate is not None

    @property
    def notify(self) -> Notify:
        return self.inner.notify

    @notify.setter
    def notify(self, value: Notify) -> None:
        self.inner.notify = value

    def open(self) -> None:
        self.inner.open()

    def frames(self) -> Iterator[RawFrame]:
        min_gap = 1.0 / self.fps_cap if self.fps_cap else 0.0
        last_kept: float | None = None
        t0 = time.perf_counter()
        for k, raw in enumerate(self.inner.frames()):
            if self._stop.is_set():
                return
            if self.rate is not None:
                # Sleep until this frame's arrival; a late frame is not made up for later.
                due = t0 + k / self.rate
                if self._stop.wait(max(0.0, due - time.perf_counter())):
                    return
            stamp = raw.pts_s if raw.pts_s is not None else time.perf_counter()
            # The 1e-6 slack keeps a 30 fps stream under a 30 fps cap from losing frames to
            # rounding in its timestamps.
            if min_gap and last_kept is not None and stamp - last_kept < min_gap - 1e-6:
                self.capped += 1
                continue
            last_kept = stamp
            decoded_at = time.perf_counter()
            try:
                image = self.format.convert(raw.data)
            except SourceError as exc:
                self.convert_errors += 1
                self.inner.notify("source_frame_error", {"number": raw.number, "error": str(exc)})
                continue
            yield dataclasses.replace(raw, data=image, decoded_at=decoded_at)

    def close(self) -> None:
        self._stop.set()
        self.inner.close()


def open_source(
    uri: str,
    *,
    frame_format: FrameFormat,
    fps_cap: float | None = None,
    rate: float | None = None,
    open_now: bool = True,
) -> ShapedSource:
    """The source for ``uri``, shaped (and opened unless ``open_now`` is False)."""
    source = ShapedSource(make_source(uri), frame_format, fps_cap=fps_cap, rate=rate)
    if open_now:
        source.open()
    return source
