"""Reading NVIDIA ``tegrastats`` output.

tegrastats prints one line per interval. Its format differs between JetPack releases;
these are the shapes the parser handles (abridged):

* JetPack 4 (Xavier NX)::

    RAM 2393/7765MB (lfb 104x4MB) SWAP 0/3883MB (cached 0MB) CPU [2%@1190,0%@1190,off,off]
    EMC_FREQ 0%@1600 GR3D_FREQ 0%@114 APE 150 ... CPU@37.5C thermal@36.35C
    VDD_IN 3836/3836 VDD_CPU_GPU_CV 489/489 VDD_SOC 1225/1225

  (older boards: ``POM_5V_IN 2545/2547`` rails, and ``EMC 1%@408 GR3D 3%@76``);
* JetPack 5 (AGX Orin): a date prefix, ``GR3D_FREQ 0%@[305,305]`` (one per GPC),
  ``-256C`` for sensors that are switched off, rails ``VDD_GPU_SOC 1598mW/1598mW``,
  and unconnected INA3221 channels printed as ``NC 0mW/0mW`` (dropped);
* JetPack 6 (Orin Nano): ``GR3D_FREQ 1%`` without a frequency, lowercase
  ``cpu@62.8C``, rails ``VDD_IN 3913mW/3922mW``.

Rail values are "instant/average", in mW (with or without the unit).
:func:`board_power_mw` turns the rails into the board's total the way jetson-stats does:
the input rail (``VDD_IN``, or ``POM_5V_IN`` on older boards) where there is one, else the
sum of every rail (AGX Orin and AGX Xavier have no input rail; ``VIN_SYS_5V0`` is one rail).
:class:`TegrastatsProcess` runs tegrastats once, long-lived, with ``--interval``: one
subprocess for the whole run, never one per sample.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_CPU_CORE = re.compile(r"^(\d+)%(?:@(\d+))?$")
_EMC = re.compile(r"\bEMC(?:_FREQ)? (\d+)%(?:@(\d+))?")
_GPU = re.compile(r"\bGR3D(?:_FREQ)? (\d+)%(?:@(\[[\d,]*\]|\d+))?")
_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
# "NAME 123mW/456mW" or "NAME 123/456": a number not followed by a unit other than mW,
# so "RAM 3162/7620MB" and "IRAM 0/252kB" are not taken for rails.
_RAIL = re.compile(r"\b([A-Za-z][\w]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?![\w/])")
_NOT_RAILS = frozenset({"RAM", "SWAP", "IRAM", "lfb"})
# An INA3221 channel with nothing connected (AGX Orin prints two of them).
NOT_CONNECTED_RAIL = "NC"
# The rails that measure the whole board's input, preferred in this order.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
# tegrastats reports a switched-off sensor (e.g. CV0, GPU when idle-gated) as -256C.
_SENSOR_OFF_C = -256.0


@dataclass
class TegraStats:
    """One parsed tegrastats line. Fields absent from the line are None/empty."""

    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    # One entry per core: (load %, MHz); (None, None) for an offline core ("off").
    cpu: list[tuple[float | None, float | None]] = field(default_factory=list)
    emc_percent: float | None = None
    emc_freq_mhz: float | None = None
    gpu_percent: float | None = None
    gpu_freq_mhz: float | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    power_mw: dict[str, float] = field(default_factory=dict)  # instantaneous
    power_avg_mw: dict[str, float] = field(default_factory=dict)

    @property
    def total_power_mw(self) -> float | None:
        """Board power now (see :func:`board_power_mw`); None without rails."""
        return board_power_mw(self.power_mw)

    @property
    def total_power_avg_mw(self) -> float | None:
        return board_power_mw(self.power_avg_mw)

    @property
    def cpu_percent(self) -> float | None:
        """Mean load over online cores."""
        loads = [load for load, _ in self.cpu if load is not None]
        return sum(loads) / len(loads) if loads else None


def board_power_mw(rails: Mapping[str, float]) -> float | None:
    """Total board power from rail readings (mW), as jetson-stats computes it.

    The input rail (``VDD_IN``, else ``POM_5V_IN``) where one exists; otherwise the sum
    of all rails except unconnected ``NC`` channels. None when there are no rails.
    """
    for name in INPUT_RAILS:
        if name in rails:
            return float(rails[name])
    values = [float(v) for name, v in rails.items() if name != NOT_CONNECTED_RAIL]
    return sum(values) if values else None


def _gpu_freq(text: str | None) -> float | None:
    if not text:
        return None
    if text.startswith("["):  # one frequency per GPC: report the highest
        values = [float(v) for v in text.strip("[]").split(",") if v]
        return max(values) if values else None
    return float(text)


def parse_tegrastats_line(line: str) -> TegraStats | None:
    """Parse one line; None if it is not a tegrastats line (no RAM field)."""
    ram = _RAM.search(line)
    if ram is None:
        return None
    stats = TegraStats(ram_used_mb=int(ram.group(1)), ram_total_mb=int(ram.group(2)))
    if swap := _SWAP.search(line):
        stats.swap_used_mb, stats.swap_total_mb = int(swap.group(1)), int(swap.group(2))
    if cpu := _CPU.search(line):
        for entry in cpu.group(1).split(","):
            core = _CPU_CORE.match(entry.strip())
            if core:
                freq = float(core.group(2)) if core.group(2) else None
                stats.cpu.append((float(core.group(1)), freq))
            else:  # "off"
                stats.cpu.append((None, None))
    if emc := _EMC.search(line):
        stats.emc_percent = float(emc.group(1))
        stats.emc_freq_mhz = float(emc.group(2)) if emc.group(2) else None
    if gpu := _GPU.search(line):
        stats.gpu_percent = float(gpu.group(1))
        stats.gpu_freq_mhz = _gpu_freq(gpu.group(2))
    for name, value in _TEMP.findall(line):
        celsius = float(value)
        if celsius > _SENSOR_OFF_C:
            stats.temperatures_c[name] = celsius
    for name, now, avg in _RAIL.findall(line):
        if name not in _NOT_RAILS and name != NOT_CONNECTED_RAIL:
            stats.power_mw[name] = float(now)
            stats.power_avg_mw[name] = float(avg)
    return stats


def tegrastats_available() -> bool:
    return shutil.which("tegrastats") is not None


class TegrastatsProcess:
    """One long-lived ``tegrastats --interval MS`` subprocess; keeps the latest parsed line.

    A reader thread blocks on the pipe, so sampling costs nothing but a lock. ``command``
    replaces the tegrastats command line (tests run a script printing recorded lines).
    """

    def __init__(self, interval_ms: int = 1000, command: Sequence[str] | None = None) -> None:
        self.command = list(command) if command else ["tegrastats", "--interval", str(interval_ms)]
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._latest: TegraStats | None = None
        self.lines_parsed = 0

    def start(self) -> None:
        if self._proc is not None:
            return
        self._proc = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._thread = threading.Thread(target=self._read, name="tegrastats-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            stats = parse_tegrastats_line(line)
            if stats is not None:
                with self._lock:
                    self._latest = stats
                    self.lines_parsed += 1
        log.debug("tegrastats exited with %s", proc.poll())

    def latest(self) -> TegraStats | None:
        with self._lock:
            return self._latest

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 2.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> TegrastatsProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
