"""A torch C++/CUDA extension built on first use, once per process, remembering why it could not.

Nothing compiles at import time: the first call that needs the kernels builds them (cached in
TORCH_EXTENSIONS_DIR, so later processes only load the .so) and logs one line. When the build
is impossible or fails, ``load()`` returns None and ``failure`` says why; callers fall back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)


class JitExtension:
    def __init__(
        self,
        what: str,
        name: Callable[[], str],
        sources: Sequence[Path],
        *,
        precondition: Callable[[], str | None] = lambda: None,
        **build: Any,
    ) -> None:
        self.what, self._name, self._sources, self._build = what, name, sources, build
        self._precondition = precondition  # returns why the build must not be tried, or None
        self._lock = threading.Lock()
        self._module: ModuleType | None = None
        self.failure: str | None = None

    def load(self) -> ModuleType | None:
        """The compiled module, or None if it cannot be built here (reason in ``failure``)."""
        if self._module is not None or self.failure is not None:
            return self._module
        with self._lock:
            if self._module is not None or self.failure is not None:
                return self._module
            self.failure = self._precondition()
            if self.failure is not None:
                return None
            try:
                from torch.utils import cpp_extension

                name = self._name()
                log.info("loading %s (%s; built on first use, then cached)", self.what, name)
                self._module = cpp_extension.load(
                    name=name, sources=[str(s) for s in self._sources], verbose=False, **self._build
                )
            except Exception as exc:  # no compiler, no ninja, build error: fall back, say why
                last = str(exc).strip().splitlines()[-1:] or [""]
                self.failure = f"{type(exc).__name__}: {last[0]}"
                log.warning("%s unavailable (%s)", self.what, self.failure)
            return self._module
