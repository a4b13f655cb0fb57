"""Run a stream file through the runtime under the test-then-train protocol and write outputs.

Shared by ``edge-runtime run`` and ``edge-runtime demo``. The protocol (docs/ARCHITECTURE.md):
each frame is predicted before its label may be seen; labels are revealed only for the base
training set and, after a drift flag, for the frames the runtime asks about (at most
``adapt.label_budget`` per flag). Outputs in ``out_dir``: ``frames.npz``, ``events.jsonl``
(written as events happen, so an interrupted run keeps them) and ``metrics.json``.

The rooms of this package, each named for what it does:

========================  ==================================================================
``runner.labels``         label sources: :class:`LabelSource` (the protocol),
                          :class:`StreamLabels` (the test-then-train replay of a stream file)
``runner.pacing``         :class:`Pacer`: frames arrive at a camera's rate (``--rate``)
``runner.loop``           :class:`ServeLoop`: batches -> ``process`` -> labels -> ``feedback``
                          -> observers; Ctrl-C between batches (:class:`Interrupt`)
``runner.metrics``        :class:`ServedCollector` (served arrays, serving gaps), event and
                          per-segment counts, adaptation delays in frames
``runner.outputs``        ``frames.npz`` and ``metrics.json``, written atomically
``runner.replay``         :func:`run_stream`, which wires the above
========================  ==================================================================
"""

from __future__ import annotations

from edge_runtime.runner.labels import FlagLabels, Labelled, LabelSource, StreamLabels
from edge_runtime.runner.loop import (
    BatchObserver,
    Interrupt,
    ServedBatch,
    ServeLoop,
    ServeOutcome,
)
from edge_runtime.runner.metrics import (
    ServedCollector,
    adaptation_delays,
    delay_metrics,
    peak_rss_mb,
)
from edge_runtime.runner.outputs import FrameOutputs, write_outputs
from edge_runtime.runner.pacing import Pacer
from edge_runtime.runner.replay import BaseSetup, RunResult, prepare, run_stream

__all__ = [
    "BaseSetup",
    "BatchObserver",
    "FlagLabels",
    "FrameOutputs",
    "Interrupt",
    "LabelSource",
    "Labelled",
    "Pacer",
    "RunResult",
    "ServeLoop",
    "ServeOutcome",
    "ServedBatch",
    "ServedCollector",
    "StreamLabels",
    "adaptation_delays",
    "delay_metrics",
    "peak_rss_mb",
    "prepare",
    "run_stream",
    "write_outputs",
]
