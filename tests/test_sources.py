"""Frame sources with real parts: H.264 files written with PyAV, a GStreamer RTSP server on
loopback killed and restarted, a watched folder written to while it is read."""

from __future__ import annotations

import queue
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from edge_runtime.cli.demo import cached_scenario
from edge_runtime.data.stream import load_stream
from edge_runtime.fleet.thumbnails import encode_png
from edge_runtime.sources import (
    FrameFormat,
    Notice,
    SourceError,
    SourceReader,
    open_source,
    source_kind,
)

GRAY28 = FrameFormat(28, 28, 1)


def write_h264(path: Path, frames: np.ndarray, fps: int = 30) -> Path:
    """Real frames -> an H.264 mp4 (libx264, yuv420p, crf 18)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"crf": "18"}
        for img in frames:
            fmt = "gray" if img.ndim == 2 else "rgb24"
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format=fmt)):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


@pytest.fixture(scope="module")
def stream_frames() -> np.ndarray:
    return load_stream(cached_scenario("fashion-drift-mini")).images


def drain(reader: SourceReader, cv: threading.Condition, timeout: float) -> list:
    out = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with cv:
            raw = reader.take()
            if raw is None:
                if reader.finished:
                    break
                cv.wait(0.05)
                continue
        out.append(raw)
    return out


def test_h264_file_decodes_every_frame_close_to_the_original(
    tmp_path: Path, stream_frames: np.ndarray
) -> None:
    frames = stream_frames[:90]
    mp4 = write_h264(tmp_path / "clip.mp4", frames)
    src = open_source(str(mp4), frame_format=GRAY28)
    cv, notes = threading.Condition(), queue.Queue()
    reader = SourceReader(src, cv, notes).start()
    got = drain(reader, cv, 20)
    assert [r.number for r in got] == list(range(90))
    assert all(r.data.shape == (28, 28) and r.data.dtype == np.uint8 for r in got)
    err = np.abs(np.stack([r.data for r in got]).astype(int) - frames.astype(int)).mean()
    assert err < 4.0  # crf 18 on 28x28 frames: the codec's loss, a few grey levels
    assert reader.dropped == 0 and notes.get(timeout=2).kind == "ended"


def test_fps_cap_and_camera_rate_drop_policy(tmp_path: Path, stream_frames: np.ndarray) -> None:
    mp4 = write_h264(tmp_path / "clip.mp4", stream_frames[:60], fps=30)
    capped = open_source(str(mp4), frame_format=GRAY28, fps_cap=10)
    got = list(capped.frames())
    assert len(got) == 20 and capped.capped == 40  # 30 fps under a 10 fps cap: every third
    # Delivered at 300 frames/s to a consumer that never takes: newest wins, the rest drop.
    paced = open_source(str(mp4), frame_format=GRAY28, rate=300)
    assert paced.live
    cv = threading.Condition()
    reader = SourceReader(paced, cv, queue.Queue()).start()
    time.sleep(0.6)
    with cv:
        last = reader.take()
    assert reader.ended and reader.dropped == 59 and last is not None and last.number == 59


def test_bad_uris_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unknown source kind"):
        source_kind("notes.txt")
    with pytest.raises(SourceError, match="no such video file"):
        open_source(str(tmp_path / "missing.mp4"), frame_format=GRAY28)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(SourceError, match="cannot open"):
        open_source(str(bad), frame_format=GRAY28)
    with pytest.raises(SourceError, match="no such video device"):
        open_source("/dev/video97", frame_format=GRAY28)
    with pytest.raises(SourceError, match=r"cv2 is not installed|without GStreamer"):
        open_source("gst:videotestsrc ! appsink", frame_format=GRAY28)
    with pytest.raises(SourceError, match="no such directory"):
        open_source(f"dir:{tmp_path / 'nope'}", frame_format=GRAY28)
    with pytest.raises(SourceError, match=r"not a readable \.npz|not an \.npz"):
        (tmp_path / "x.npz").write_bytes(b"junk")
        open_source(str(tmp_path / "x.npz"), frame_format=GRAY28)
    with pytest.raises(SourceError, match="frame shape"):
        FrameFormat.parse("28by28")


def test_watched_directory_serves_arriving_files_once(
    tmp_path: Path, stream_frames: np.ndarray
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "a000.png").write_bytes(encode_png(stream_frames[0]))
    src = open_source(f"dir:{folder}", frame_format=GRAY28)
    cv, notes = threading.Condition(), queue.Queue()
    reader = SourceReader(src, cv, notes).start()
    # JPEG via FFmpeg, larger and RGB: converted to the 28x28 grey frame format.
    rgb = np.repeat(np.kron(stream_frames[1], np.ones((2, 2), np.uint8))[..., None], 3, axis=2)
    jpg = tmp_path / "b.jpg"
    with av.open(str(jpg), "w", format="image2") as c:
        s = c.add_stream("mjpeg", rate=1)
        s.width, s.height, s.pix_fmt = 56, 56, "yuvj420p"
        for pkt in [*s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")), *s.encode()]:
            c.mux(pkt)
    names = []
    for k in range(1, 8):  # files arrive while the reader runs
        name = f"a{k:03d}.png"
        tmp = folder / f".{name}.part"
        tmp.write_bytes(encode_png(stream_frames[k]))
        tmp.rename(folder / name)
        names.append(name)
        time.sleep(0.05)
    shutil.copy(jpg, folder / "a100.jpg")
    (folder / "a200.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    got = drain(reader, cv, 3.0)
    reader.stop()
    assert [r.tag for r in got] == ["a000.png", *names, "a100.jpg"]  # each once, in order
    for r, k in zip(got[:8], range(8), strict=True):
        assert np.array_equal(r.data, stream_frames[k])  # PNG is lossless, same shape: exact
    assert np.abs(got[-1].data.astype(int) - stream_frames[1]).mean() < 12  # JPEG, resized
    kinds = []
    while not notes.empty():
        n: Notice = notes.get_nowait()
        kinds.append(n.kind)
    assert "source_file_error" in kinds  # the broken PNG is reported and skipped


RTSP_SERVER = r"""
import sys, gi
gi.require_version("Gst", "1.0"); gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer, GLib
Gst.init(None)
server = GstRtspServer.RTSPServer()
server.set_service(sys.argv[1])
server.set_address("127.0.0.1")
f = GstRtspServer.RTSPMediaFactory()
f.set_launch("( videotestsrc is-live=true pattern=ball ! video/x-raw,width=64,height=48,"
             "framerate=30/1 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 "
             "! rtph264pay name=pay0 pt=96 )")
