"""What live serving counts: frames per source, decision latency, OOD rate, flags, adaptations.

:class:`ServeMetrics` is a serve-loop observer and the one store of these figures; the rolling
``metrics.json`` (:meth:`ServeMetrics.snapshot`) and the Prometheus exposition
(:mod:`.prometheus`) both read it, under its lock, so the two never disagree. Latency is from
a frame leaving its decoder to its decision (the batch's ``served_at``): waiting in the
reader's buffer and for a batch to fill is part of what a camera's frame experiences.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.runner.metrics import peak_rss_mb

if TYPE_CHECKING:
    from edge_runtime.runner.loop import ServedBatch
    from edge_runtime.serving.mux import FrameOrigin

#: Histogram bucket upper bounds for decision latency (seconds), as Prometheus wants them.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DRIFT_EVENTS = ("drift", "novel_class")
ADAPTATION_EVENTS = ("adaptation_finished", "domain_returned")


@dataclass
class SourceCounts:
    served: int = 0
    rejected: int = 0
    dropped: int = 0  # newest-wins replacements (runtime behind)
    capped: int = 0  # skipped by the frame-rate cap
    decoded: int = 0
    state: str = "starting"  # starting | open | ended | failed
    error: str | None = None


class ServeMetrics:
    def __init__(
        self,
        origin: Callable[[int], FrameOrigin | None],
        *,
        window: int = 10_000,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.origin = origin
        self.clock = clock
        self.started = time.time()
        self.sources: dict[str, SourceCounts] = {}
        self.latencies: deque[float] = deque(maxlen=window)
        self.bucket_counts = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.ood = 0
        self.recent_ood: deque[bool] = deque(maxlen=1000)
        self.drift_flags = 0
        self.adaptations = 0
        self.domains = 0
        self.frames = 0
        self.batches = 0
        self.lock = threading.Lock()

    def source(self, name: str) -> SourceCounts:
        return self.sources.setdefault(name, SourceCounts())

    def __call__(self, item: ServedBatch) -> None:
        dec = item.decisions
        with self.lock:
            self.batches += 1
            for j, i in enumerate(item.batch.indices.tolist()):
                o = self.origin(int(i))
                counts = self.source(o.source if o is not None else "?")
                if dec.rejected[j]:
                    counts.rejected += 1
                    continue
                counts.served += 1
                self.frames += 1
                ood = bool(dec.is_ood[j])
                self.ood += ood
                self.recent_ood.append(ood)
                if o is not None:
                    self._latency(item.served_at - o.decoded_at)
            self.count_events(item.events)

    def _latency(self, seconds: float) -> None:
        self.latencies.append(seconds)
        self.latency_sum += seconds
        self.latency_count += 1
        for b, upper in enumerate(LATENCY_BUCKETS):
            if seconds <= upper:
                self.bucket_counts[b] += 1
                break

    def count_events(self, events: Iterable[dict[str, Any]]) -> None:
        for e in events:
            if e.get("type") in DRIFT_EVENTS:
                self.drift_flags += 1
            elif e.get("type") in ADAPTATION_EVENTS:
                self.adaptations += 1

    def latency_ms(self, q: float) -> float | None:
        if not self.latencies:
            return None
        return round(float(np.quantile(np.fromiter(self.latencies, float), q)) * 1000.0, 3)

    def snapshot(self, **extra: Any) -> dict[str, Any]:
        """``metrics.json``: strict JSON, every figure so far."""
        with self.lock:
            served = sum(c.served for c in self.sources.values())
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "frames_served": served,
                "frames_rejected": sum(c.rejected for c in self.sources.values()),
                "frames_dropped": sum(c.dropped for c in self.sources.values()),
                "sources": {name: vars(c).copy() for name, c in self.sources.items()},
                "latency_ms": {
                    "p50": self.latency_ms(0.5),
                    "p99": self.latency_ms(0.99),
                    "window": len(self.latencies),
                },
                "ood_rate": round(self.ood / served, 4) if served else None,
                "ood_rate_recent": (
                    round(sum(self.recent_ood) / len(self.recent_ood), 4)
                    if self.recent_ood
                    else None
                ),
                "drift_flags": self.drift_flags,
                "adaptations": self.adaptations,
                "domains": self.domains,
                "batches": self.batches,
                "peak_rss_mb": round(peak_rss_mb(), 1),
                **extra,
            }
