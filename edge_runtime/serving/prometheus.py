"""``/metrics`` (Prometheus text format), ``/healthz`` and ``/readyz`` on one small HTTP server.

Metrics live in a private :class:`prometheus_client.CollectorRegistry` (never the process-wide
default, so two servers in one process, as in the tests, do not collide), filled at scrape time
from :class:`~.metrics.ServeMetrics` and the telemetry sampler by a custom collector: nothing
on the serving thread touches Prometheus objects. ``/healthz`` answers 200 while the process
serves; ``/readyz`` 200 once the base domain is fitted and a source is open, else 503.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edge_runtime.serving.metrics import LATENCY_BUCKETS, ServeMetrics

if TYPE_CHECKING:
    from edge_runtime.telemetry.sampler import TelemetrySampler

log = logging.getLogger(__name__)
P = "edge_runtime_"


class ServeCollector:
    """Reads :class:`ServeMetrics` (and the latest telemetry sample) into metric families."""

    def __init__(
        self,
        metrics: ServeMetrics,
        sampler: TelemetrySampler | None = None,
        *,
        outbox: Callable[[], int | None] | None = None,
        ring: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.metrics = metrics
        self.sampler = sampler
        self.outbox = outbox  # the fleet outbox's queued messages (None: no fleet link)
        self.ring = ring  # the active-learning ring's summary
        self.process = psutil.Process()

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        with m.lock:
            per = {name: vars(c).copy() for name, c in m.sources.items()}
            buckets, total, count = list(m.bucket_counts), m.latency_sum, m.latency_count
            served = m.frames
            ood = m.ood
            recent = list(m.recent_ood)
            flags, adaptations, domains = m.drift_flags, m.adaptations, m.domains
        for key, doc in (
            ("served", "frames the runtime decided on"),
            ("rejected", "frames refused (NaN/Inf or undecodable)"),
        ):
            fam = CounterMetricFamily(f"{P}frames_{key}", doc, labels=["source"])
            for name, c in per.items():
                fam.add_metric([name], c[key])
            yield fam
        dropped = CounterMetricFamily(
            f"{P}frames_dropped", "frames not served", labels=["source", "reason"]
        )
        for name, c in per.items():
            dropped.add_metric([name, "behind"], c["dropped"])
            dropped.add_metric([name, "fps_cap"], c["capped"])
        yield dropped
        up = GaugeMetricFamily(f"{P}source_up", "1 while the source delivers", labels=["source"])
        for name, c in per.items():
            up.add_metric([name], 1.0 if c["state"] == "open" else 0.0)
        yield up
        cumulative, acc = [], 0
        for upper, n in zip(LATENCY_BUCKETS, buckets, strict=True):
            acc += n
            cumulative.append((repr(upper), acc))
        cumulative.append(("+Inf", count))
        yield HistogramMetricFamily(
            f"{P}decision_latency_seconds",
            "from a frame leaving its decoder to its decision",
            buckets=cumulative,
            sum_value=total,
        )
        yield GaugeMetricFamily(
            f"{P}ood_rate", "OOD fraction of served frames", value=ood / served if served else 0.0
        )
        yield GaugeMetricFamily(
            f"{P}ood_rate_recent",
            "OOD fraction of the last 1000 served frames",
            value=sum(recent) / len(recent) if recent else 0.0,
        )
        yield CounterMetricFamily(f"{P}drift_flags", "drift and novel-class flags", value=flags)
        yield CounterMetricFamily(
            f"{P}adaptations", "adaptations finished and returns", value=adaptations
        )
        yield GaugeMetricFamily(f"{P}domains", "domains the runtime knows", value=domains)
        yield GaugeMetricFamily(
            f"{P}process_rss_bytes", "resident memory", value=self.process.memory_info().rss
        )
        yield from self._telemetry()
        queued = self.outbox() if self.outbox is not None else None
        if queued is not None:
            yield GaugeMetricFamily(
                f"{P}outbox_messages", "alerts queued for the fleet broker", value=queued
            )
        yield from self._ring()

    def _ring(self) -> Iterator[Metric]:
        r = self.ring() if self.ring is not None else None
        if r is None:
            return
        kept = CounterMetricFamily(
            f"{P}capture_frames", "frames written to the capture ring", labels=["reason"]
        )
        limited = CounterMetricFamily(
            f"{P}capture_rate_limited",
            "capture-ring frames skipped by a rate cap",
            labels=["reason"],
        )
        for reason, n in r["captured"].items():
            kept.add_metric([reason], n)
            limited.add_metric([reason], r["rate_limited"][reason])
        yield kept
        yield limited
        yield GaugeMetricFamily(f"{P}capture_ring_files", "files in the ring", value=r["files"])
        yield GaugeMetricFamily(f"{P}capture_ring_bytes", "bytes in the ring", value=r["bytes"])

    def _telemetry(self) -> Iterator[Metric]:
        s = self.sampler.latest() if self.sampler is not None else None
        if s is None:
            return
        yield GaugeMetricFamily(f"{P}cpu_percent", "system CPU load", value=s.cpu_percent)
        yield GaugeMetricFamily(
            f"{P}process_cpu_percent", "this process's CPU load", value=s.process_cpu_percent
        )
        yield GaugeMetricFamily(
            f"{P}telemetry_rss_bytes",
            "resident memory at the last sample",
            value=s.process_rss_mb * 2**20,
        )
        if s.total_power_w is not None:
            yield GaugeMetricFamily(f"{P}board_power_watts", "board input", value=s.total_power_w)
        if s.gpu_percent is not None:
            yield GaugeMetricFamily(f"{P}gpu_percent", "GPU load (tegrastats)", value=s.gpu_percent)
        temps = GaugeMetricFamily(f"{P}temperature_celsius", "sensors", labels=["sensor"])
        for name, value in s.temperatures_c.items():
            temps.add_metric([name], value)
        yield temps
        power = GaugeMetricFamily(f"{P}power_watts", "power rails", labels=["rail"])
        for name, mw in s.power_mw.items():
            power.add_metric([name], mw / 1000.0)
        yield power


class MetricsServer:
    """The HTTP server on ``host:port`` (port 0: any free port, see :attr:`port`)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        *,
        host: str = "0.0.0.0",
        port: int = 0,
    ) -> None:
        self.registry = registry
        self.ready = ready
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._reply(200, b"ok\n")
                elif path == "/readyz":
                    ok = server.ready()
                    self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                else:
                    self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

            def _reply(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("http: " + fmt, *args)

        self.httpd = ThreadingHTTPServer((host, int(port)), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_metrics(
    metrics: ServeMetrics,
    ready: Callable[[], bool],
    *,
    port: int,
    host: str = "0.0.0.0",
    sampler: TelemetrySampler | None = None,
    outbox: Callable[[], int | None] | None = None,
    ring: Callable[[], dict[str, Any]] | None = None,
) -> MetricsServer:
    registry = CollectorRegistry(auto_describe=False)
    collector = ServeCollector(metrics, sampler, outbox=outbox, ring=ring)
    registry.register(collector)  # type: ignore[arg-type]
    return MetricsServer(registry, ready, host=host, port=port).start()
