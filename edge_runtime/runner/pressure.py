"""Memory pressure: shed optional work before the kernel's OOM killer sheds the process.

:class:`MemoryGovernor` reads the process's resident set size after every served batch and
compares it with ``device.memory_budget_mb``:

* below ``soft`` (85 % of the budget): normal;
* at ``soft`` or above (*shed*): the batch size is halved (down to ``min_batch``; a smaller batch
  holds fewer frames and activations at once), Python's garbage is collected once on entry, and
  label answers are held back, so that an adaptation (the largest allocation a device makes:
  a training set, a head, a new HDC memory) is *postponed* until the pressure eases or
  ``max_postpone_frames`` frames have passed;
* a new adaptor is refused with an ``adaptation_refused`` alert by the planner itself whenever
  resident memory plus the new domain's size would pass the budget
  (:meth:`~edge_runtime.adapt.planner.AdaptationPlanner.memory_refusal`): the last resort,
  which the governor's shedding tries to make unnecessary.

Every ``trim_every`` frames (and on entering *shed*) freed C heap is handed back to the
system (glibc ``malloc_trim``): serving allocates and frees arrays of many sizes on several
threads (encoder, HDC scoring, the fleet client), and without it the heap's free but unreturned
pages grow the RSS in steps over a long run although nothing live grows (a 200,000-frame soak
showed Python's traced memory flat while RSS rose by tens of MB).

Each change of level is a ``memory_pressure`` event (an alert, with the fleet on) naming the
resident and budget MB and what is shed. The serve loop never stops for memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.adapt.planner import resident_mb
from edge_runtime.data.stream import FrameBatch
from edge_runtime.runner.labels import Labelled, LabelSource

if TYPE_CHECKING:
    from edge_runtime.runner.loop import ServedBatch
    from edge_runtime.runtime import Runtime

log = logging.getLogger(__name__)

NORMAL, SHED = "normal", "shed"


def _load_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn  # type: ignore[no-any-return]


_TRIM = _load_trim()


def trim_heap() -> bool:
    """Return freed C heap to the system where the C library can (glibc); True if it ran."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


@dataclass
class MemoryGovernor:
    """Serve-loop observer and label-source wrapper; see the module docstring."""

    runtime: Runtime
    budget_mb: float
    batch_size: int
    soft: float = 0.85
    min_batch: int = 4
    max_postpone_frames: int = 512
    probe: Callable[[], float] = resident_mb
    trim_every: int = 8192
    level: str = NORMAL
    current_batch: int = 0
    peak_mb: float = 0.0
    transitions: int = 0
    postponed: int = 0  # label answers held back, in all
    _held: list[Labelled] = field(default_factory=list)
    _held_since: int | None = None
    _trimmed_at: int = 0
    trims: int = 0

    def __post_init__(self) -> None:
        self.current_batch = int(self.batch_size)

    # ------------------------------------------------------------------ observer
    def __call__(self, item: ServedBatch) -> None:
        self.check(item.batch.stop)

    def check(self, frame: int) -> str:
        if self.trim_every and frame - self._trimmed_at >= self.trim_every:
            self._trimmed_at = frame
            self.trims += int(trim_heap())
        rss = float(self.probe())
        self.peak_mb = max(self.peak_mb, rss)
        level = SHED if rss >= self.soft * self.budget_mb else NORMAL
        if level != self.level:
            self.level = level
            self.transitions += 1
            if level == SHED:
                gc.collect()  # cheap next to being killed; drops cycles the batch left behind
                self.trims += int(trim_heap())
                self.current_batch = max(self.min_batch, self.batch_size // 2)
                shed = ["batch_size", "adaptation_postponed"]
            else:
                self.current_batch = int(self.batch_size)
                shed = []
            log.warning(
                "frame %d: memory %s: resident %.0f MB of a %.0f MB budget; batch %d",
                frame,
                level,
                rss,
                self.budget_mb,
                self.current_batch,
            )
            self.runtime.events.emit(
                "memory_pressure",
                frame,
                level=level,
                resident_mb=round(rss, 1),
                budget_mb=float(self.budget_mb),
                batch_size=self.current_batch,
                shed=shed,
            )
        return level

    # ------------------------------------------------------------------ batches
    def batches(self, images: np.ndarray, start: int) -> Iterator[FrameBatch]:
        """Consecutive batches from ``start``, each as large as the governor allows now."""
        lo = int(start)
        while lo < len(images):
            hi = min(lo + self.current_batch, len(images))
            yield FrameBatch(start=lo, stop=hi, images=images[lo:hi])
            lo = hi

    # ------------------------------------------------------------------ labels
    def wrap(self, source: LabelSource) -> LabelSource:
        """``source``, with its answers held back while memory is short (see the docstring)."""
        return _Postponing(self, source)

    def release(self, frame: int) -> Labelled:
        """The answers held back, if they may go now (or ``force``d by the end of the
        stream)."""
        if not self._held:
            return Labelled.empty()
        waited = frame - (self._held_since or frame)
        if self.level == SHED and waited < self.max_postpone_frames:
            return Labelled.empty()
        held, self._held, self._held_since = self._held, [], None
        return Labelled(
            np.concatenate([h.indices for h in held]), np.concatenate([h.labels for h in held])
        )

    def hold(self, answer: Labelled, frame: int) -> None:
        self._held.append(answer)
        self.postponed += len(answer.indices)
        if self._held_since is None:
            self._held_since = frame

    def flush(self) -> Labelled:
        """Every answer still held (the end of the stream: the runtime adapts on them now)."""
        self.level, level = NORMAL, self.level
        try:
            return self.release(0)
        finally:
            self.level = level

    def summary(self) -> dict[str, float | int | str]:
        return {
            "budget_mb": float(self.budget_mb),
            "peak_resident_mb": round(self.peak_mb, 1),
            "level": self.level,
            "transitions": self.transitions,
            "labels_postponed": self.postponed,
            "batch_size_now": self.current_batch,
            "heap_trims": self.trims,
        }


class _Postponing:
    """A label source whose answers a :class:`MemoryGovernor` may hold back."""

    def __init__(self, governor: MemoryGovernor, source: LabelSource) -> None:
        self.governor = governor
        self.source = source

    def answer(self, indices: np.ndarray) -> Labelled:
        g = self.governor
        frame = int(g.runtime.frames_seen)
        got = self.source.answer(indices)
        if g.level == "shed" and len(got.indices):
            g.hold(got, frame)
            got = Labelled.empty()
        late = g.release(frame)
        if len(late.indices):
            return Labelled(
                np.concatenate([late.indices, got.indices]),
                np.concatenate([late.labels, got.labels]),
            )
        return got

    def flush(self) -> Labelled:
        return self.governor.flush()
