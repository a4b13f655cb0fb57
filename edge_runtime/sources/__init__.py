"""Frame sources for live serving: video files, RTSP, V4L2 cameras, GStreamer pipelines,
watched image folders and stream files, behind one :class:`FrameSource` contract.

========================  ==================================================================
``sources.base``          :class:`FrameSource` (the protocol), :class:`RawFrame`,
                          :class:`SourceError`
``sources.registry``      URI -> source kind (:data:`SOURCES`, :func:`register_source`)
``sources.frames``        :class:`FrameFormat`: the one conversion to the encoder's frames
``sources.shaping``       :func:`open_source`: conversion, ``fps_cap``, camera-rate delivery
``sources.reader``        :class:`SourceReader`: a thread per source, newest frame wins
``sources.video``         video files through PyAV (and the shared PyAV decode loop)
``sources.rtsp``          RTSP through PyAV, reconnect with capped backoff, gaps reported
``sources.v4l2``          ``/dev/videoN`` through PyAV's v4l2 input
``sources.gst``           ``gst:`` pipelines through OpenCV with GStreamer
``sources.directory``     a watched folder of PNG/JPEG files, each served once
``sources.npz``           stream files
========================  ==================================================================
"""

from __future__ import annotations

from edge_runtime.sources.base import FrameSource, RawFrame, SourceError
from edge_runtime.sources.frames import FrameFormat, stack_frames
from edge_runtime.sources.reader import Notice, SourceReader
from edge_runtime.sources.registry import SOURCES, SourceKind, register_source, source_kind
from edge_runtime.sources.shaping import ShapedSource, open_source

__all__ = [
    "SOURCES",
    "FrameFormat",
    "FrameSource",
    "Notice",
    "RawFrame",
    "ShapedSource",
    "SourceError",
    "SourceKind",
    "SourceReader",
    "open_source",
    "register_source",
    "source_kind",
    "stack_frames",
]
