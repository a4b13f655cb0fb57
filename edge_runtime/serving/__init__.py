"""Live serving (``edge-runtime serve``): sources multiplexed into one runtime, an operator's
label inbox, Prometheus metrics and systemd's watchdog.

========================  ==================================================================
``serving.server``        :class:`LiveServe`: wires the parts below and the runner's loop
``serving.mux``           :class:`Multiplexer`: round-robin batches from the source readers
``serving.inbox``         :class:`OperatorLabels`: capture folders out, CSV labels in
``serving.capture``       request folders: PNGs and ``manifest.json``
``serving.ring``          :class:`CaptureRing`: drift and low-confidence frames, bounded, in
                          SQLite; :func:`list_capture` for a labelling batch
``serving.metrics``       :class:`ServeMetrics`: counts, latency, OOD rate, ``metrics.json``
``serving.prometheus``    ``/metrics``, ``/healthz``, ``/readyz``
``serving.sdnotify``      :class:`SdNotify`: READY, WATCHDOG, STATUS over ``$NOTIFY_SOCKET``
========================  ==================================================================
"""

from __future__ import annotations

from edge_runtime.serving.inbox import OperatorLabels, parse_label_csv
from edge_runtime.serving.metrics import ServeMetrics
from edge_runtime.serving.mux import FrameOrigin, Multiplexer
from edge_runtime.serving.ring import CapturedFrame, CaptureRing, RingConfig, list_capture
from edge_runtime.serving.sdnotify import SdNotify
from edge_runtime.serving.server import LiveServe, ServeOptions, ServeSummary

__all__ = [
    "CaptureRing",
    "CapturedFrame",
    "FrameOrigin",
    "LiveServe",
    "Multiplexer",
    "OperatorLabels",
    "RingConfig",
    "SdNotify",
    "ServeMetrics",
    "ServeOptions",
    "ServeSummary",
    "list_capture",
    "parse_label_csv",
]
