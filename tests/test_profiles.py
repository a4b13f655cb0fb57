"""Device profiles: every shipped YAML validates; detection on fake /etc and /proc trees; CLI."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from edge_runtime.cli import profile as profile_cli
from edge_runtime.config import (
    PROFILES_ENV,
    RuntimeConfig,
    detect_device,
    detect_profile,
    list_profiles,
    load_profile,
    profiles_dir,
)
from edge_runtime.config.detect import parse_nvpmodel_conf
from edge_runtime.config.loader import read_yaml_mapping
from edge_runtime.config.schema import NOT_IMPLEMENTED
from edge_runtime.errors import ConfigError, EdgeRuntimeError

EXPECTED = {
    "jetson-orin-nano-8gb",
    "jetson-orin-nx-16gb",
    "jetson-agx-orin-64gb",
    "jetson-xavier-nx",
    "x86-dev",
}
JETSONS = sorted(EXPECTED - {"x86-dev"})


def test_all_targets_are_shipped() -> None:
    assert set(list_profiles()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_profile_validates(name: str) -> None:
    cfg = load_profile(name)
    assert cfg.device.name == name
    assert load_profile(profiles_dir() / f"{name}.yaml") == cfg  # by path too
    assert RuntimeConfig(**cfg.model_dump()) == cfg


@pytest.mark.parametrize("name", JETSONS)
def test_jetson_profiles_are_complete(name: str) -> None:
    cfg = load_profile(name)
    assert cfg.encoder.precision == "fp16"
    assert cfg.device.nvpmodel_mode is not None and cfg.device.nvpmodel_name
    # The fleet link is configured for the client to come, but not switched on before it exists.
    assert cfg.fleet.tls and cfg.fleet.credentials_file is not None and cfg.fleet.port == 8883


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_no_profile_claims_what_the_code_does_not_do(name: str) -> None:
    raw = read_yaml_mapping(profiles_dir() / f"{name}.yaml")
    cfg = load_profile(name)
    for field, (allowed, _) in NOT_IMPLEMENTED.items():
        section, key = field.split(".")
        assert getattr(getattr(cfg, section), key) == allowed, field
        # A field nothing reads is not written as a figure (the power draw lives in the prose).
        if allowed is None:
            assert key not in raw.get(section, {}), field


def test_jetson_profiles_share_what_the_fleet_exchanges() -> None:
    # Adaptors and HDC memories move between devices only if these agree.
    shared = {
        (c.encoder.input_size, tuple(c.encoder.layers), c.hdc.dim, c.hdc.seed)
        for c in map(load_profile, JETSONS)
    }
    assert len(shared) == 1


def test_x86_profile_is_the_defaults_for_behaviour() -> None:
    cfg = load_profile("x86-dev")
    assert cfg.encoder.precision == "fp32" and cfg.device.nvpmodel_mode is None
    defaults = RuntimeConfig()
    for section in ("encoder", "hdc", "drift", "adapt", "fleet", "telemetry"):
        assert getattr(cfg, section) == getattr(defaults, section), section


def test_known_nvpmodel_modes() -> None:
    # Mode ids from NVIDIA's Jetson Linux developer guide (see the comments in the YAMLs).
    modes = {
        n: (load_profile(n).device.nvpmodel_mode, load_profile(n).device.nvpmodel_name)
        for n in JETSONS
    }
    assert modes["jetson-orin-nano-8gb"] == (0, "15W")
    assert modes["jetson-agx-orin-64gb"] == (0, "MAXN")
    assert modes["jetson-xavier-nx"] == (2, "MODE_15W_6CORE")


def test_unknown_profile_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="jetson-orin-nano-8gb"):
        load_profile("jetson-tx2")


def test_profiles_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lab-box.yaml").write_text("device: {name: lab-box}\nhdc: {dim: 1024}\n")
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path))
    assert list_profiles() == ["lab-box"]
    assert load_profile("lab-box").hdc.dim == 1024
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=PROFILES_ENV):
        profiles_dir()


# -- detection on fake filesystem trees ---------------------------------------------

ORIN_NANO_NVPMODEL = """\
< POWER_MODEL ID=0 NAME=15W >
CPU_ONLINE CORE_0 1
GPU MAX_FREQ 624750000
< POWER_MODEL ID=1 NAME=7W >
CPU_ONLINE CORE_0 1
CPU_ONLINE CORE_4 0
< PM_CONFIG DEFAULT=0 >
"""
AGX_ORIN_NVPMODEL = """\
< POWER_MODEL ID=0 NAME=MAXN >
< POWER_MODEL ID=1 NAME=MODE_15W >
< POWER_MODEL ID=2 NAME=MODE_30W >
< POWER_MODEL ID=3 NAME=MODE_50W >
< PM_CONFIG DEFAULT=2 >
"""
XAVIER_NX_NVPMODEL = """\
< POWER_MODEL ID=0 NAME=MODE_15W_2CORE >
< POWER_MODEL ID=1 NAME=MODE_15W_4CORE >
< POWER_MODEL ID=2 NAME=MODE_15W_6CORE >
< POWER_MODEL ID=3 NAME=MODE_10W_2CORE >
< POWER_MODEL ID=4 NAME=MODE_10W_4CORE >
< PM_CONFIG DEFAULT=2 >
"""


def _tree(
    root: Path,
    *,
    model: str | None = None,
    compatible: list[str] | None = None,
    release: str | None = None,
    nvpmodel: tuple[str, str] | None = None,
) -> Path:
    """A fake root with the files a Jetson has (device-tree strings are NUL-terminated)."""
    if model is not None or compatible is not None:
        (root / "proc/device-tree").mkdir(parents=True)
    if model is not None:
        (root / "proc/device-tree/model").write_bytes(model.encode() + b"\x00")
    if compatible is not None:
        (root / "proc/device-tree/compatible").write_bytes(
            b"".join(c.encode() + b"\x00" for c in compatible)
        )
    (root / "etc").mkdir(parents=True, exist_ok=True)
    if release is not None:
        (root / "etc/nv_tegra_release").write_text(release)
    if nvpmodel is not None:
        filename, text = nvpmodel
        (root / "etc/nvpmodel").mkdir()
        (root / "etc/nvpmodel" / filename).write_text(text)
        # On L4T, /etc/nvpmodel.conf is a symlink to the board's file.
        os.symlink(f"nvpmodel/{filename}", root / "etc/nvpmodel.conf")
    return root


def test_detect_orin_nano_jetpack6(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        model="NVIDIA Jetson Orin Nano Developer Kit",
        compatible=["nvidia,p3768-0000+p3767-0005", "nvidia,p3767-0005", "nvidia,tegra234"],
        release="# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
        "DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n",
        nvpmodel=("nvpmodel_p3767_0003.conf", ORIN_NANO_NVPMODEL),
    )
    d = detect_device(root)
    assert d.profile == "jetson-orin-nano-8gb" and d.is_jetson
    assert d.l4t_release == "R36.4.3"
    assert d.power_modes == {0: "15W", 1: "7W"} and d.default_power_mode == 0
    assert d.nvpmodel_file == "nvpmodel/nvpmodel_p3767_0003.conf"
    assert "Orin Nano" in d.reason and "R36.4.3" in d.reason


def test_detect_agx_orin_jetpack5(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        model="Jetson AGX Orin",
        release="# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
        "DATE: Tue Aug  1 19:57:35 UTC 2023\n",
        nvpmodel=("nvpmodel_p3701_0005.conf", AGX_ORIN_NVPMODEL),
    )
    d = detect_device(root)
    assert d.profile == "jetson-agx-orin-64gb"
    assert d.l4t_release == "R35.4.1" and d.power_modes[0] == "MAXN"


def test_detect_xavier_nx_jetpack4(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        model="NVIDIA Jetson Xavier NX Developer Kit",
        release="# R32 (release), REVISION: 7.4, GCID: 33514132, BOARD: t186ref, EABI: aarch64, "
        "DATE: Fri Jun  9 04:25:08 UTC 2023\n",
        nvpmodel=("nvpmodel_t194_p3668.conf", XAVIER_NX_NVPMODEL),
    )
    d = detect_device(root)
    assert d.profile == "jetson-xavier-nx"
    assert d.l4t_release == "R32.7.4" and d.default_power_mode == 2


def test_detect_custom_carrier_by_module_part_number(tmp_path: Path) -> None:
    # A third-party carrier board renames the model; the module part number still tells.
    root = _tree(
        tmp_path,
        model="Acme Vision Box rev B",
        compatible=["acme,visionbox+p3767-0000", "nvidia,p3767-0000", "nvidia,tegra234"],
        release="# R35 (release), REVISION: 3.1, GCID: 32827747, BOARD: t186ref, EABI: aarch64, "
        "DATE: Sun Mar 19 15:19:21 UTC 2023\n",
    )
    d = detect_device(root)
    assert d.profile == "jetson-orin-nx-16gb" and "p3767-0000" in d.reason


def test_detect_by_nvpmodel_file_alone(tmp_path: Path) -> None:
    root = _tree(tmp_path, nvpmodel=("nvpmodel_p3701_0005.conf", AGX_ORIN_NVPMODEL))
    assert detect_profile(root) == "jetson-agx-orin-64gb"


def test_detect_unknown_jetson_falls_back_to_frugal_profile(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        release="# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, "
        "DATE: Sat Feb 19 17:05:08 UTC 2022\n",
    )
    d = detect_device(root)
    assert d.profile == "jetson-orin-nano-8gb" and d.is_jetson and "no matching profile" in d.reason


def test_detect_x86(tmp_path: Path) -> None:
    d = detect_device(_tree(tmp_path))
    assert d.profile == "x86-dev" and not d.is_jetson and "not a Jetson" in d.reason
    assert detect_profile(tmp_path / "does-not-exist") == "x86-dev"


def test_parse_nvpmodel_conf_without_default() -> None:
    assert parse_nvpmodel_conf("< POWER_MODEL ID=3 NAME=25W >\n") == ({3: "25W"}, None)


def _meminfo(root: Path, mem_total_kb: int) -> None:
    """/proc/meminfo as the kernel writes it (first lines)."""
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc/meminfo").write_text(
        f"MemTotal:       {mem_total_kb:>9d} kB\n"
        "MemFree:         5871232 kB\n"
        "MemAvailable:    6398524 kB\n"
        "Buffers:           23164 kB\n"
        "Cached:           673060 kB\n"
        "SwapCached:            0 kB\n"
    )


R36_3 = (
    "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, "
    "DATE: Fri Jul 19 23:24:25 UTC 2024\n# KERNEL_VARIANT: oot\n"
)


def test_detect_orin_nx_8gb_by_part_number_with_a_scaled_budget(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        model="NVIDIA Jetson Orin NX Engine Reference Carrier Board",
        compatible=["nvidia,p3768-0000+p3767-0001", "nvidia,p3767-0001", "nvidia,tegra234"],
        release=R36_3,
    )
    _meminfo(root, 7620400)
    d = detect_device(root)
    assert d.profile == "jetson-orin-nx-16gb" and d.is_jetson
    assert (d.part_number, d.module) == ("p3767-0001", "Orin NX 8GB")
    assert d.l4t_release == "R36.3.0" and "p3767-0001" in d.reason
    # Half of MemTotal (7441 MB), not the 16GB module's 8192 MB, which is all of its RAM.
    assert d.memory_total_mb == 7441 and d.memory_budget_mb == 3712
    assert "memory budget 3712 MB" in d.reason
    cfg = d.apply(load_profile(d.profile))
    assert cfg.device.memory_budget_mb == 3712 < d.memory_total_mb


def test_detect_agx_orin_32gb_budget_from_meminfo_else_nominal_ram(tmp_path: Path) -> None:
    compatible = ["nvidia,p3737-0000+p3701-0004", "nvidia,p3701-0004", "nvidia,tegra234"]
    root = _tree(
        tmp_path / "a",
        model="NVIDIA Jetson AGX Orin Developer Kit",
        compatible=compatible,
        release=R36_3,
    )
    d = detect_device(root)
    assert d.profile == "jetson-agx-orin-64gb" and d.module == "AGX Orin 32GB"
    # No /proc/meminfo: the part number's nominal 32 GB, halved (not the 64GB's 32,768).
    assert d.memory_total_mb == 32768 and d.memory_budget_mb == 16384
    assert "nominal RAM" in d.reason
    _meminfo(root, 31268864)  # 30536 MB, as tegrastats' RAM field shows on this module
    d = detect_device(root)
    assert d.memory_total_mb == 30536 and d.memory_budget_mb == 15232
    assert "MemTotal 30536 MB" in d.reason


def test_detect_orin_nano_4gb_gets_a_budget_under_its_ram(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        model="NVIDIA Jetson Orin Nano Developer Kit",
        compatible=["nvidia,p3768-0000+p3767-0004", "nvidia,p3767-0004", "nvidia,tegra234"],
        release=R36_3,
    )
    _meminfo(root, 3735532)  # 3648 MB
    d = detect_device(root)
    assert d.profile == "jetson-orin-nano-8gb" and d.module == "Orin Nano 4GB"
    assert d.memory_budget_mb == 1344  # 37.5 % of 3648 MB, not the 8GB profile's 3072


def test_detect_part_number_wins_over_the_model_string(tmp_path: Path) -> None:
    # An Orin NX module in a carrier whose model string names another board.
    root = _tree(
        tmp_path,
        model="NVIDIA Jetson Orin Nano Developer Kit",
        compatible=["nvidia,p3768-0000+p3767-0000", "nvidia,p3767-0000", "nvidia,tegra234"],
    )
    d = detect_device(root)
    assert d.profile == "jetson-orin-nx-16gb" and d.part_number == "p3767-0000"
    assert d.memory_budget_mb == 8192  # nominal 16 GB, halved: the profile's own budget


def test_detect_xavier_nx_by_its_nvpmodel_file_name(tmp_path: Path) -> None:
    # L4T names Xavier NX's file nvpmodel_t194_p3668.conf, with no SKU after the part.
    root = _tree(tmp_path, nvpmodel=("nvpmodel_t194_p3668.conf", XAVIER_NX_NVPMODEL))
    _meminfo(root, 7950652)
    d = detect_device(root)
    assert d.profile == "jetson-xavier-nx" and d.part_number == "p3668"
    assert d.default_power_mode == 2 and d.memory_budget_mb == 2880


def test_detect_x86_keeps_the_profile_budget(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    _meminfo(root, 32768000)
    d = detect_device(root)
    assert d.profile == "x86-dev" and d.memory_budget_mb is None
    cfg = load_profile("x86-dev")
    assert d.apply(cfg) == cfg


def test_memory_budget_fractions_never_take_all_ram() -> None:
    from edge_runtime.config.detect import MEMORY_BUDGET_FRACTION, memory_budget_mb

    assert set(MEMORY_BUDGET_FRACTION) == set(JETSONS)
    assert all(0 < f <= 0.5 for f in MEMORY_BUDGET_FRACTION.values())
    # The nominal module each profile is named for gets exactly the profile's budget.
    for name, ram_mb in (
        ("jetson-orin-nano-8gb", 8192),
        ("jetson-orin-nx-16gb", 16384),
        ("jetson-agx-orin-64gb", 65536),
        ("jetson-xavier-nx", 8192),
    ):
        assert memory_budget_mb(name, ram_mb) == load_profile(name).device.memory_budget_mb
        assert memory_budget_mb(name, ram_mb // 2) < ram_mb // 2
    assert memory_budget_mb("x86-dev", 16384) is None
    assert memory_budget_mb("jetson-orin-nano-8gb", None) is None


# -- CLI ------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    """Run `edge-runtime profile ...` the way cli.main does (EdgeRuntimeError -> exit 2)."""
    parser = argparse.ArgumentParser(prog="edge-runtime")
    profile_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except EdgeRuntimeError:
        return 2


def test_cli_validate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = [str(profiles_dir() / f"{n}.yaml") for n in sorted(EXPECTED)]
    assert _cli(["profile", "validate", *good]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapt:\n  label_budget: -10\n")
    capsys.readouterr()
    assert _cli(["profile", "validate", good[0], str(bad)]) == 2
    err = capsys.readouterr().err
    assert "adapt.label_budget" in err and str(bad) in err
    typo = tmp_path / "typo.yaml"
    typo.write_text("hdc:\n  dimension: 10\n")
    assert _cli(["profile", "validate", str(typo)]) == 2
    assert "hdc.dimension: unknown key" in capsys.readouterr().err
    claims = tmp_path / "claims.yaml"
    claims.write_text("adapt:\n  nas: true\nhdc:\n  packed: false\n")
    assert _cli(["profile", "validate", str(claims)]) == 2
    err = capsys.readouterr().err
    assert "adapt.nas" not in err
    assert "hdc.packed: not implemented yet" in err


def test_cli_show_list_detect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["profile", "show", "jetson-xavier-nx", "--set", "adapt.label_budget=50"]) == 0
    out = capsys.readouterr().out
    assert "label_budget: 50" in out and "precision: fp16" in out
    assert _cli(["profile", "show", "no-such-board"]) == 2
    assert _cli(["profile", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in EXPECTED)
    root = _tree(tmp_path, model="NVIDIA Jetson Xavier NX Developer Kit")
    assert _cli(["profile", "detect", "--root", str(root)]) == 0
    assert "profile: jetson-xavier-nx" in capsys.readouterr().out


def test_cli_show_output_is_a_loadable_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(["profile", "show", "jetson-orin-nano-8gb"]) == 0
    path = tmp_path / "shown.yaml"
    path.write_text(capsys.readouterr().out)
    assert load_profile(path) == load_profile("jetson-orin-nano-8gb")


def test_cli_through_main_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    from edge_runtime import cli

    # A subcommand module that fails to import must fail this test, not skip it.
    cli.build_parser()
    assert cli.main(["profile", "validate", *sorted(EXPECTED)]) == 0
    assert cli.main(["profile", "show", "x86-dev", "--set", "hdc.packed=false"]) == 2
    assert "hdc.packed: not implemented yet" in capsys.readouterr().err
    assert cli.main(["profile", "show", "no-such-board"]) == 2
