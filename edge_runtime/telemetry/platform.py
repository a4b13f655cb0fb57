"""Is this a Jetson? (L4T release file or a Jetson device-tree model.)"""

from __future__ import annotations

import os

from edge_runtime.config.detect import detect_device


def is_jetson(root: str | os.PathLike[str] = "/") -> bool:
    """True on an NVIDIA Jetson (reads /etc/nv_tegra_release, /proc/device-tree/model)."""
    return detect_device(root).is_jetson
