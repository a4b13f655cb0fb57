"""Thermal and power readings straight from sysfs (Jetson and most Linux boards).

Off-Jetson (or in a container) the files are missing and every reader returns an
empty dict. Paths are discovered once (:class:`SysfsSensors`), then each sample is a
handful of small file reads: no subprocess, no globbing per sample.

* Thermal zones: ``/sys/class/thermal/thermal_zone*/{type,temp}``, temp in m°C.
* INA3221 power monitors (Jetson carrier/module rails):
  - JetPack 4: ``/sys/bus/i2c/drivers/ina3221x/*/iio:device*/in_power<N>_input`` (mW)
    with the rail name in ``rail_name_<N>``;
  - JetPack 5/6: ``/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in<N>_label`` with
    ``in<N>_input`` (mV) and ``curr<N>_input`` (mA).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.telemetry.tegrastats import NOT_CONNECTED_RAIL, board_power_mw

# Kernel thermal drivers report a disabled/invalid zone with huge negative values.
_MIN_VALID_C = -100.0


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_number(path: Path) -> float | None:
    text = _read(path)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


@dataclass
class _Rail:
    name: str
    power: Path | None = None  # mW directly (JetPack 4 iio)
    volts: Path | None = None  # mV (hwmon)
    amps: Path | None = None  # mA (hwmon)


@dataclass
class SysfsSensors:
    """Discovered sensor files under ``root``; :meth:`temperatures` and :meth:`power` read them."""

    root: Path = Path("/")
    thermal: list[tuple[str, Path]] = field(default_factory=list)
    rails: list[_Rail] = field(default_factory=list)

    @classmethod
    def discover(cls, root: str | os.PathLike[str] = "/") -> SysfsSensors:
        root = Path(root)
        sensors = cls(root=root)
        for zone in sorted(root.glob("sys/class/thermal/thermal_zone*")):
            kind = _read(zone / "type") or zone.name
            if (zone / "temp").exists():
                sensors.thermal.append((kind, zone / "temp"))
        sensors.rails = _discover_rails(root)
        return sensors

    def temperatures(self) -> dict[str, float]:
        """Zone type -> °C; duplicate types get their zone index appended."""
        out: dict[str, float] = {}
        for kind, path in self.thermal:
            milli = _read_number(path)
            if milli is None or milli / 1000.0 < _MIN_VALID_C:
                continue
            name = (
                kind
                if kind not in out
                else f"{kind}.{path.parent.name.removeprefix('thermal_zone')}"
            )
            out[name] = milli / 1000.0
        return out

    def power(self) -> dict[str, float]:
        """Rail name -> mW (unconnected ``NC`` channels are not listed)."""
        out: dict[str, float] = {}
        for rail in self.rails:
            if rail.power is not None:
                value = _read_number(rail.power)
            else:
                mv = _read_number(rail.volts) if rail.volts else None
                ma = _read_number(rail.amps) if rail.amps else None
                value = mv * ma / 1000.0 if mv is not None and ma is not None else None
            if value is not None:
                out[rail.name] = value
        return out

    def total_power(self) -> float | None:
        """Board power in mW: the input rail, else the sum of all rails (jetson-stats' rule)."""
        return board_power_mw(self.power())


def _discover_rails(root: Path) -> list[_Rail]:
    rails: list[_Rail] = []
    drivers = root / "sys/bus/i2c/drivers"
    # JetPack 4: iio devices of the ina3221x driver.
    for power in sorted(drivers.glob("ina3221*/*/iio:device*/in_power*_input")):
        index = re.search(r"in_power(\d+)_input", power.name)
        if index is None:
            continue
        name = _read(power.parent / f"rail_name_{index.group(1)}") or f"rail{index.group(1)}"
        if name == NOT_CONNECTED_RAIL:
            continue
        rails.append(_Rail(name=name, power=power))
    # JetPack 5/6: hwmon interface of the ina3221 driver.
    for label in sorted(drivers.glob("ina3221*/*/hwmon/hwmon*/in*_label")):
        index = re.match(r"in(\d+)_label", label.name)
        name = _read(label)
        if (
            index is None
            or not name
            or name == NOT_CONNECTED_RAIL
            or name.lower().startswith("sum of")
        ):
            continue
        n = index.group(1)
        volts, amps = label.parent / f"in{n}_input", label.parent / f"curr{n}_input"
        if volts.exists() and amps.exists():
            rails.append(_Rail(name=name, volts=volts, amps=amps))
    return rails


def read_thermal_zones(root: str | os.PathLike[str] = "/") -> dict[str, float]:
    """Thermal zone type -> °C; empty where there are none."""
    return SysfsSensors.discover(root).temperatures()


def read_power_rails(root: str | os.PathLike[str] = "/") -> dict[str, float]:
    """INA3221 rail name -> mW; empty off-Jetson."""
    return SysfsSensors.discover(root).power()
