"""Periodic telemetry: a background thread that takes a :class:`TelemetrySample` every interval.

Each sample is a few psutil calls (system and process CPU, RSS, memory) plus reads of
sysfs files discovered once at start; on a Jetson with tegrastats, one long-lived
tegrastats subprocess supplies GPU load, temperatures and power rails. Nothing spawns a
process per sample, so a 1 s interval costs well under 1% of one core.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import psutil

from edge_runtime.telemetry.sample import TelemetrySample
from edge_runtime.telemetry.sysfs import SysfsSensors
from edge_runtime.telemetry.tegrastats import TegrastatsProcess, tegrastats_available

if TYPE_CHECKING:
    from collections.abc import Sequence

    from edge_runtime.config import TelemetryConfig

log = logging.getLogger(__name__)

_MB = 1024.0 * 1024.0
Callback = Callable[[TelemetrySample], None]


class PsutilReader:
    """System and process readings through psutil (every platform)."""

    def __init__(self, pid: int | None = None) -> None:
        self.process = psutil.Process(pid)
        # psutil's cpu_percent(None) compares with the previous call: prime both counters
        # so the first real sample covers the first interval, not "since boot".
        psutil.cpu_percent(None)
        psutil.cpu_percent(None, percpu=True)
        self.process.cpu_percent(None)

    def read(self) -> TelemetrySample:
        mem = psutil.virtual_memory()
        with self.process.oneshot():
            rss = self.process.memory_info().rss
            proc_cpu = self.process.cpu_percent(None)
        return TelemetrySample(
            time=time.time(),
            cpu_percent=psutil.cpu_percent(None),
            process_cpu_percent=proc_cpu,
            process_rss_mb=rss / _MB,
            mem_used_mb=(mem.total - mem.available) / _MB,
            mem_total_mb=mem.total / _MB,
            mem_percent=mem.percent,
            swap_used_mb=psutil.swap_memory().used / _MB,
            cpu_per_core=list(psutil.cpu_percent(None, percpu=True)),
        )


def psutil_temperatures() -> dict[str, float]:
    """hwmon temperatures via psutil (``chip/label`` -> °C); empty where unsupported."""
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return {}
    try:
        chips = reader()
    except (OSError, RuntimeError):
        return {}
    out: dict[str, float] = {}
    for chip, entries in chips.items():
        for i, entry in enumerate(entries):
            out[f"{chip}/{entry.label or i}"] = float(entry.current)
    return out


class TelemetrySampler:
    """Takes a sample every ``interval_s`` on a daemon thread; keeps a bounded history.

    ``latest()`` is the newest sample, ``history()`` the last ``history`` ones, oldest
    first; callbacks run on the sampler thread after each sample (an exception in one is
    logged, not raised). ``sample()`` takes one reading synchronously.
    """

    def __init__(
        self,
        interval_s: float = 1.0,
        history: int = 720,
        *,
        use_tegrastats: bool = True,
        tegrastats_command: Sequence[str] | None = None,
        root: str = "/",
        callbacks: Sequence[Callback] = (),
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        if history <= 0:
            raise ValueError("history must be > 0")
        self.interval_s = float(interval_s)
        self._history: deque[TelemetrySample] = deque(maxlen=int(history))
        self._callbacks: list[Callback] = list(callbacks)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._psutil = PsutilReader()
        self._sysfs = SysfsSensors.discover(root)
        self._tegrastats: TegrastatsProcess | None = None
        if tegrastats_command is not None or (use_tegrastats and tegrastats_available()):
            interval_ms = max(1, round(self.interval_s * 1000))
            self._tegrastats = TegrastatsProcess(interval_ms, tegrastats_command)

    @classmethod
    def from_config(
        cls,
        cfg: TelemetryConfig,
        *,
        root: str = "/",
        callbacks: Sequence[Callback] = (),
    ) -> TelemetrySampler:
        """A sampler with the ``telemetry`` section's interval, history and tegrastats choice."""
        return cls(
            cfg.interval_s,
            cfg.history,
            use_tegrastats=cfg.tegrastats,
            root=root,
            callbacks=callbacks,
        )

    # -- one reading ---------------------------------------------------------------
    def sample(self) -> TelemetrySample:
        """One reading now: psutil, then sysfs, then tegrastats (each refines the last)."""
        s = self._psutil.read()
        sources = ["psutil"]
        temps = self._sysfs.temperatures()
        power = self._sysfs.power()
        if temps or power:
            sources.append("sysfs")
        else:
            temps = psutil_temperatures()
        s.temperatures_c.update(temps)
        s.power_mw.update(power)
        stats = self._tegrastats.latest() if self._tegrastats is not None else None
        if stats is not None:
            sources.append("tegrastats")
            s.temperatures_c.update(stats.temperatures_c)
            s.power_mw.update(stats.power_mw)
            s.gpu_percent = stats.gpu_percent
            s.gpu_freq_mhz = stats.gpu_freq_mhz
            s.emc_percent = stats.emc_percent
        s.source = "+".join(sources)
        return s

    # -- background loop -----------------------------------------------------------
    def add_callback(self, callback: Callback) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def start(self) -> TelemetrySampler:
        if self._thread is not None:
            return self
        self._stop.clear()
        if self._tegrastats is not None:
            try:
                self._tegrastats.start()
            except OSError as exc:  # tegrastats vanished or is not executable
                log.warning("tegrastats unavailable (%s); continuing without it", exc)
                self._tegrastats = None
        self._thread = threading.Thread(target=self._run, name="telemetry-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        # Fixed-rate schedule: the next deadline advances by the interval, so sampling time
        # does not accumulate as drift; after a long stall it skips rather than bursts.
        deadline = time.monotonic()
        while not self._stop.is_set():
            self._take()
            deadline += self.interval_s
            now = time.monotonic()
            if deadline < now:
                deadline = now + self.interval_s
            self._stop.wait(deadline - now)

    def _take(self) -> None:
        try:
            s = self.sample()
        except (OSError, psutil.Error) as exc:
            log.warning("telemetry sample failed: %s", exc)
            return
        with self._lock:
            self._history.append(s)
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(s)
            except Exception:
                log.exception("telemetry callback %r failed", callback)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        if self._tegrastats is not None:
            self._tegrastats.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def latest(self) -> TelemetrySample | None:
        with self._lock:
            return self._history[-1] if self._history else None

    def history(self) -> list[TelemetrySample]:
        with self._lock:
            return list(self._history)

    def __enter__(self) -> TelemetrySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
