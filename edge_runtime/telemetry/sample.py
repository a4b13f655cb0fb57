"""One telemetry reading: what the device is doing right now."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edge_runtime.telemetry.tegrastats import board_power_mw


@dataclass
class TelemetrySample:
    """A snapshot of load, memory, temperatures and power.

    Fields a platform cannot provide are ``None`` (or empty dicts), never made up:
    GPU load and power rails exist only on Jetson; temperatures only where the kernel
    exposes thermal zones or hwmon sensors.
    """

    time: float  # Unix time (seconds) the sample was taken
    cpu_percent: float  # whole system, since the previous sample
    process_cpu_percent: float  # this process, may exceed 100 on several cores
    process_rss_mb: float
    mem_used_mb: float
    mem_total_mb: float
    mem_percent: float
    swap_used_mb: float
    cpu_per_core: list[float] = field(default_factory=list)
    temperatures_c: dict[str, float] = field(default_factory=dict)
    # Rail name -> instantaneous power in mW (tegrastats or INA3221 sysfs).
    power_mw: dict[str, float] = field(default_factory=dict)
    gpu_percent: float | None = None  # tegrastats GR3D_FREQ load
    gpu_freq_mhz: float | None = None
    emc_percent: float | None = None  # memory controller load
    source: str = "psutil"  # "psutil", "psutil+sysfs", "psutil+tegrastats", ...

    @property
    def total_power_w(self) -> float | None:
        """Board input power: the input rail where there is one, else the sum of the rails
        (AGX Orin has none); see :func:`edge_runtime.telemetry.tegrastats.board_power_mw`."""
        mw = board_power_mw(self.power_mw)
        return None if mw is None else mw / 1000.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for heartbeats and events.jsonl)."""
        out = asdict(self)
        out["total_power_w"] = self.total_power_w
        return out
