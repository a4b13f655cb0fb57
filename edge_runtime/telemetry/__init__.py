"""Device telemetry: psutil everywhere; tegrastats and sysfs power/thermal on Jetson.

``TelemetrySampler(interval_s).start()`` samples on a background thread (``latest()``,
``history()``, callbacks); ``parse_tegrastats_line`` reads JetPack 4/5/6 tegrastats lines.
"""

from __future__ import annotations

from edge_runtime.telemetry.platform import is_jetson
from edge_runtime.telemetry.sample import TelemetrySample
from edge_runtime.telemetry.sampler import PsutilReader, TelemetrySampler, psutil_temperatures
from edge_runtime.telemetry.sysfs import SysfsSensors, read_power_rails, read_thermal_zones
from edge_runtime.telemetry.tegrastats import (
    TegraStats,
    TegrastatsProcess,
    parse_tegrastats_line,
    tegrastats_available,
)

__all__ = [
    "PsutilReader",
    "SysfsSensors",
    "TegraStats",
    "TegrastatsProcess",
    "TelemetrySample",
    "TelemetrySampler",
    "is_jetson",
    "parse_tegrastats_line",
    "psutil_temperatures",
    "read_power_rails",
    "read_thermal_zones",
    "tegrastats_available",
]
