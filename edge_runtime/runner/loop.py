"""The serve loop: batches in, decisions out, label requests answered, observers told.

One served batch is: wait for its frames (when paced, see :mod:`.pacing`), ``rt.process``,
ask the label source about the frames the runtime requested, ``rt.feedback`` with the answer,
then hand a :class:`ServedBatch` to every observer (metrics collection, a progress bar, a
caller's ``on_batch``). The loop keeps no results of its own. Events reach the event log's
sinks as they are emitted; a :class:`ServedBatch` carries the batch's own events
(``Decisions.events`` plus what ``feedback`` emitted) for observers that group by batch.

Ctrl-C (:class:`Interrupt`) is checked between batches: the batch in progress always
finishes, and the loop reports that it was interrupted.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from edge_runtime.data.stream import FrameBatch
from edge_runtime.runner.labels import Labelled, LabelSource
from edge_runtime.runner.pacing import Pacer

if TYPE_CHECKING:
    from edge_runtime.runtime import Decisions, Runtime

Event = dict[str, Any]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedBatch:
    """One batch as served; what observers see."""

    batch: FrameBatch
    decisions: Decisions
    answered: Labelled  # labels the source revealed after this batch (any frames asked so far)
    events: list[Event]  # the batch's events, in emission order
    ready_at: float  # loop clock: its frames had arrived and the previous batch was served
    served_at: float  # loop clock: its decisions were made

    @property
    def latency_s(self) -> float:
        """How long the runtime took once the batch could be served."""
        return self.served_at - self.ready_at


BatchObserver = Callable[[ServedBatch], None]


@dataclass
class ServeOutcome:
    served: int  # frames served (a prefix of the stream)
    interrupted: bool
    serving_seconds: float
    slept_seconds: float = 0.0  # waiting for frames to arrive (paced runs)
    final_events: list[Event] = field(default_factory=list)  # emitted by finish / wait_idle
    build_wait_seconds: float = 0.0  # an unpaced replay waiting for domain builds


class Interrupt:
    """SIGINT -> a flag the loop checks between batches (the current batch always finishes).

    A second Ctrl-C raises KeyboardInterrupt at once. Installs its handler only on the main
    thread (elsewhere Python cannot catch signals); restores the previous handler on exit.
    """

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.hit:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.hit = True

    def __call__(self) -> bool:
        return self.hit

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


class ServeLoop:
    """Serve batches through a runtime under a label source; see the module docstring."""

    def __init__(
        self,
        runtime: Runtime,
        labels: LabelSource,
        *,
        pacer: Pacer | None = None,
        observers: Sequence[BatchObserver] = (),
        should_stop: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.perf_counter,
        wait_builds: bool = False,
    ) -> None:
        """``wait_builds``: after a batch that started a domain build (the search, seconds on
        the worker), wait for it before the next batch. For an unpaced replay only: its frames
        do not arrive in real time, so without the wait a build would last as many frames as
        the machine serves in those seconds, and the outputs would depend on its speed. A paced
        run or a live source never waits."""
        self.wait_builds = wait_builds
        self.rt = runtime
        self.labels = labels
        self.pacer = pacer
        self.observers = list(observers)
        self.should_stop = should_stop
        self.clock = pacer.clock if pacer is not None else clock

    def run(self, batches: Iterable[FrameBatch]) -> ServeOutcome:
        rt = self.rt
        t0 = self.pacer.start() if self.pacer is not None else self.clock()
        last = t0
        served = 0
        interrupted = False
        build_wait = 0.0
        for batch in batches:
            if self.should_stop():
                interrupted = True
                break
            ready = last
            if self.pacer is not None:
                if not self.pacer.wait_for(batch.stop - 1, self.should_stop):
                    interrupted = True
                    break
                ready = max(last, self.pacer.arrival(batch.stop - 1))
            dec = rt.process(batch.images, batch.indices)
            served_at = self.clock()
            if not served:
                # The first decisions of this process: a restart is serving again (the kill
                # tests time a restart by this line).
                log.info("first batch served: frames %d..%d", batch.start, batch.stop)
            # Test-then-train: the batch was predicted above; now reveal what was asked for.
            answered = self.labels.answer(batch.indices[dec.label_request])
            if len(answered.indices):
                rt.feedback(answered.indices, answered.labels)
            events = [*dec.events, *rt.drain_events()]
            served = batch.stop
            item = ServedBatch(batch, dec, answered, events, ready, served_at)
            for observe in self.observers:
                observe(item)
            last = served_at
            if self.wait_builds and rt.building:
                t_wait = self.clock()
                rt.wait_builds()
                # Not a serving gap: the replay holds its frames back meanwhile.
                last = self.clock()
                build_wait += last - t_wait
        serving_s = self.clock() - t0
        if interrupted:
            rt.wait_idle()  # nothing more is installed: the outputs describe what was served
        else:
            # A source that held answers back (memory pressure) hands them over now, so the
            # end of the stream adapts on every label it revealed.
            flush = getattr(self.labels, "flush", None)
            late = flush() if callable(flush) else None
            if late is not None and len(late.indices):
                rt.feedback(late.indices, late.labels)
            rt.finish(wait=True)  # adapt on a collection in progress, install what finished
        slept = self.pacer.slept_s if self.pacer is not None else 0.0
        if build_wait:
            log.info("the unpaced replay waited %.1f s for domain builds", build_wait)
        return ServeOutcome(
            served, interrupted, serving_s, slept, rt.drain_events(), build_wait_seconds=build_wait
        )
