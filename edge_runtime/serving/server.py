"""``LiveServe``: sources -> multiplexer -> the runner's serve loop -> events, metrics, labels.

It wires parts that each do one job: readers and the multiplexer (:mod:`.mux`), the runner's
:class:`~edge_runtime.runner.loop.ServeLoop` (process, label answers, feedback, observers),
:class:`~.inbox.OperatorLabels` (capture folders and the CSV inbox), :class:`~.metrics.
ServeMetrics` with the rolling ``DIR/metrics.json`` and Prometheus (:mod:`.prometheus`),
``DIR/events.jsonl`` (:class:`~edge_runtime.events.JsonlSink`), the active-learning ring
(:mod:`.ring`), systemd's watchdog (:mod:`.sdnotify`) and, where the config turns them on, the
fleet link (:func:`~edge_runtime.fleet.attach.attach`: alerts to MQTT, and with
``labels_from="fleet"`` the fleet's label loop as the label source) and a telemetry sampler
whose readings feed ``/metrics``. A source that cannot be opened, fails or ends is an event
(``source_failed``, ``source_ended``, ...) and the others go on; serving stops when every
source has ended, at ``max_frames``, or on SIGINT/SIGTERM (the batch in progress finishes).
"""

from __future__ import annotations

import logging
import queue
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edge_runtime.errors import InputError
from edge_runtime.events import JsonlSink, jsonable, strict_json
from edge_runtime.runner.labels import LabelSource
from edge_runtime.runner.loop import ServeLoop
from edge_runtime.runner.outputs import write_metrics
from edge_runtime.runtime import Runtime
from edge_runtime.serving.inbox import OperatorLabels
from edge_runtime.serving.metrics import ServeMetrics
from edge_runtime.serving.mux import FrameOrigin, Multiplexer
from edge_runtime.serving.prometheus import MetricsServer, serve_metrics
from edge_runtime.serving.ring import CaptureRing, RingConfig
from edge_runtime.serving.sdnotify import SdNotify
from edge_runtime.sources.base import SourceError
from edge_runtime.sources.frames import FrameFormat
from edge_runtime.sources.reader import Notice, SourceReader
from edge_runtime.sources.shaping import ShapedSource, open_source

if TYPE_CHECKING:
    from edge_runtime.fleet.attach import FleetLink
    from edge_runtime.serving.capture import CaptureRequest
    from edge_runtime.telemetry.sampler import TelemetrySampler

log = logging.getLogger(__name__)
LABELS_FROM = ("inbox", "fleet")


@dataclass
class ServeOptions:
    sources: list[str]
    out_dir: Path
    frame_format: FrameFormat
    metrics_port: int | None = None  # None: no HTTP server; 0: any free port
    metrics_host: str = "0.0.0.0"
    max_frames: int | None = None
    inbox_dir: Path | None = None  # default DIR/inbox
    capture_dir: Path | None = None  # default DIR/capture
    label_deadline_s: float | None = 600.0
    fps_cap: float | None = None
    rate: float | None = None
    max_wait_s: float = 0.02
    metrics_interval_s: float = 1.0
    ring: RingConfig | None = field(default_factory=RingConfig)  # None: no active-learning ring
    ring_dir: Path | None = None  # default DIR/capture/ring
    labels_from: str = "inbox"  # "inbox" (CSV files) or "fleet" (needs fleet.enabled)
    extra_sources: list[ShapedSource] = field(default_factory=list)  # already built (tests, API)


@dataclass
class ServeSummary:
    metrics: dict[str, Any]
    stopped: str  # "sources_ended" | "max_frames" | "signal"


class StopSignals:
    """SIGINT and SIGTERM -> a flag the loop checks (main thread only; restored on exit)."""

    def __init__(self) -> None:
        self.hit: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.hit is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.hit = signal.Signals(signum).name

    def __call__(self) -> bool:
        return self.hit is not None

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


