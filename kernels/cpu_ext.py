"""Lazy JIT build of the C++ CPU kernels (csrc/hdc_cpu.cpp) via torch's extension loader.

Nothing compiles at import time: the first call that needs the kernels builds them once
(cached in TORCH_EXTENSIONS_DIR, so later processes only load the .so) and logs one line.
If no compiler is available the loader returns None and callers use the torch/numpy path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "hdc_cpu.cpp"
_lock = threading.Lock()
_module: ModuleType | None = None
_failed: str | None = None


def _cpu_tag() -> str:
    """Short hash of the CPU's feature flags: the build uses -march=native, so a cached
    binary must never be loaded on a CPU with fewer instructions (a shared cache dir)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((ln for ln in fh if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def load() -> ModuleType | None:
    """The compiled module, or None if it cannot be built here (reason in ``failure()``)."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        if os.environ.get("EDGE_RUNTIME_NO_CPP") == "1":
            _failed = "disabled by EDGE_RUNTIME_NO_CPP=1"
            return None
        try:
            from torch.utils import cpp_extension

            name = f"edge_runtime_hdc_cpu_{_cpu_tag()}"
            log.info("compiling HDC C++ CPU kernels (%s; once, then cached)", name)
            _module = cpp_extension.load(
                name=name,
                sources=[str(_SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # no compiler, no ninja, build error: fall back, say why
            last = str(exc).strip().splitlines()[-1:] or [""]
            _failed = f"{type(exc).__name__}: {last[0]}"
            log.warning("HDC C++ CPU kernels unavailable, using the torch path (%s)", _failed)
        return _module


def failure() -> str | None:
    return _failed
