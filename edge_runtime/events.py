"""The event log: every part reports what happened here, and sinks carry it off the device.

An event is a plain JSON-able dict with at least ``type``, ``frame`` (the stream index it
happened at) and ``time``. Parts emit through :class:`EventLog`; the log keeps the events of the
current batch for :class:`~edge_runtime.runtime.Decisions` and hands each one to every sink as
it is emitted. A sink is anything with ``write(event)`` and ``close()`` (:class:`EventSink`):
the ``events.jsonl`` file sink lives here, and the fleet's MQTT client is another sink, so the
runtime never imports an MQTT library. A sink that raises is logged; the event stays in the
batch and in every other sink, and serving goes on.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

Event = dict[str, Any]


@runtime_checkable
class EventSink(Protocol):
    """Where events go; ``write`` is called on the serving thread, once per event, in order."""

    def write(self, event: Event) -> None: ...

    def close(self) -> None: ...


def jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays (and paths) inside event details -> plain Python values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def strict_json(obj: Any) -> Any:
    """NaN/Inf -> None, so files stay strict JSON (``json.loads`` in any language)."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class JsonlSink:
    """One JSON object per line, flushed per event, so an interrupted run keeps what it said.

    ``mode="a"`` appends (a resumed run continues the same file).
    """

    def __init__(self, path: str | Path, mode: str = "w") -> None:
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' or 'a', got {mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] | None = open(self.path, mode, encoding="utf-8")  # noqa: SIM115

    def write(self, event: Event) -> None:
        if self._fh is None:
            raise ValueError(f"event sink {self.path} is closed")
        self._fh.write(json.dumps(strict_json(jsonable(event))) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class ListSink:
    """Keeps every event in memory (tests, the runner's scoring)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


class EventLog:
    """Emits events to the current batch and to every attached sink.

    Thread contract: ``emit`` may be called from any thread (the lock orders events); sinks are
    written under that lock, in emission order.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._batch: list[Event] = []
        self._sinks: list[EventSink] = []
        self._lock = threading.Lock()
        self._cause = threading.local()

    @contextmanager
    def caused_by(self, cause: str) -> Iterator[None]:
        """Events emitted in this block (on this thread) carry ``"cause": cause``: a command's
        consequences are not replayed by a resumed run the way the stream's are, and the
        resume guard must not count them as replayable."""
        before = getattr(self._cause, "value", None)
        self._cause.value = cause
        try:
            yield
        finally:
            self._cause.value = before

    def add_sink(self, sink: EventSink, *, first: bool = False) -> EventSink:
        """Attach ``sink``; ``first`` puts it before the others, so it has every event the
        others have even when the process dies between two sinks' writes (the fleet's durable
        outbox goes first, so an event in ``events.jsonl`` is always in the outbox too)."""
        with self._lock:
            if first:
                self._sinks.insert(0, sink)
            else:
                self._sinks.append(sink)
        return sink

    def remove_sink(self, sink: EventSink) -> None:
        with self._lock:
            self._sinks = [s for s in self._sinks if s is not sink]

    def emit(self, etype: str, frame: int, **details: Any) -> Event:
        event: Event = {"type": etype, "frame": int(frame), "time": self.clock()}
        event.update(jsonable(details))
        cause = getattr(self._cause, "value", None)
        if cause is not None:
            event["cause"] = cause
        with self._lock:
            self._batch.append(event)
            for sink in self._sinks:
                try:
                    sink.write(event)
                except Exception:  # a broken sink must not stop serving or the other sinks
                    log.exception("event sink %r failed on a %s event", sink, etype)
        return event

    def drain(self) -> list[Event]:
        """The events emitted since the last drain (the current batch's), oldest first."""
        with self._lock:
            out, self._batch = self._batch, []
        return out

    def close(self) -> None:
        with self._lock:
            sinks, self._sinks = self._sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception:
                log.exception("event sink %r failed to close", sink)
