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
from edge_runtime.telemetry.tegrastats import board_power_mw

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

# AGX Orin on JetPack 6: no input rail, and two unconnected INA3221 channels ("NC").
AGX_ORIN_JP6 = (
    "11-14-2024 14:02:36 RAM 4329/62841MB (lfb 13134x4MB) SWAP 0/31421MB (cached 0MB) "
    "CPU [0%@2201,0%@2201,1%@2201,0%@2201,0%@2201,0%@2201,0%@2201,0%@2201,0%@2201,0%@2201,"
    "0%@2201,0%@2201] GR3D_FREQ 0% cpu@46.375C soc2@42.375C soc0@43.062C gpu@42.406C "
    "tj@46.375C soc1@42.218C VDD_GPU_SOC 2786mW/2790mW VDD_CPU_CV 398mW/400mW "
    "VIN_SYS_5V0 3628mW/3630mW NC 0mW/0mW VDDQ_VDD2_1V8AO 302mW/300mW NC 0mW/0mW"
)
# Orin NX 16GB on JetPack 5.1.
ORIN_NX_JP5 = (
    "02-21-2024 09:13:05 RAM 2466/15388MB (lfb 2997x4MB) SWAP 0/7694MB (cached 0MB) "
    "CPU [1%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@3199 "
    "GR3D_FREQ 0%@[0] VIC_FREQ 115 APE 200 CV0@-256C CPU@45.25C SOC2@42.156C SOC0@43.343C "
    "CV1@-256C GPU@-256C tj@45.25C SOC1@42.531C CV2@-256C VDD_IN 5000mW/5000mW "
    "VDD_CPU_GPU_CV 598mW/598mW VDD_SOC 1437mW/1437mW"
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


@pytest.mark.parametrize(
    ("line", "now_mw", "avg_mw"),
    [
        (ORIN_NX_JP5, 5000.0, 5000.0),  # VDD_IN, with mW
        (ORIN_NANO_JP6, 3913.0, 3922.0),  # VDD_IN, with mW
        (XAVIER_NX_JP4, 3836.0, 3836.0),  # VDD_IN, older format without the unit
        (NANO_JP4, 2545.0, 2547.0),  # POM_5V_IN (TX2 / Nano era)
    ],
    ids=["orin-nx-jp5", "orin-nano-jp6", "xavier-nx-jp4", "nano-jp4-pom"],
)
def test_board_power_is_the_input_rail_where_there_is_one(
    line: str, now_mw: float, avg_mw: float
) -> None:
    s = parse_tegrastats_line(line)
    assert s is not None
    assert s.total_power_mw == now_mw and s.total_power_avg_mw == avg_mw


def test_board_power_on_agx_orin_sums_all_rails_without_nc() -> None:
    # No VDD_IN or POM_5V_IN: jetson-stats sums every rail; VIN_SYS_5V0 is only one of them.
    s = parse_tegrastats_line(AGX_ORIN_JP6)
    assert s is not None
    assert "NC" not in s.power_mw and "NC" not in s.power_avg_mw
    assert s.power_mw == {
        "VDD_GPU_SOC": 2786.0,
        "VDD_CPU_CV": 398.0,
        "VIN_SYS_5V0": 3628.0,
        "VDDQ_VDD2_1V8AO": 302.0,
    }
    assert s.total_power_mw == 2786.0 + 398.0 + 3628.0 + 302.0
    assert s.total_power_avg_mw == 2790.0 + 400.0 + 3630.0 + 300.0
    jp5 = parse_tegrastats_line(AGX_ORIN_JP5)
    assert jp5 is not None and jp5.total_power_mw == 2798.0 + 400.0 + 3014.0 + 503.0


def test_board_power_rules() -> None:
    assert board_power_mw({}) is None
    assert board_power_mw({"NC": 0.0}) is None
    assert board_power_mw({"POM_5V_IN": 2000.0, "POM_5V_GPU": 300.0}) == 2000.0
    # VDD_IN wins over POM_5V_IN; an NC channel never adds to a sum.
    assert board_power_mw({"POM_5V_IN": 1.0, "VDD_IN": 2.0}) == 2.0
    assert board_power_mw({"VDD_GPU_SOC": 10.0, "NC": 5.0, "VIN_SYS_5V0": 20.0}) == 30.0


def test_non_tegrastats_lines_are_ignored() -> None:
    assert parse_tegrastats_line("") is None
    assert parse_tegrastats_line("tegrastats: command not permitted") is None


def test_total_power_from_input_rail() -> None:
    sample = TelemetrySample(0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 50.0, 0.0, power_mw={"VDD_IN": 4500.0})
    assert sample.total_power_w == 4.5
    assert sample.to_dict()["total_power_w"] == 4.5
    sample.power_mw = {"VDD_SOC": 1000.0}  # no input rail: the rails are summed
    assert sample.total_power_w == 1.0
    sample.power_mw = {}
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


def test_sysfs_agx_orin_rails_drop_nc_and_sum(tmp_path: Path) -> None:
    # AGX Orin (JetPack 5/6): two INA3221 monitors, no VDD_IN, two "NC" channels.
    for addr, channels in (
        ("1-0040", [("VDD_GPU_SOC", "5000", "560"), ("VDD_CPU_CV", "5000", "80")]),
        ("1-0040", [("VIN_SYS_5V0", "5000", "724")]),
        ("1-0041", [("NC", "0", "0"), ("VDDQ_VDD2_1V8AO", "5000", "60"), ("NC", "0", "0")]),
    ):
        hwmon = tmp_path / f"sys/bus/i2c/drivers/ina3221/{addr}/hwmon/hwmon{addr[-1]}"
        hwmon.mkdir(parents=True, exist_ok=True)
        start = len(list(hwmon.glob("in*_label"))) + 1
        for n, (name, mv, ma) in enumerate(channels, start=start):
            (hwmon / f"in{n}_label").write_text(name + "\n")
            (hwmon / f"in{n}_input").write_text(mv + "\n")
            (hwmon / f"curr{n}_input").write_text(ma + "\n")
    sensors = SysfsSensors.discover(tmp_path)
    power = sensors.power()
    assert power == {
        "VDD_GPU_SOC": 2800.0,
        "VDD_CPU_CV": 400.0,
        "VIN_SYS_5V0": 3620.0,
        "VDDQ_VDD2_1V8AO": 300.0,
    }
    assert sensors.total_power() == 2800.0 + 400.0 + 3620.0 + 300.0


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


def test_sample_total_power_on_agx_orin_is_the_sum_of_its_rails() -> None:
    """AGX Orin has no input rail: the sample's board power is every rail but NC, summed
    (as jetson-stats does), not the one VIN_SYS_5V0 rail it used to report."""
    import dataclasses

    from edge_runtime.telemetry.sampler import PsutilReader

    sample = PsutilReader().read()
    rails = {"VDD_GPU_SOC": 3000.0, "VDD_CPU_CV": 1000.0, "VIN_SYS_5V0": 2500.0}
    assert dataclasses.replace(sample, power_mw=rails).total_power_w == 6.5
    with_input = {"VDD_IN": 5000.0, "VDD_SOC": 1.0}
    assert dataclasses.replace(sample, power_mw=with_input).total_power_w == 5.0
