"""Telemetry: tegrastats parsing (JetPack 4/5/6 line formats), sysfs readers, the sampler."""

from __future__ import annotations

import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_runtime.telemetry import (
    SysfsSensors,
    TegrastatsProcess,
    TelemetrySample,
    TelemetrySampler,
    is_jetson,
    parse_tegrastats_line,
    read_power_rails,
    read_thermal_zones,
)

# Lines in the formats tegrastats prints on each platform.
ORIN_NANO_JP6 = (
    "12-23-2024 22:54:11 RAM 3162/7620MB (lfb 4x2MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [1%@729,0%@729,0%@729,0%@729,off,off] GR3D_FREQ 1% cpu@62.843C soc2@61.968C "
    "soc0@60.625C gpu@61.687C tj@62.843C soc1@61.687C VDD_IN 3913mW/3922mW "
    "VDD_CPU_GPU_CV 598mW/598mW VDD_SOC 1238mW/1237mW"
)
AGX_ORIN_JP5 = (
    "08-04-2023 10:27:42 RAM 2448/30536MB (lfb 6505x4MB) SWAP 0/15268MB (cached 0MB) "
    "CPU [2%@729,0%@729,1%@729,0%@729,0%@2201,0%@2201,0%@2201,0%@2201,off,off,off,off] "
    "EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305,305] VIC_FREQ 729 APE 174 CV0@-256C CPU@44.656C "
    "Tboard@33C SOC2@40.593C Tdiode@34.75C SOC0@41.656C CV1@-256C GPU@-256C tj@44.656C "
    "SOC1@40.718C CV2@-256C VDD_GPU_SOC 2798mW/2798mW VDD_CPU_CV 400mW/400mW "
    "VIN_SYS_5V0 3014mW/3014mW VDDQ_VDD2_1V8AO 503mW/503mW"
)
XAVIER_NX_JP4 = (
    "RAM 2393/7765MB (lfb 104x4MB) SWAP 0/3883MB (cached 0MB) "
    "CPU [2%@1190,0%@1190,0%@1190,0%@1190,off,off] EMC_FREQ 0%@1600 GR3D_FREQ 0%@114 "
    "APE 150 MTS fg 0% bg 0% AO@36C GPU@36.5C PMIC@100C AUX@35.5C CPU@37.5C "
    "thermal@36.35C VDD_IN 3836/3836 VDD_CPU_GPU_CV 489/489 VDD_SOC 1225/1225"
)
NANO_JP4 = (
    "RAM 1766/3964MB (lfb 197x4MB) SWAP 0/2048MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [24%@1224,15%@1224,13%@1224,10%@1224] EMC_FREQ 0% GR3D_FREQ 0% PLL@21C CPU@25C "
    "PMIC@100C GPU@23.5C AO@33.5C thermal@24.5C POM_5V_IN 2545/2547 POM_5V_GPU 0/0 "
    "POM_5V_CPU 549/529"
)


def test_parse_orin_nano_jetpack6() -> None:
    s = parse_tegrastats_line(ORIN_NANO_JP6)
    assert s is not None
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_used_mb, s.swap_total_mb) == (3162, 7620, 0, 3810)
    assert s.cpu[:2] == [(1.0, 729.0), (0.0, 729.0)] and s.cpu[4:] == [(None, None)] * 2
    assert s.cpu_percent == pytest.approx(0.25)
    assert s.gpu_percent == 1.0 and s.gpu_freq_mhz is None and s.emc_percent is None
    assert s.temperatures_c["cpu"] == pytest.approx(62.843)
    assert s.temperatures_c["tj"] == pytest.approx(62.843) and len(s.temperatures_c) == 6
    assert s.power_mw == {"VDD_IN": 3913.0, "VDD_CPU_GPU_CV": 598.0, "VDD_SOC": 1238.0}
    assert s.power_avg_mw["VDD_IN"] == 3922.0


def test_parse_agx_orin_jetpack5() -> None:
    s = parse_tegrastats_line(AGX_ORIN_JP5)
    assert s is not None
    assert s.ram_total_mb == 30536 and len(s.cpu) == 12 and s.cpu[4] == (0.0, 2201.0)
    assert (s.emc_percent, s.emc_freq_mhz) == (0.0, 2133.0)
    assert (s.gpu_percent, s.gpu_freq_mhz) == (0.0, 305.0)
    # -256C means "sensor off": dropped, not reported as a temperature.
    assert "CV0" not in s.temperatures_c and "GPU" not in s.temperatures_c
    assert s.temperatures_c["Tdiode"] == 34.75 and s.temperatures_c["CPU"] == 44.656
    assert s.power_mw == {
        "VDD_GPU_SOC": 2798.0,
        "VDD_CPU_CV": 400.0,
        "VIN_SYS_5V0": 3014.0,
        "VDDQ_VDD2_1V8AO": 503.0,
    }


