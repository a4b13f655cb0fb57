"""Source kinds by URI: which module opens ``rtsp://...``, ``/dev/video0``, ``clip.mp4``.

Each kind is one line of :data:`SOURCES`: the URI schemes and file suffixes it takes and the
opener (``module:function``, imported only when a URI of that kind is opened, so serving a
file never imports OpenCV). A new kind is one module in this package plus one line here, or a
call to :func:`register_source` from outside.

The first kind whose scheme, suffix or test matches wins, in table order; a bare path that
names a directory is a watched image directory.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edge_runtime.sources.base import FrameSource, SourceError


@dataclass(frozen=True)
class SourceKind:
    name: str
    opener: str  # "module:function", the function taking the URI and returning a FrameSource
    schemes: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    test: Callable[[str], bool] | None = None

    def matches(self, uri: str) -> bool:
        scheme = urlsplit(uri).scheme.lower() if ":" in uri else ""
        if scheme and scheme in self.schemes:
            return True
        path = uri.split("?", 1)[0].lower()
        # A suffix names a local file: "file:" or no scheme (so rtsp://x/a.mp4 stays RTSP).
        if self.suffixes and scheme in ("", "file") and path.endswith(self.suffixes):
            return True
        return self.test is not None and self.test(uri)


def _is_v4l2(uri: str) -> bool:
    return uri.startswith("/dev/video")


def _is_dir(uri: str) -> bool:
    return ":" not in uri.split("/", 1)[0] and Path(uri).is_dir()


SOURCES: list[SourceKind] = [
    SourceKind("rtsp", "edge_runtime.sources.rtsp:open_rtsp", schemes=("rtsp", "rtsps")),
    SourceKind("v4l2", "edge_runtime.sources.v4l2:open_v4l2", ("v4l2",), test=_is_v4l2),
    SourceKind("gst", "edge_runtime.sources.gst:open_gst", schemes=("gst",)),
    SourceKind("dir", "edge_runtime.sources.directory:open_directory", ("dir",), test=_is_dir),
    SourceKind("npz", "edge_runtime.sources.npz:open_npz", ("npz",), (".npz",)),
    SourceKind(
        "video",
        "edge_runtime.sources.video:open_video",
        ("file",),
        (".mp4", ".mkv", ".avi", ".mov", ".webm"),
    ),
]


def register_source(kind: SourceKind) -> None:
    """Add a kind ahead of the built-in ones (a plug-in's scheme wins over a suffix match)."""
    SOURCES.insert(0, kind)


def source_kind(uri: str) -> SourceKind:
    """The kind that opens ``uri``; SourceError listing what is understood otherwise."""
    if not isinstance(uri, str) or not uri.strip():
        raise SourceError("empty source URI")
    for kind in SOURCES:
        if kind.matches(uri):
            return kind
    known = ", ".join(
        f"{k.name} ({'/'.join([*(s + ':' for s in k.schemes), *k.suffixes])})" for k in SOURCES
    )
    raise SourceError(f"{uri!r}: unknown source kind; understood: {known}, or a directory path")


def make_source(uri: str) -> FrameSource:
    """The (unopened) source for ``uri``."""
    kind = source_kind(uri)
    module, _, func = kind.opener.partition(":")
    opener = getattr(importlib.import_module(module), func)
    return opener(uri)
