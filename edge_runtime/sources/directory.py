"""A watched image directory (``dir:PATH``, or a directory path): every PNG or JPEG in it,
once each, in name order, and every one that arrives later.

Polling, not inotify: it works on every filesystem (NFS, bind mounts in containers) and a
poll of a folder costs microseconds. A file is served once its size and modification time
held still across two polls, so a file still being copied in is not read half-written
(writers that rename into place are served one poll sooner). PNGs are read by the project's
own decoder (:func:`edge_runtime.fleet.thumbnails.decode_png`); JPEGs by FFmpeg through PyAV.
A file that cannot be read is reported (``source_file_error``) and skipped; serving goes on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av

from edge_runtime.errors import InputError
from edge_runtime.fleet.thumbnails import decode_png
from edge_runtime.sources.base import BaseSource, RawFrame, SourceError
from edge_runtime.sources.video import decode_frames, open_container

PNG_SUFFIXES = frozenset({".png"})
JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})


def read_image(path: Path) -> Any:
    """One image file -> a numpy image (PNG) or an ``av.VideoFrame`` (JPEG)."""
    suffix = path.suffix.lower()
    if suffix in PNG_SUFFIXES:
        return decode_png(path.read_bytes())
    if suffix in JPEG_SUFFIXES:
        container = open_container(str(path), str(path))
        try:
            return next(decode_frames(container)).data
        except (StopIteration, av.FFmpegError) as exc:
            raise SourceError(f"{path}: no decodable JPEG picture: {exc}") from exc
        finally:
            container.close()
    raise SourceError(f"{path}: not a PNG or JPEG file")


class DirectorySource(BaseSource):
    def __init__(self, uri: str, *, poll_s: float = 0.1) -> None:
        super().__init__(uri)
        self.path = Path(uri[len("dir:") :] if uri.startswith("dir:") else uri)
        self.poll_s = float(poll_s)
        self._seen: set[str] = set()
        self._pending: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) last poll
        self._wake = threading.Event()

    def open(self) -> None:
        if not self.path.is_dir():
            raise SourceError(f"{self.name}: no such directory")

    def _ready(self) -> list[Path]:
        """Image files unchanged since the previous poll and not yet served, by name."""
        ready: list[Path] = []
        try:
            entries = sorted(self.path.iterdir())
        except OSError as exc:
            raise SourceError(f"{self.name}: cannot list the directory: {exc}") from exc
        for p in entries:
            suffix = p.suffix.lower()
            if p.name in self._seen or p.name.startswith("."):
                continue
            if suffix not in PNG_SUFFIXES and suffix not in JPEG_SUFFIXES:
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue  # moved away between listing and stat
            sig = (st.st_size, st.st_mtime_ns)
            if self._pending.get(p.name) == sig and st.st_size > 0:
                ready.append(p)
            else:
                self._pending[p.name] = sig
        return ready

    def frames(self) -> Iterator[RawFrame]:
        n = 0
        while not self.closed:
            for p in self._ready():
                self._seen.add(p.name)
                self._pending.pop(p.name, None)
                try:
                    data = read_image(p)
                except (InputError, OSError) as exc:  # SourceError is an InputError
                    self.notify("source_file_error", {"file": p.name, "error": str(exc)})
                    continue
                yield RawFrame(data, n, tag=p.name)
                n += 1
                if self.closed:
                    return
            self._wake.wait(self.poll_s)

    def close(self) -> None:
        super().close()
        self._wake.set()


def open_directory(uri: str) -> DirectorySource:
    return DirectorySource(uri)