def test_parse_xavier_nx_jetpack4() -> None:
    s = parse_tegrastats_line(XAVIER_NX_JP4)
    assert s is not None
    assert s.ram_used_mb == 2393 and s.cpu[0] == (2.0, 1190.0) and s.cpu[5] == (None, None)
    assert (s.gpu_percent, s.gpu_freq_mhz) == (0.0, 114.0)
    assert (s.emc_percent, s.emc_freq_mhz) == (0.0, 1600.0)
    assert s.temperatures_c == {
        "AO": 36.0,
        "GPU": 36.5,
        "PMIC": 100.0,
        "AUX": 35.5,
        "CPU": 37.5,
        "thermal": 36.35,
    }
    # JetPack 4 prints rails without the mW unit.
    assert s.power_mw == {"VDD_IN": 3836.0, "VDD_CPU_GPU_CV": 489.0, "VDD_SOC": 1225.0}


def test_parse_older_pom_rails_and_iram() -> None:
    s = parse_tegrastats_line(NANO_JP4)
    assert s is not None
    assert s.power_mw == {"POM_5V_IN": 2545.0, "POM_5V_GPU": 0.0, "POM_5V_CPU": 549.0}
    assert s.power_avg_mw["POM_5V_CPU"] == 529.0
    assert "IRAM" not in s.power_mw and "RAM" not in s.power_mw
    assert s.gpu_percent == 0.0 and s.gpu_freq_mhz is None
    assert s.cpu_percent == pytest.approx((24 + 15 + 13 + 10) / 4)


def test_non_tegrastats_lines_are_ignored() -> None:
    assert parse_tegrastats_line("") is None
    assert parse_tegrastats_line("tegrastats: command not permitted") is None


def test_total_power_from_input_rail() -> None:
    sample = TelemetrySample(0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 50.0, 0.0, power_mw={"VDD_IN": 4500.0})
    assert sample.total_power_w == 4.5
    assert sample.to_dict()["total_power_w"] == 4.5
    sample.power_mw = {"VDD_SOC": 1000.0}
    assert sample.total_power_w is None


# -- sysfs ---------------------------------------------------------------------------


def _fake_sysfs(root: Path) -> Path:
    thermal = root / "sys/class/thermal"
    for i, (kind, milli) in enumerate(
        [
            ("cpu-thermal", "45500"),
            ("gpu-thermal", "43000"),
            ("cpu-thermal", "46000"),
            ("cv0-thermal", "-256000"),
        ]
    ):
        zone = thermal / f"thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    # JetPack 4 (iio): power in mW with the rail name beside it.
    iio = root / "sys/bus/i2c/drivers/ina3221x/7-0040/iio:device0"
    iio.mkdir(parents=True)
    for n, (name, mw) in enumerate([("VDD_IN", "4012"), ("VDD_CPU_GPU_CV", "812")]):
        (iio / f"rail_name_{n}").write_text(name + "\n")
        (iio / f"in_power{n}_input").write_text(mw + "\n")
    # JetPack 5/6 (hwmon): voltage in mV and current in mA per channel.
    hwmon = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    hwmon.mkdir(parents=True)
    for n, (name, mv, ma) in enumerate(
        [
            ("VDD_IN", "5000", "900"),
            ("VDD_CPU_GPU_CV", "5000", "120"),
            ("Sum of shunt voltages", "0", "0"),
        ],
        start=1,
    ):
        (hwmon / f"in{n}_label").write_text(name + "\n")
        (hwmon / f"in{n}_input").write_text(mv + "\n")
        (hwmon / f"curr{n}_input").write_text(ma + "\n")
    return root


def test_sysfs_thermal_and_power(tmp_path: Path) -> None:
    root = _fake_sysfs(tmp_path)
    temps = read_thermal_zones(root)
    assert temps == {"cpu-thermal": 45.5, "gpu-thermal": 43.0, "cpu-thermal.2": 46.0}
    power = read_power_rails(root)
    # hwmon rails (V*I) come after the iio ones and win for the same name.
    assert power == {"VDD_IN": 4500.0, "VDD_CPU_GPU_CV": 600.0}


