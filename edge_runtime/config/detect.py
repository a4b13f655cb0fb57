"""Which device profile fits the machine we are running on.

Evidence, strongest first (part numbers before names: a model string does not say how
much RAM the module has, and custom carriers rename it):

1. ``/proc/device-tree/compatible``: module part numbers, e.g.
   ``nvidia,p3768-0000+p3767-0001\x00nvidia,p3767-0001\x00nvidia,tegra234`` (Orin NX 8GB
   on the reference carrier).
2. ``/etc/nvpmodel.conf``: a symlink to the board's nvpmodel file, whose name carries the
   part number (``nvpmodel_p3767_0003.conf``; Xavier NX: ``nvpmodel_t194_p3668.conf``)
   and which lists the power modes.
3. ``/proc/device-tree/model``: the board's model string, e.g. ``NVIDIA Jetson AGX Orin
   Developer Kit`` (NUL-terminated, as the kernel exposes device-tree strings).
4. ``/etc/nv_tegra_release``: present on every L4T image; names the L4T release
   (R32 = JetPack 4, R35 = JetPack 5, R36 = JetPack 6).

The memory budget is scaled to the module: ``MemTotal`` from ``/proc/meminfo`` (else the
part number's nominal RAM) times the profile's :data:`MEMORY_BUDGET_FRACTION`, never all of
RAM. ``Detection.memory_budget_mb`` holds it and :meth:`Detection.apply` sets it on a config.

Nothing of that present means an ordinary computer: ``x86-dev``. Every path is read
under ``root`` so tests can point detection at a fake filesystem tree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_runtime.config.schema import RuntimeConfig

DEFAULT_PROFILE = "x86-dev"
# An unrecognised Jetson gets the most frugal Orin profile: safe budgets beat a crash.
UNKNOWN_JETSON_PROFILE = "jetson-orin-nano-8gb"

# (pattern on the lowercased model string, profile). Order matters: "orin nano" before "orin".
_MODEL_RULES: tuple[tuple[str, str], ...] = (
    (r"orin nano", "jetson-orin-nano-8gb"),
    (r"orin nx", "jetson-orin-nx-16gb"),
    (r"agx orin|orin agx", "jetson-agx-orin-64gb"),
    (r"xavier nx", "jetson-xavier-nx"),
)


@dataclass(frozen=True)
class Module:
    """A Jetson module by part number: its name, its profile and its nominal RAM."""

    part: str
    name: str
    profile: str
    ram_mb: int | None


# Module part numbers (Jetson module data sheets / L4T board names). p3767: Orin NX and
# Orin Nano; p3701: AGX Orin; p3668: Xavier NX. The bare "p3668" comes from Xavier NX's
# nvpmodel file name (nvpmodel_t194_p3668.conf), which does not say which SKU.
_MODULES: tuple[Module, ...] = (
    Module("p3767-0000", "Orin NX 16GB", "jetson-orin-nx-16gb", 16384),
    Module("p3767-0001", "Orin NX 8GB", "jetson-orin-nx-16gb", 8192),
    Module("p3767-0003", "Orin Nano 8GB", "jetson-orin-nano-8gb", 8192),
    Module("p3767-0004", "Orin Nano 4GB", "jetson-orin-nano-8gb", 4096),
    Module("p3767-0005", "Orin Nano 8GB (developer kit)", "jetson-orin-nano-8gb", 8192),
    Module("p3701-0000", "AGX Orin 32GB (developer kit)", "jetson-agx-orin-64gb", 32768),
    Module("p3701-0004", "AGX Orin 32GB", "jetson-agx-orin-64gb", 32768),
    Module("p3701-0005", "AGX Orin 64GB", "jetson-agx-orin-64gb", 65536),
    Module("p3701-0008", "AGX Orin Industrial 64GB", "jetson-agx-orin-64gb", 65536),
    Module("p3668-0000", "Xavier NX 8GB (developer kit)", "jetson-xavier-nx", 8192),
    Module("p3668-0001", "Xavier NX 8GB", "jetson-xavier-nx", 8192),
    Module("p3668-0003", "Xavier NX 16GB", "jetson-xavier-nx", 16384),
)
# A family's part number with an SKU not listed above: the profile, RAM unknown.
_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("p3767", "Orin NX / Orin Nano", UNKNOWN_JETSON_PROFILE),
    ("p3701", "AGX Orin", "jetson-agx-orin-64gb"),
    ("p3668", "Xavier NX", "jetson-xavier-nx"),
)
_PART = re.compile(r"(?<![a-z0-9])(p3767|p3701|p3668)(?:[-_](\d{4}))?(?!\d)")

# The share of the module's RAM a profile's runtime may use: the rest is for the OS, the
# camera pipeline and other applications, and on Jetson the GPU shares the same memory.
# Each is the profile's memory_budget_mb over its nominal module RAM (3 of 8 GB, 8 of 16,
# 32 of 64, 3 of 8); never 1.0.
MEMORY_BUDGET_FRACTION: dict[str, float] = {
    "jetson-orin-nano-8gb": 0.375,
    "jetson-orin-nx-16gb": 0.5,
    "jetson-agx-orin-64gb": 0.5,
    "jetson-xavier-nx": 0.375,
}
# Budgets are whole multiples of this many MB.
_BUDGET_STEP_MB = 64

_MEM_TOTAL = re.compile(r"^MemTotal:\s*(\d+)\s*kB", re.MULTILINE)
_L4T_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")
_POWER_MODEL = re.compile(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=(\S+)\s*>")
_PM_DEFAULT = re.compile(r"<\s*PM_CONFIG\s+DEFAULT=(\d+)\s*>")


@dataclass
class Detection:
    """The chosen profile and the evidence behind it."""

    profile: str
    reason: str
    model: str | None = None
    l4t_release: str | None = None
    nvpmodel_file: str | None = None
    power_modes: dict[int, str] = field(default_factory=dict)
    default_power_mode: int | None = None
    part_number: str | None = None  # e.g. "p3767-0001"
    module: str | None = None  # e.g. "Orin NX 8GB"
    memory_total_mb: int | None = None  # MemTotal, else the module's nominal RAM
    memory_budget_mb: int | None = None  # scaled to memory_total_mb; None: the profile's own

    @property
    def is_jetson(self) -> bool:
        return (
            self.model is not None or self.l4t_release is not None or self.part_number is not None
        )

    def apply(self, config: RuntimeConfig) -> RuntimeConfig:
        """``config`` with ``device.memory_budget_mb`` scaled to this module's memory."""
        if self.memory_budget_mb is None:
            return config
        return config.with_overrides({"device.memory_budget_mb": self.memory_budget_mb})


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def _under(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def _match(rules: tuple[tuple[str, str], ...], text: str) -> str | None:
    for pattern, profile in rules:
        if re.search(pattern, text):
            return profile
    return None


def read_l4t_release(root: str | os.PathLike[str] = "/") -> str | None:
    """``"R35.4.1"`` from /etc/nv_tegra_release, or None off-Jetson."""
    text = _read_text(_under(Path(root), "/etc/nv_tegra_release"))
    if text is None:
        return None
    m = _L4T_RELEASE.search(text)
    return f"R{m.group(1)}.{m.group(2)}" if m else "unknown"


def read_mem_total_mb(root: str | os.PathLike[str] = "/") -> int | None:
    """``MemTotal`` from /proc/meminfo in MB (kB // 1024), or None where unreadable."""
    text = _read_text(_under(Path(root), "/proc/meminfo"))
    m = _MEM_TOTAL.search(text) if text else None
    return int(m.group(1)) // 1024 if m else None


def find_module(text: str) -> Module | None:
    """The first Jetson module part number in ``text`` (compatible string, file name)."""
    for m in _PART.finditer(text.lower()):
        family, sku = m.group(1), m.group(2)
        if sku is not None:
            part = f"{family}-{sku}"
            for module in _MODULES:
                if module.part == part:
                    return module
        for prefix, name, profile in _FAMILIES:
            if prefix == family:
                return Module(f"{family}-{sku}" if sku else family, name, profile, None)
    return None


def memory_budget_mb(profile: str, memory_total_mb: int | None) -> int | None:
    """The profile's fraction of ``memory_total_mb``, rounded down; None if either is unknown."""
    fraction = MEMORY_BUDGET_FRACTION.get(profile)
    if fraction is None or not memory_total_mb:
        return None
    budget = int(memory_total_mb * fraction) // _BUDGET_STEP_MB * _BUDGET_STEP_MB
    return max(budget, _BUDGET_STEP_MB)


def parse_nvpmodel_conf(text: str) -> tuple[dict[int, str], int | None]:
    """Power modes ``{id: name}`` and the default mode id from an nvpmodel.conf text."""
    modes = {int(i): name for i, name in _POWER_MODEL.findall(text)}
    m = _PM_DEFAULT.search(text)
    return modes, (int(m.group(1)) if m else None)


def detect_device(root: str | os.PathLike[str] = "/") -> Detection:
    """Inspect ``root`` (``/`` on a real device) and pick a profile, saying why."""
    root = Path(root)
    model_text = _read_text(_under(root, "/proc/device-tree/model"))
    model = model_text.replace("\x00", "").strip() if model_text else None
    compatible = _read_text(_under(root, "/proc/device-tree/compatible")) or ""
    compatible = compatible.replace("\x00", " ").strip()
    l4t = read_l4t_release(root)

    nvp_path = _under(root, "/etc/nvpmodel.conf")
    nvp_text = _read_text(nvp_path)
    nvp_name = None
    modes: dict[int, str] = {}
    default_mode = None
    if nvp_text is not None:
        # The symlink target's name carries the module part number.
        nvp_name = os.readlink(nvp_path) if nvp_path.is_symlink() else nvp_path.name
        modes, default_mode = parse_nvpmodel_conf(nvp_text)

    meminfo_mb = read_mem_total_mb(root)

    def found(profile: str, reason: str, module: Module | None = None) -> Detection:
        total = meminfo_mb or (module.ram_mb if module else None)
        budget = memory_budget_mb(profile, total)
        extras = []
        if l4t:
            extras.append(f"L4T {l4t}")
        if modes:
            listed = ", ".join(f"{i}={n}" for i, n in sorted(modes.items()))
            extras.append(f"nvpmodel modes {listed}")
        if budget is not None:
            where = "MemTotal" if meminfo_mb else "nominal RAM"
            share = MEMORY_BUDGET_FRACTION[profile]
            extras.append(f"{where} {total} MB: memory budget {budget} MB ({share:.1%})")
        suffix = f" ({'; '.join(extras)})" if extras else ""
        return Detection(
            profile,
            reason + suffix,
            model,
            l4t,
            nvp_name,
            modes,
            default_mode,
            part_number=module.part if module else None,
            module=module.name if module else None,
            memory_total_mb=total,
            memory_budget_mb=budget,
        )

    for source, text in (
        ("/proc/device-tree/compatible", compatible),
        ("/etc/nvpmodel.conf", nvp_name or ""),
    ):
        module = find_module(text)
        if module is not None:
            return found(
                module.profile, f"{source} names module {module.part} ({module.name})", module
            )
    if model:
        profile = _match(_MODEL_RULES, model.lower())
        if profile:
            return found(profile, f"/proc/device-tree/model is {model!r}")
    if model or l4t or nvp_text is not None:
        what = f"model {model!r}" if model else "an L4T image"
        return found(
            UNKNOWN_JETSON_PROFILE,
            f"Jetson with no matching profile ({what}); using the most frugal Orin profile",
        )
    return Detection(
        DEFAULT_PROFILE,
        "no /proc/device-tree/model, /etc/nv_tegra_release or /etc/nvpmodel.conf: not a Jetson",
    )


def detect_profile(root: str | os.PathLike[str] = "/") -> str:
    """The name of the device profile that fits this machine (``x86-dev`` off-Jetson)."""
    return detect_device(root).profile
