"""Lazy JIT build of the C++ CPU kernels (csrc/hdc_cpu.cpp) via torch's extension loader.

Nothing compiles at import time: the first call that needs the kernels builds them once
(cached in TORCH_EXTENSIONS_DIR, so later processes only load the .so) and logs one line.
If no compiler is available the loader returns None and callers use the torch/numpy path.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

from edge_runtime.kernels._jit import JitExtension

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "hdc_cpu.cpp"


def _cpu_tag() -> str:
    """Short hash of the CPU's feature flags: the build uses -march=native, so a cached
    binary must never be loaded on a CPU with fewer instructions (a shared cache dir)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((ln for ln in fh if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _disabled() -> str | None:
    return (
        "disabled by EDGE_RUNTIME_NO_CPP=1"
        if os.environ.get("EDGE_RUNTIME_NO_CPP") == "1"
        else None
    )


_EXTENSION = JitExtension(
    "HDC C++ CPU kernels",
    lambda: f"edge_runtime_hdc_cpu_{_cpu_tag()}",
    [_SOURCE],
    precondition=_disabled,
    extra_cflags=["-O3", "-march=native", "-fopenmp"],
    extra_ldflags=["-fopenmp"],
)


def load() -> ModuleType | None:
    """The compiled module, or None if it cannot be built here (reason in ``failure()``)."""
    return _EXTENSION.load()


def failure() -> str | None:
    return _EXTENSION.failure
