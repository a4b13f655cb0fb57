"""Camera-rate pacing: frame ``i`` arrives at ``t0 + i / rate``.

A replay without pacing serves frames as fast as the runtime can take them, so a background
adaptation job (which shares the cores) finishes many frames after its flag. On
``fashion-drift`` on 2 busy cores (``edge-runtime demo``: ~1,200 frames/s), trained heads
arrived 736-983 frames after their drift flags, 536-783 after the last requested label. A
camera delivers frames at its own rate: with ``edge-runtime run --stream fashion-drift.npz
--rate 30`` the same heads arrived 251-311 frames after the flag, 51-111 after the last label
(15, the next batch, with ``edge-runtime demo --rate 30 --max-frames 2600`` on quieter
cores). The ~200 frames between flag and last label are the label collection
(``adapt.label_budget`` served frames, at any rate). :class:`Pacer` makes a replay behave like
the camera: the serve loop waits until the last frame of a batch has arrived, and never sleeps
when it is behind.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from edge_runtime.errors import InputError


class Pacer:
    """Frame arrival times at a fixed rate, and a wait for a frame that can be interrupted."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        slice_s: float = 0.05,
    ) -> None:
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise InputError(f"rate must be a finite number of frames per second > 0, got {rate}")
        self.rate = float(rate)
        self.clock = clock
        self.sleep = sleep
        self.slice_s = float(slice_s)
        self.t0: float | None = None
        self.slept_s = 0.0
        # A resumed replay starts at a later frame: that frame arrives at start(), not
        # first / rate seconds after it.
        self.first = 0

    def start(self, t0: float | None = None) -> float:
        """Frame 0 arrives now (or at ``t0``, a time on ``clock``)."""
        now = self.clock() if t0 is None else float(t0)
        self.t0 = now - self.first / self.rate
        self.slept_s = 0.0
        return self.t0

    def arrival(self, frame: int) -> float:
        """When frame ``frame`` arrives (on ``clock``)."""
        if self.t0 is None:
            raise RuntimeError("Pacer.start() was not called")
        return self.t0 + int(frame) / self.rate

    def wait_for(self, frame: int, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Sleep until ``frame`` has arrived; at once if it already has (never catch up by
        sleeping less later: a late frame is simply served late). Sleeps in slices so that
        ``should_stop`` (a Ctrl-C flag) is honoured within ``slice_s``; returns False if it
        stopped the wait."""
        due = self.arrival(frame)
        while True:
            if should_stop():
                return False
            left = due - self.clock()
            if left <= 0:
                return True
            nap = min(left, self.slice_s)
            self.sleep(nap)
            self.slept_s += nap
