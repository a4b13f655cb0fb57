"""Several sources into one runtime: round-robin batches of up to ``batch_size`` frames.

The serving thread takes at most one frame from each source in turn, so a fast source cannot
starve a slow one, until the batch is full or ``max_wait_s`` has passed since its first
frame; a lone camera is served at once rather than waiting for a full batch. Frames get
consecutive stream indices in the order served; :attr:`Multiplexer.info` says where each one
came from (the source, its own frame number, when it was decoded) until the caller takes it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from edge_runtime.data.stream import FrameBatch
from edge_runtime.sources.frames import stack_frames
from edge_runtime.sources.reader import SourceReader


@dataclass(frozen=True)
class FrameOrigin:
    source: str
    number: int  # the source's own frame number
    decoded_at: float  # time.perf_counter()
    tag: str | None = None


class Multiplexer:
    def __init__(
        self,
        readers: Sequence[SourceReader],
        wakeup: threading.Condition,
        *,
        batch_size: int,
        max_wait_s: float = 0.02,
        max_frames: int | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        tick: Callable[[], None] = lambda: None,
        start: int = 0,
    ) -> None:
        self.readers = list(readers)
        self._cv = wakeup
        self.batch_size = max(1, int(batch_size))
        self.max_wait_s = float(max_wait_s)
        self.max_frames = max_frames
        self.should_stop = should_stop
        self.tick = tick  # run on the serving thread at every wake-up (events, metrics, watchdog)
        self.next_index = int(start)
        self.served = 0
        self.info: dict[int, FrameOrigin] = {}
        self._turn = 0

    def _room(self) -> int:
        if self.max_frames is None:
            return self.batch_size
        return min(self.batch_size, self.max_frames - self.served)

    def _take_round(self, room: int, out: list) -> None:
        """One frame from each source with one ready, starting where the last round stopped."""
        n = len(self.readers)
        for k in range(n):
            if len(out) >= room:
                return
            reader = self.readers[(self._turn + k) % n]
            raw = reader.take()
            if raw is not None:
                out.append((reader, raw))
        self._turn = (self._turn + 1) % max(n, 1)

    def batches(self) -> Iterator[FrameBatch]:
        while True:
            self.tick()
            room = self._room()
            if room <= 0 or self.should_stop():
                return
            taken: list = []
            deadline: float | None = None
            with self._cv:
                while True:
                    before = len(taken)
                    self._take_round(room, taken)
                    if taken and deadline is None:
                        deadline = time.perf_counter() + self.max_wait_s
                    if len(taken) >= room:
                        break
                    if all(r.finished for r in self.readers):
                        break
                    if len(taken) > before:
                        continue
                    now = time.perf_counter()
                    if deadline is not None and now >= deadline:
                        break
                    # Nothing new: sleep until a reader has a frame; wake at least every 0.1 s
                    # so the tick (watchdog, label deadlines) and a stop signal are seen.
                    self._cv.wait(0.1 if deadline is None else min(0.1, deadline - now))
                    if deadline is None and not taken:
                        break
            if not taken:
                if all(r.finished for r in self.readers):
                    self.tick()
                    return
                continue
            start = self.next_index
            images = []
            for k, (reader, raw) in enumerate(taken):
                self.info[start + k] = FrameOrigin(reader.name, raw.number, raw.decoded_at, raw.tag)
                images.append(raw.data)
            self.next_index += len(taken)
            self.served += len(taken)
            yield FrameBatch(start, self.next_index, stack_frames(images))