f.set_shared(True)
server.get_mount_points().add_factory("/cam", f)
server.attach(None)
print("ready", flush=True)
GLib.MainLoop().run()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_rtsp(script: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["/usr/bin/python3", str(script), str(port)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs Debian's python3-gi")
def test_rtsp_reconnects_after_the_server_is_killed_and_reports_the_gap(tmp_path: Path) -> None:
    script = tmp_path / "rtsp_server.py"
    script.write_text(RTSP_SERVER)
    port = _free_port()
    server = _start_rtsp(script, port)
    reader = None
    try:
        src = open_source(f"rtsp://127.0.0.1:{port}/cam", frame_format=GRAY28)
        src.inner.min_backoff_s, src.inner.max_backoff_s = 0.2, 1.0
        cv, notes = threading.Condition(), queue.Queue()
        reader = SourceReader(src, cv, notes).start()
        before = drain(reader, cv, 2.0)
        assert len(before) > 5
        server.kill()
        server.wait()
        time.sleep(1.0)  # the camera is down for a second
        server = _start_rtsp(script, port)
        after: list = []
        end = time.monotonic() + 15
        while time.monotonic() < end and len(after) < 10:
            after += drain(reader, cv, 0.5)
        kinds = {}
        while not notes.empty():
            n = notes.get_nowait()
            kinds.setdefault(n.kind, n.details)
        assert len(after) >= 10, kinds
        assert "source_disconnected" in kinds
        gap = kinds["source_gap"]
        assert gap["seconds"] >= 1.0 and gap["frames_missed"] >= 25  # 30 fps for >= 1 s
        assert after[0].number > before[-1].number  # numbering continues across the outage
    finally:
        if reader is not None:
            reader.stop()
        server.kill()
        server.wait()