class LiveServe:
    """Serve live sources through ``runtime`` (its base domain fitted); see the module doc."""

    def __init__(
        self,
        runtime: Runtime,
        options: ServeOptions,
        *,
        labels: LabelSource | None = None,
        observers: list[Any] | None = None,
    ) -> None:
        if not runtime.domains:
            raise InputError("the runtime has no base domain: fit it or load a checkpoint first")
        if options.labels_from not in LABELS_FROM:
            raise InputError(
                f"labels_from must be one of {LABELS_FROM}, got {options.labels_from!r}"
            )
        if options.labels_from == "fleet" and not runtime.config.fleet.enabled:
            raise InputError("labels from the fleet need fleet.enabled=true (and a broker)")
        self.rt = runtime
        self.opt = options
        self.out = Path(options.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cv = threading.Condition()
        self.notices: queue.Queue[Notice] = queue.Queue()
        self.readers: list[SourceReader] = []
        self.mux: Multiplexer | None = None
        self.metrics = ServeMetrics(self._origin)
        self.http: MetricsServer | None = None
        self.notify = SdNotify()
        self.stop = StopSignals()
        self._last_write = 0.0
        self.jsonl = JsonlSink(self.out / "events.jsonl")
        self.rt.events.add_sink(self.jsonl)
        self.operator = OperatorLabels(
            options.capture_dir or self.out / "capture",
            options.inbox_dir or self.out / "inbox",
            emit=self.rt.events.emit,
            position=lambda: self.rt.frames_seen,
            origin=self._origin,
            deadline_s=options.label_deadline_s,
            expire=self._expire_request,
        )
        self.rt.events.add_sink(self.operator)
        self.labels: LabelSource = labels if labels is not None else self.operator
        self.observers = list(observers or [])  # more serve-loop observers (a caller's own)
        self.ring = (
            None
            if options.ring is None
            else CaptureRing(
                options.ring_dir or self.out / "capture" / "ring", options.ring, origin=self._origin
            )
        )
        self.fleet: FleetLink | None = None
        self.sampler: TelemetrySampler | None = None

    # ------------------------------------------------------------------ helpers
    def _origin(self, index: int) -> FrameOrigin | None:
        return None if self.mux is None else self.mux.info.get(int(index))

    @property
    def ready(self) -> bool:
        return bool(self.rt.domains) and bool(self._open_readers())

    def _open_readers(self) -> list[SourceReader]:
        return [r for r in self.readers if self.metrics.source(r.name).state == "open"]

    def _emit(self, etype: str, **details: Any) -> None:
        self.rt.events.emit(etype, self.rt.frames_seen, **details)

    def _expire_request(self, req: CaptureRequest) -> None:
        # On the serving thread (the inbox runs there), so the runtime is called directly.
        self.rt.expire_labels("label deadline passed", trigger_frame=req.flag_frame)

    def _outbox_size(self) -> int | None:
        if self.fleet is None:
            return None
        try:
            return len(self.fleet.client.outbox)
        except sqlite3.Error:  # closed at shutdown while a scrape was in flight
            return None

    # ------------------------------------------------------------------ start
    def open_sources(self) -> None:
        """Open every source; one that fails is an event, and at least one must open."""
        opt = self.opt
        shaped: list[ShapedSource] = []
        for uri in opt.sources:
            self.metrics.source(uri)
            try:
                shaped.append(
                    open_source(
                        uri, frame_format=opt.frame_format, fps_cap=opt.fps_cap, rate=opt.rate
                    )
                )
            except SourceError as exc:
                self._fail(uri, str(exc))
        for src in opt.extra_sources:
            self.metrics.source(src.name)
            try:
                src.open()
                shaped.append(src)
            except SourceError as exc:
                self._fail(src.name, str(exc))
        if not shaped:
            raise SourceError("no source could be opened; see the source_failed events")
        for src in shaped:
            reader = SourceReader(src, self.cv, self.notices, depth=self.rt.encoder.batch_size)
            self.readers.append(reader)
            self.metrics.source(src.name).state = "open"
            self._emit("source_opened", source=src.name, live=src.live)
            reader.start()

    def _fail(self, name: str, error: str) -> None:
        counts = self.metrics.source(name)
        counts.state, counts.error = "failed", error
        log.warning("source %s: %s", name, error)
        self._emit("source_failed", source=name, error=error)

    # ------------------------------------------------------------------ serving-thread tick
    def tick(self) -> None:
        """Between batches and while idle: source notices -> events, label deadlines, the
        rolling metrics.json, the systemd watchdog."""
        while True:
            try:
                n = self.notices.get_nowait()
            except queue.Empty:
                break
            counts = self.metrics.source(n.source)
            if n.kind in ("ended", "failed"):
                counts.state = n.kind
                counts.error = n.details.get("error")
            # The reader says "ended"/"failed"; a source names its own ("source_gap", ...).
            etype = n.kind if n.kind.startswith("source_") else f"source_{n.kind}"
            self._emit(etype, source=n.source, **n.details)
        self.operator.tick()
        for r in self.readers:
            c = self.metrics.source(r.name)
            c.dropped, c.decoded = r.dropped, r.decoded
            c.capped = r.source.capped
        now = time.monotonic()
        if now - self._last_write >= self.opt.metrics_interval_s:
            self._last_write = now
            self.write_metrics()
        self.notify.watchdog()

    def write_metrics(self, **extra: Any) -> dict[str, Any]:
        self.metrics.domains = len(self.rt.domains)
        latest = None if self.sampler is None else self.sampler.latest()
        snap = self.metrics.snapshot(
            metrics_port=None if self.http is None else self.http.port,
            ready=self.ready,
            frames_seen=self.rt.frames_seen,
            active_domain=self.rt.active_domain,
            labels=self.operator.summary(),
            capture_ring=None if self.ring is None else self.ring.summary(),
            outbox_messages=self._outbox_size(),
            telemetry=None if latest is None else latest.to_dict(),
            **extra,
        )
        snap = strict_json(jsonable(snap))
        write_metrics(self.out / "metrics.json", snap)
        return snap

    # ------------------------------------------------------------------ run
    def start(self) -> LiveServe:
        cfg = self.rt.config
        if cfg.telemetry.enabled:
            from edge_runtime.telemetry.sampler import TelemetrySampler

            self.sampler = TelemetrySampler.from_config(cfg.telemetry).start()
        if cfg.fleet.enabled:
            from edge_runtime.fleet.attach import attach

            # After the base fit, so the device's birth certificate lists its base domain.
            self.fleet = attach(self.rt, cfg.fleet, labels=self.opt.labels_from == "fleet")
            self.observers.extend(self.fleet.observers)
            if self.fleet.labels is not None:
                self.labels = self.fleet.labels
        self.open_sources()
        if self.opt.metrics_port is not None:
            self.http = serve_metrics(
                self.metrics,
                lambda: self.ready,
                port=self.opt.metrics_port,
                host=self.opt.metrics_host,
                sampler=self.sampler,
                outbox=self._outbox_size,
                ring=None if self.ring is None else self.ring.summary,
            )
            log.info("metrics on http://%s:%d/metrics", self.opt.metrics_host, self.http.port)
        self.write_metrics()
        self.notify.ready(f"serving {len(self.readers)} source(s)")
        return self

    def run(self) -> ServeSummary:
        if not self.readers:
            self.start()
        with self.stop:
            self.mux = Multiplexer(
                self.readers,
                self.cv,
                batch_size=self.rt.encoder.batch_size,
                max_wait_s=self.opt.max_wait_s,
                max_frames=self.opt.max_frames,
                should_stop=self.stop,
                tick=self.tick,
                start=self.rt.frames_seen,
            )
            ring = [] if self.ring is None else [self.ring]
            observers = [self.metrics, self.operator, *ring, *self.observers, self._forget]
            loop = ServeLoop(self.rt, self.labels, observers=observers, should_stop=self.stop)
            outcome = loop.run(self.mux.batches())
        self.metrics.count_events(outcome.final_events)
        if self.stop.hit is not None:
            stopped = "signal"
        elif self.opt.max_frames is not None and self.mux.served >= self.opt.max_frames:
            stopped = "max_frames"
        else:
            stopped = "sources_ended"
        self.tick()
        self.notify.status(f"stopped: {stopped}")
        snap = self.write_metrics(stopped=stopped, signal=self.stop.hit)
        return ServeSummary(snap, stopped)

    def _forget(self, item: Any) -> None:
        # Origins are needed by the observers before this one; drop them so memory stays flat.
        assert self.mux is not None
        for i in item.batch.indices.tolist():
            self.mux.info.pop(int(i), None)

    def close(self) -> None:
        self.notify.stopping()
        for r in self.readers:
            r.stop()
        if self.http is not None:
            self.http.close()
            self.http = None
        if self.fleet is not None:
            self.fleet.close()  # flushes what it can to the broker; the rest stays queued
            self.fleet = None
        if self.sampler is not None:
            self.sampler.stop()
            self.sampler = None
        if self.ring is not None:
            self.ring.close()
        self.rt.events.remove_sink(self.operator)
        self.rt.events.remove_sink(self.jsonl)
        self.jsonl.close()
        self.notify.close()

    def __enter__(self) -> LiveServe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