def test_sysfs_reads_fresh_values_after_discovery(tmp_path: Path) -> None:
    root = _fake_sysfs(tmp_path)
    sensors = SysfsSensors.discover(root)
    (root / "sys/class/thermal/thermal_zone1/temp").write_text("51250\n")
    assert sensors.temperatures()["gpu-thermal"] == 51.25


def test_sysfs_empty_off_jetson(tmp_path: Path) -> None:
    assert read_thermal_zones(tmp_path) == {} and read_power_rails(tmp_path) == {}
    assert read_thermal_zones(tmp_path / "missing") == {}
    assert not is_jetson(tmp_path)


def test_is_jetson_on_fake_tree(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 3.0, GCID: 1\n")
    assert is_jetson(tmp_path)


# -- sampler ---------------------------------------------------------------------------


def _wait_for(predicate: Callable[[], object], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_sampler_start_stop_history_and_callbacks(tmp_path: Path) -> None:
    seen: list[TelemetrySample] = []
    sampler = TelemetrySampler(
        interval_s=0.05,
        history=3,
        use_tegrastats=False,
        root=str(tmp_path),
        callbacks=[seen.append],
    )
    sampler.add_callback(lambda s: 1 / 0)  # a failing callback must not stop sampling
    with sampler:
        assert sampler.running
        assert _wait_for(lambda: len(seen) >= 5)
    assert not sampler.running
    count = len(seen)
    time.sleep(0.2)
    assert len(seen) == count  # nothing after stop
    history = sampler.history()
    assert len(history) == 3 and history[-1] is sampler.latest() is seen[-1]
    assert [s.time for s in history] == sorted(s.time for s in history)
    s = history[-1]
    assert s.process_rss_mb > 1 and 0 < s.mem_used_mb <= s.mem_total_mb
    assert 0 <= s.mem_percent <= 100 and s.cpu_per_core
    assert s.gpu_percent is None and s.power_mw == {} and s.source.startswith("psutil")
    assert not any(t.name == "telemetry-sampler" for t in threading.enumerate())


def test_sampler_reads_fake_sysfs(tmp_path: Path) -> None:
    sampler = TelemetrySampler(
        interval_s=1.0, use_tegrastats=False, root=str(_fake_sysfs(tmp_path))
    )
    s = sampler.sample()
    assert s.temperatures_c["gpu-thermal"] == 43.0 and s.power_mw["VDD_IN"] == 4500.0
    assert s.total_power_w == 4.5 and s.source == "psutil+sysfs"


def _fake_tegrastats(tmp_path: Path) -> list[str]:
    """A stand-in tegrastats: prints recorded Xavier NX lines until it is terminated."""
    script = tmp_path / "tegrastats.py"
    script.write_text(
        textwrap.dedent(
            f"""\
            import sys, time
            line = {XAVIER_NX_JP4!r}
            while True:
                print(line, flush=True)
                time.sleep(0.05)
            """
        )
    )
    return [sys.executable, str(script)]


def test_tegrastats_process_is_one_long_lived_subprocess(tmp_path: Path) -> None:
    proc = TegrastatsProcess(command=_fake_tegrastats(tmp_path))
    with proc:
        assert _wait_for(lambda: proc.lines_parsed >= 3)
        assert proc.running
        stats = proc.latest()
        assert stats is not None and stats.power_mw["VDD_IN"] == 3836.0
    assert not proc.running
    assert proc.latest() is not None  # the last reading stays available


def test_sampler_merges_tegrastats(tmp_path: Path) -> None:
    sampler = TelemetrySampler(
        interval_s=0.05, tegrastats_command=_fake_tegrastats(tmp_path), root=str(tmp_path)
    )
    with sampler:
        assert _wait_for(lambda: (s := sampler.latest()) is not None and "tegrastats" in s.source)
    s = sampler.latest()
    assert s is not None
    assert s.gpu_percent == 0.0 and s.gpu_freq_mhz == 114.0 and s.emc_percent == 0.0
    assert s.temperatures_c["GPU"] == 36.5 and s.total_power_w == pytest.approx(3.836)
    assert sampler._tegrastats is not None and not sampler._tegrastats.running


def test_sampler_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        TelemetrySampler(interval_s=0)
    with pytest.raises(ValueError):
        TelemetrySampler(history=0)


def test_sampler_from_config() -> None:
    from edge_runtime.config import RuntimeConfig

    cfg = RuntimeConfig().with_overrides({"telemetry.interval_s": 2, "telemetry.history": 10})
    sampler = TelemetrySampler.from_config(cfg.telemetry, root="/nonexistent")
    assert sampler.interval_s == 2.0 and sampler.sample().mem_total_mb > 0
