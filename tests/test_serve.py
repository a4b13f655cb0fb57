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
    # --rate 300 on 2 shared cores can drop frames; then the file ends before 900 are served.
    m = summary.metrics
    assert m["adaptations"] >= 1
    assert summary.stopped == ("max_frames" if m["frames_served"] >= 900 else "sources_ended")
    assert m["frames_served"] + m["frames_dropped"] + m["frames_rejected"] >= min(900, 1140)


class NanSource(BaseSource):
    """A real FrameSource whose every third frame is NaN (a broken float camera driver)."""

    def frames(self) -> Iterator[RawFrame]:
        rng = np.random.default_rng(0)
        self.notify("source_gap", {"seconds": 0.5})  # as RTSP reports a reconnect
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
    assert '"type": "source_gap"' in events and "source_source" not in events


# ------------------------------------------------------------------------- label expiry
def _flag_frames(events: list[dict]) -> list[int]:
    return [e["frame"] for e in events if e["type"] in ("drift", "novel_class")]


def test_expired_collection_resumes_the_monitor_so_later_drift_is_flagged(
    tmp_path: Path, scenario: Path
) -> None:
    """Unanswered, a collection keeps the monitor paused forever; ``expire_labels`` (submitted
    from another thread, as the inbox's deadline does) ends it and a later drift is flagged."""
    stream = load_stream(scenario)
    cfg = Runtime().config.with_overrides(
        {"encoder.input_size": 32, "hdc.dim": 2048, "adapt.label_budget": 20, "adapt.steps": 30}
    )
    fitted = Runtime(cfg, background=False)
    fitted.fit_base(stream.train_images, stream.train_labels)
    fitted.save(tmp_path / "base")  # one fit, three identical runtimes
    fitted.close()
    runs: dict[str, list[dict]] = {}
    for mode in ("never", "expire", "partial"):
        rt = Runtime.load(tmp_path / "base", background=False)
        events: list[dict] = []
        asked: list[int] = []
        done = False
        for a in range(0, len(stream.images), 32):
            dec = rt.process(stream.images[a : a + 32])
            events += dec.events
            asked += dec.indices[dec.label_request].tolist()
            if mode != "never" and not done and rt.labels.summary()["to_request"] == 0 and asked:
                if mode == "partial":  # 5 of the 20 answered, then the operator walks away
                    rt.feedback(np.array(asked[:5]), stream.labels[asked[:5]])
                fut = rt.commands.submit("expire_labels", reason="deadline")
                threading.Thread(target=fut.result, daemon=True).start()
                done = True
        rt.finish(wait=True)
        events += rt.drain_events()
        rt.close()
        runs[mode] = events
    assert len(_flag_frames(runs["never"])) == 1  # paused for the rest of the stream
    exp = next(e for e in runs["expire"] if e["type"] == "label_collection_expired")
    assert exp["labels"] == 0 and not exp["adapted"] and exp["missing"] == 20
    assert any(f > exp["frame"] for f in _flag_frames(runs["expire"]))
    assert not any(e["type"] == "adaptation_started" for e in runs["expire"][:20])
    part = next(e for e in runs["partial"] if e["type"] == "label_collection_expired")
    assert part["labels"] == 5 and part["adapted"]
    started = next(e for e in runs["partial"] if e["type"] == "adaptation_started")
    assert started["labels"] == 5 and started["trigger_frame"] == part["trigger_frame"]


def test_inbox_deadline_expires_the_request_and_telemetry_reaches_metrics(
    tmp_path: Path, scenario: Path
) -> None:
    """Nobody answers: at the deadline the request expires, the runtime's collection with it,
    and serving flags the drift again. Telemetry on: its readings are in /metrics."""
    out = tmp_path / "o"
    args = parse(
        *("--source", str(scenario), "--base", str(scenario), "--out", str(out)),
        *("--rate", "300", "--label-deadline-s", "0.3", "--metrics-port", "0"),
        *("--set", "telemetry.enabled=true", "--set", "telemetry.interval_s=0.2"),
    )
    server = serve.build(args)
    try:
        summary = server.run()
        port = server.http.port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.close()
        server.rt.close()
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    types = [e["type"] for e in events]
    expired = types.index("label_request_expired")
    assert types[expired + 1] == "label_collection_expired"
    assert events[expired + 1]["adapted"] is False
    assert any(f > events[expired]["frame"] for f in _flag_frames(events))
    manifest = json.loads(
        (Path(events[types.index("label_request_opened")]["folder"]) / "manifest.json").read_text()
    )
    assert manifest["status"] == "expired"
    for name in ("cpu_percent", "process_cpu_percent", "telemetry_rss_bytes", "capture_frames"):
        assert f"edge_runtime_{name}" in text, name
    assert summary.metrics["telemetry"]["process_rss_mb"] > 0
    assert summary.metrics["capture_ring"]["files"] > 0
    # The base fitted apart is saved in DIR/base: the next start loads it, frame shape and all.
    again = serve.build(
        parse(
            *("--source", str(scenario), "--checkpoint", str(out / "base")),
            *("--out", str(tmp_path / "again"), "--max-frames", "64", "--no-capture-ring"),
        )
    )
    try:
        assert again.opt.frame_format == FrameFormat(28, 28, 1)
        assert again.run().metrics["frames_served"] == 64
    finally:
        again.close()
        again.rt.close()
    assert not (tmp_path / "again" / "base").exists()


# ------------------------------------------------------------------------- fleet
def test_fleet_in_serve_alerts_reach_mqtt_and_labels_come_from_fleet(
    tmp_path: Path, scenario: Path, mosquitto
) -> None:
    import paho.mqtt.client as mqtt

    got: list[tuple[str, dict]] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: got.append((m.topic, json.loads(m.payload)))
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, *a: c.subscribe("edge/dev-serve/#", qos=1)
    sub.connect("127.0.0.1", mosquitto.port)
    sub.loop_start()
    assert subscribed.wait(10)
    out = tmp_path / "o"
    fleet = [
        *("--set", "fleet.enabled=true", "--set", f"fleet.port={mosquitto.port}"),
        *("--set", "fleet.device_id=dev-serve", "--set", f"fleet.outbox_dir={tmp_path / 'ob'}"),
    ]
    args = parse(
        *("--source", str(scenario), "--base", str(scenario), "--out", str(out)),
        *("--metrics-port", "0", "--labels", "fleet", "--max-frames", "600", *fleet),
    )
    server = serve.build(args)
    try:
        server.run()
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{server.http.port}/metrics", timeout=5)
            .read()
            .decode()
        )
    finally:
        server.close()
        server.rt.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any("labels/request" in t for t, _ in got):
        time.sleep(0.05)
    sub.loop_stop()
    sub.disconnect()
    assert "edge_runtime_outbox_messages" in text
    alerts = [body for topic, body in got if topic.endswith("/alerts")]
    alert_types = {a.get("type") for a in alerts}
    assert "drift" in alert_types and "source_opened" in alert_types, alert_types
    requests = [body for topic, body in got if topic.endswith("/labels/request")]
    assert requests and sum(len(r["body"]["frames"]) for r in requests) == 40
    # Labels came from the fleet, so the inbox was not read; nobody answered: no adaptation.
    events = (out / "events.jsonl").read_text()
    assert '"label_inbox_read"' not in events and '"adaptation_finished"' not in events
