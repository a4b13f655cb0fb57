"""Which device profile fits the machine we are running on.

Evidence, strongest first:

1. ``/proc/device-tree/model``: the board's model string, e.g. ``NVIDIA Jetson AGX Orin
   Developer Kit`` (NUL-terminated, as the kernel exposes device-tree strings).
2. ``/proc/device-tree/compatible``: module part numbers, e.g. ``nvidia,p3767-0003``
   (Orin Nano 8GB); used when the model string names a custom carrier board.
3. ``/etc/nvpmodel.conf``: a symlink to the board's nvpmodel file (its name carries the
   part number, e.g. ``nvpmodel_p3767_0003.conf``) listing the power modes.
4. ``/etc/nv_tegra_release``: present on every L4T image; names the L4T release
   (R32 = JetPack 4, R35 = JetPack 5, R36 = JetPack 6).

Nothing of that present means an ordinary computer: ``x86-dev``. Every path is read
under ``root`` so tests can point detection at a fake filesystem tree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

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

# Module part numbers (Jetson module data sheets / L4T board names).
# p3767: Orin NX and Orin Nano modules; p3701: AGX Orin; p3668: Xavier NX.
_PART_RULES: tuple[tuple[str, str], ...] = (
    (r"p3767[-_]000[345]", "jetson-orin-nano-8gb"),  # 0003/0005: Nano 8GB, 0004: Nano 4GB
    (r"p3767[-_]000[01]", "jetson-orin-nx-16gb"),  # 0000: NX 16GB, 0001: NX 8GB
    (r"p3701[-_]\d{4}", "jetson-agx-orin-64gb"),
    (r"p3668[-_]\d{4}", "jetson-xavier-nx"),
)

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

    @property
    def is_jetson(self) -> bool:
        return self.model is not None or self.l4t_release is not None


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

    def found(profile: str, reason: str) -> Detection:
        extras = []
        if l4t:
            extras.append(f"L4T {l4t}")
        if modes:
            listed = ", ".join(f"{i}={n}" for i, n in sorted(modes.items()))
            extras.append(f"nvpmodel modes {listed}")
        suffix = f" ({'; '.join(extras)})" if extras else ""
        return Detection(profile, reason + suffix, model, l4t, nvp_name, modes, default_mode)

    if model:
        profile = _match(_MODEL_RULES, model.lower())
        if profile:
            return found(profile, f"/proc/device-tree/model is {model!r}")
    for source, text in (
        ("/proc/device-tree/compatible", compatible),
        ("/etc/nvpmodel.conf", nvp_name or ""),
    ):
        profile = _match(_PART_RULES, text.lower())
        if profile:
            return found(profile, f"{source} names module {text!r}")
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
