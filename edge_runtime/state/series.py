"""A folder of numbered checkpoints: write a new one, keep the last ``keep``, load the newest
one that is intact.

Layout::

    <root>/ckpt-000001/   manifest.json + tensors.safetensors (see :mod:`.checkpoint`)
    <root>/ckpt-000002/
    ...

Every checkpoint gets a new name, so writing one never touches the previous ones: a SIGKILL
during a write leaves at worst a temporary sibling (removed by the next write) and the older
checkpoints intact. Old ones are deleted only after the new one is complete and fsynced.

:meth:`CheckpointSeries.load_newest` tries them newest first. A damaged one (truncated, a
flipped byte anywhere: both files carry a SHA-256) is skipped with a warning that names it; an
intact one that this build must not load (another format version, another encoder; an
:class:`~edge_runtime.state.checkpoint.IncompatibleCheckpoint`) stops the resume with that
error: an older checkpoint of the same run would be just as wrong, and loading half of one
is never an option.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from edge_runtime.errors import CheckpointError
from edge_runtime.state.atomic import fsync_dir
from edge_runtime.state.checkpoint import IncompatibleCheckpoint, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

PREFIX = "ckpt-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
DEFAULT_KEEP = 3

T = TypeVar("T")


class CheckpointSeries:
    """Numbered checkpoints under ``root``; see the module docstring."""

    def __init__(self, root: str | os.PathLike[str], *, keep: int = DEFAULT_KEEP) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = int(keep)

    def paths(self) -> list[Path]:
        """The checkpoints present, newest first (by number, not by mtime: clocks jump)."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            m = _NAME.match(child.name)
            if m and child.is_dir():
                found.append((int(m.group(1)), child))
        return [p for _, p in sorted(found, reverse=True)]

    def _next_number(self) -> int:
        paths = self.paths()
        return int(_NAME.match(paths[0].name).group(1)) + 1 if paths else 1  # type: ignore[union-attr]

    def save(self, state: Any, *, kind: str) -> Path:
        """Write ``state`` as the next checkpoint, then drop all but the newest ``keep``."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = save_checkpoint(self.root / f"{PREFIX}{self._next_number():06d}", state, kind=kind)
        for old in self.paths()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        for child in self.root.iterdir():
            # Temporary builds and aside copies of numbered checkpoints a crash left behind:
            # every name is written once, so none of them is the only copy of anything.
            if child.name.startswith(f".{PREFIX}"):
                shutil.rmtree(child, ignore_errors=True)
        fsync_dir(self.root)
        return path

    def load_newest(
        self, *, kind: str, build: Callable[[Any, Path], T] | None = None
    ) -> tuple[Path, T] | None:
        """``(path, state)`` of the newest intact checkpoint (``build(state, path)`` applied when
        given, so a state the codec rejects as damaged also falls back to an older one), or
        None when there is none. Raises :class:`IncompatibleCheckpoint` for one this build must
        not load."""
        for path in self.paths():
            try:
                state = load_checkpoint(path, kind=kind)
                return path, (build(state, path) if build is not None else state)
            except IncompatibleCheckpoint:
                raise
            except CheckpointError as exc:
                log.warning("skipping damaged checkpoint %s: %s", path, exc)
        return None
