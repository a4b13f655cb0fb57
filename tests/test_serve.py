"""``edge-runtime serve`` end to end with real parts: an H.264 file, HTTP /metrics, a label
inbox answered by a scripted operator, a failing source and NaN frames."""

from __future__ import annotations

import argparse
import csv
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from edge_runtime.cli import serve
from edge_runtime.cli.demo import cached_scenario
from edge_runtime.data.stream import load_stream
from edge_runtime.runtime import Runtime
from edge_runtime.serving import LiveServe, ServeOptions
from edge_runtime.sources import FrameFormat, RawFrame, ShapedSource
from edge_runtime.sources.base import BaseSource

FAST = ["--set", "encoder.input_size=32", "--set", "hdc.dim=2048", "--set", "adapt.steps=60"]
FAST += ["--label-budget", "40", "--no-progress"]


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    serve.register(p.add_subparsers())
    return p.parse_args(["serve", *argv, *FAST])


@pytest.fixture(scope="module")
def scenario() -> Path:
    return cached_scenario("fashion-drift-mini")


def write_h264(path: Path, frames: np.ndarray) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt, s.options = 28, 28, "yuv420p", {"crf": "18"}
        for img in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="gray")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def test_h264_file_served_end_to_end_metrics_over_http(tmp_path: Path, scenario: Path) -> None:
    stream = load_stream(scenario)
    mp4 = write_h264(tmp_path / "clip.mp4", stream.images[:400])
    batches: list[tuple[np.ndarray, np.ndarray]] = []
    server = serve.build(
        parse(
            "--source",
            str(mp4),
            "--base",
            str(scenario),
            "--out",
            str(tmp_path / "o"),
            "--metrics-port",
            "0",
        )
    )
    server.observers.append(lambda it: batches.append((it.batch.images, it.decisions.prediction)))
    try:
        summary = server.run()
        port = server.http.port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status
    finally:
        server.close()
        server.rt.close()
    line = next(x for x in text.splitlines() if x.startswith("edge_runtime_frames_served_total{"))
    assert float(line.rsplit(" ", 1)[1]) == 400 == summary.metrics["frames_served"]
    assert "edge_runtime_decision_latency_seconds_bucket" in text and ready == 200
    assert summary.stopped == "sources_ended"
    # The same decoded frames through Runtime.process, same batches: the same decisions.
    rt = Runtime(server.rt.config, background=False)
    rt.fit_base(stream.train_images, stream.train_labels)
    for images, pred in batches:
        assert np.array_equal(rt.process(images).prediction, pred)
    # Against the original (not encoded) frames: the codec's loss changes few decisions.
    decoded = np.concatenate([b[0] for b in batches])
    orig = rt.predict_eval(stream.images[:400])[0]
    agree = (rt.predict_eval(decoded)[0] == orig).mean()
    assert agree >= 0.85, agree
    rt.close()


def test_label_inbox_loop_drift_capture_csv_adaptation(tmp_path: Path, scenario: Path) -> None:
    stream = load_stream(scenario)
    out = tmp_path / "o"
    server = serve.build(
        parse(
            "--source",
            str(scenario),
            "--base",
            str(scenario),
            "--out",
            str(out),
            "--rate",
            "300",
            "--max-frames",
            "900",
        )
    )
    stop = threading.Event()

    def operator() -> None:  # a person who labels every frame in a complete request
        while not stop.is_set():
            for manifest in (out / "capture").glob("*/manifest.json"):
                m = json.loads(manifest.read_text())
                if len(m["frames"]) >= m["labels_wanted"] and m["status"] == "open":
                    part = out / "inbox" / f".{m['request']}.part"
                    with part.open("w", newline="") as fh:
                        w = csv.writer(fh)
                        w.writerow(["frame_id", "label"])
                        for f in m["frames"]:
                            w.writerow([f["frame_id"], int(stream.labels[f["source_frame"]])])
                    part.rename(out / "inbox" / f"{m['request']}.csv")
                    return
            time.sleep(0.05)

    t = threading.Thread(target=operator, daemon=True)
    t.start()
    try:
        summary = server.run()
    finally:
        stop.set()
        server.close()
        server.rt.close()
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    types = [e["type"] for e in events]
    assert "drift" in types and "label_request_opened" in types
    assert "label_inbox_read" in types and "adaptation_finished" in types
    req = next(e for e in events if e["type"] == "label_request_opened")
    pngs = list(Path(req["folder"]).glob("*.png"))
    assert len(pngs) == 40
    assert summary.metrics["adaptations"] >= 1 and summary.stopped == "max_frames"


class NanSource(BaseSource):
    """A real FrameSource whose every third frame is NaN (a broken float camera driver)."""

    def frames(self) -> Iterator[RawFrame]:
        rng = np.random.default_rng(0)
        for i in range(30):
            img = rng.random((28, 28), dtype=np.float32)
            yield RawFrame(np.full((28, 28), np.nan) if i % 3 == 0 else img, i)


def test_failing_source_reported_nan_rejected_others_go_on(tmp_path: Path, scenario: Path) -> None:
    stream = load_stream(scenario)
    rt = Runtime(Runtime().config.with_overrides({"encoder.input_size": 32, "hdc.dim": 2048}))
    rt.fit_base(stream.train_images, stream.train_labels)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    opts = ServeOptions(
        sources=[str(bad), "rtsp://127.0.0.1:9/none", str(scenario)],
        out_dir=tmp_path / "o",
        frame_format=FrameFormat(28, 28, 1),
        max_frames=200,
        extra_sources=[ShapedSource(NanSource("nan-cam"), FrameFormat(28, 28, 1))],
    )
    with LiveServe(rt, opts) as server:
        summary = server.run()
    rt.close()
    m = summary.metrics
    assert m["sources"][str(bad)]["state"] == "failed"
    assert m["sources"]["rtsp://127.0.0.1:9/none"]["state"] == "failed"
    assert m["sources"]["nan-cam"]["rejected"] == 10 and m["sources"]["nan-cam"]["served"] == 20
    assert m["frames_served"] + m["frames_rejected"] == 200
    events = (tmp_path / "o" / "events.jsonl").read_text()
    assert events.count('"source_failed"') == 2 and '"frame_rejected"' in events
