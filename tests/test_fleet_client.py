"""The device's fleet client against a real Mosquitto: outages, restarts, SIGKILL, commands,
passwords and ACLs; plus the label loop's PNG thumbnails.

Reconnect timing is pinned where a test restarts the broker: the test's subscriber must be
subscribed again before the client reconnects, or it would miss messages the client did send.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_runtime.commands import COMMANDS, CommandQueue
from edge_runtime.config.schema import FleetConfig
from edge_runtime.data.stream import FrameBatch
from edge_runtime.errors import ConfigError, InputError
from edge_runtime.events import EventLog, ListSink
from edge_runtime.fleet.broker import Broker, find_mosquitto, password_file
from edge_runtime.fleet.client import FleetClient
from edge_runtime.fleet.credentials import (
    PASSWORD_ENV,
    USERNAME_ENV,
    load_credentials,
    tls_context,
)
from edge_runtime.fleet.labels import FleetLabels
from edge_runtime.fleet.outbox import Outbox
from edge_runtime.fleet.payloads import CommandMessage, Envelope
from edge_runtime.fleet.thumbnails import decode_png, encode_png, thumbnail
from edge_runtime.runner.loop import ServedBatch
from edge_runtime.runtime import Decisions

DEV = "dev-1"


# ------------------------------------------------------------------------------ helpers
def wait_until(pred: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


class Collector:
    """A plain paho subscriber that keeps every message it gets, in arrival order."""

    def __init__(
        self,
        port: int,
        sub: str = "edge/#",
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.msgs: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"col-{uuid.uuid4().hex[:8]}")
        if username:
            self.c.username_pw_set(username, password)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(sub, qos=1)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self._subscribed.wait(5), "collector did not subscribe"

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.msgs.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def envelopes(self, channel: str) -> list[Envelope]:
        with self._lock:
            msgs = list(self.msgs)
        return [Envelope.from_json(p) for t, p, _ in msgs if t == f"edge/{DEV}/{channel}" and p]

    def seqs(self, channel: str = "alerts") -> list[int]:
        return [e.seq for e in self.envelopes(channel)]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def config(port: int, tmp_path: Path, **kw: Any) -> FleetConfig:
    base: dict[str, Any] = {
        "device_id": DEV,
        "port": port,
        "outbox_dir": tmp_path / "outbox",
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
        "heartbeat_s": 30.0,
    }
    return FleetConfig(**(base | kw))


def make_client(
    cfg: FleetConfig, events: EventLog | None = None, commands: CommandQueue | None = None
) -> tuple[FleetClient, EventLog, CommandQueue]:
    events = events or EventLog()
    commands = commands or CommandQueue()
    client = FleetClient(
        cfg,
        events=events,
        commands=commands,
        position=lambda: 123,
        software_version="test-1",
        encoder_hash="enc-abc",
    )
    events.add_sink(client)
    return client, events, commands


def first_occurrences(seqs: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for s in seqs:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


# ------------------------------------------------------------------------------ delivery
def test_events_written_while_broker_down_are_delivered(mosquitto: Broker, tmp_path: Path) -> None:
    mosquitto.stop()
    # Constant 3 s backoff: the client's first retry comes well after the collector is back.
    cfg = config(mosquitto.port, tmp_path, reconnect_min_s=3.0, reconnect_max_s=3.0)
    client, events, _ = make_client(cfg)
    t0 = time.monotonic()
    client.start()  # an unreachable broker must not raise
    script = [
        ("frame_rejected", 1),
        ("drift", 5),
        ("alert", 5),
        ("labels_requested", 6),
        ("adaptation_started", 9),
        ("adaptation_finished", 20),
        ("alert", 21),
    ] + [("frame_rejected", 30 + i) for i in range(23)]
    for etype, frame in script:
        events.emit(etype, frame, detail=etype)
    assert len(client.outbox) == len(script) == 30
    assert not client.connected
    time.sleep(max(0.0, 0.3 - (time.monotonic() - t0)))
    mosquitto.start()
    col = Collector(mosquitto.port)
    assert time.monotonic() - t0 < 2.5, "collector too slow; the test would race the client"
    try:
        assert wait_until(lambda: len(set(col.seqs())) == 30, 10), col.seqs()
        assert client.wait_flushed(5)
        alerts = {e.seq: e for e in col.envelopes("alerts")}
        got = [(alerts[s].type, alerts[s].body["frame"]) for s in sorted(alerts)]
        assert got == script
        lc = [alerts[s].body["lifecycle"] for s in sorted(alerts)]
        # drift opens dev-1:5; everything up to adaptation_finished carries it; then one-offs.
        assert lc[1:6] == [f"{DEV}:5"] * 5
        assert [alerts[s].body["phase"] for s in sorted(alerts)][1:6] == [
            "new",
            "update",
            "update",
            "update",
            "end",
        ]
        # The alert reporting the outcome joins the episode that just ended; later one-offs
        # each get their own id.
        assert lc[0] == f"{DEV}:frame_rejected:1" and lc[6] == f"{DEV}:5"
        assert len(set(lc[7:])) == 23 and f"{DEV}:5" not in lc[7:]
        births = col.envelopes("status")
        assert births and births[-1].type == "birth"
        b = births[-1].body
        assert b["state"] == "online" and b["bd_seq"] == 1
        assert b["encoder_hash"] == "enc-abc" and b["software_version"] == "test-1"
    finally:
        client.stop(2)
        col.close()


def test_broker_killed_mid_stream_every_seq_arrives_in_order(
    mosquitto: Broker, tmp_path: Path
) -> None:
    cfg = config(mosquitto.port, tmp_path, reconnect_min_s=2.0, reconnect_max_s=2.0)
    client, events, _ = make_client(cfg)
    col1 = Collector(mosquitto.port)
    client.start()
    assert wait_until(lambda: client.connected, 5)
    n, kill_at = 200, 80
    col2: Collector | None = None
    try:
        for i in range(n):
            events.emit("frame_rejected", i)
            if i == kill_at:
                mosquitto.stop(kill=True)
                time.sleep(0.2)
                mosquitto.start()
                col2 = Collector(mosquitto.port)  # subscribed before the client's 2 s retry
            if i < kill_at - 60 or i > kill_at:
                time.sleep(0.002)  # else a burst, so messages are in flight when it dies
        assert col2 is not None
        want = set(range(1, n + 1))
        assert wait_until(lambda: set(col1.seqs()) | set(col2.seqs()) >= want, 15)
        assert client.wait_flushed(5)
        seen = col1.seqs() + col2.seqs()
        assert set(seen) == want
        # De-dup by seq gives exactly the events, in the order they were emitted.
        order = first_occurrences(seen)
        assert order == sorted(order)
        by_seq = {e.seq: e for e in col1.envelopes("alerts") + col2.envelopes("alerts")}
        assert [by_seq[s].body["frame"] for s in order] == list(range(n))
        # A new connection, a new birth with the next bd_seq.
        assert wait_until(lambda: any(e.body["bd_seq"] == 2 for e in col2.envelopes("status")))
    finally:
        client.stop(2)
        col1.close()
        if col2 is not None:
            col2.close()


_DEVICE = """
import sys, time
from edge_runtime.commands import CommandQueue
from edge_runtime.config.schema import FleetConfig
from edge_runtime.events import EventLog
from edge_runtime.fleet.client import FleetClient

port, outdir, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cfg = FleetConfig(device_id="dev-1", port=port, outbox_dir=outdir, reconnect_min_s=0.2,
                  reconnect_max_s=0.5, heartbeat_s=30)
events = EventLog()
client = FleetClient(cfg, events=events, commands=CommandQueue(), position=lambda: 0,
                     software_version="t", encoder_hash="e")
events.add_sink(client)
client.start()
for i in range(n):
    events.emit("frame_rejected", i, reason="nan")
print("queued", flush=True)
while not client.connected:
    time.sleep(0.02)
print("connected", flush=True)
time.sleep(3600)
"""


def _device(port: int, outdir: Path, n: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _DEVICE, str(port), str(outdir), str(n)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, f"device process died (rc {proc.poll()})"
    return line


def _sigkill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkilled_device_delivers_its_outbox_and_dies_with_matching_will(
    mosquitto: Broker, tmp_path: Path
) -> None:
    outdir = tmp_path / "outbox"
    mosquitto.stop()
    first = _device(mosquitto.port, outdir, 40)
    try:
        assert _read_line(first) == "queued"  # 40 alerts durable in the outbox, none sent
    finally:
        _sigkill(first)
    mosquitto.start()
    col = Collector(mosquitto.port)
    second = _device(mosquitto.port, outdir, 0)
    try:
        assert _read_line(second) == "queued"
        assert _read_line(second) == "connected"
        assert wait_until(lambda: set(col.seqs()) == set(range(1, 41)), 10), col.seqs()
        assert wait_until(lambda: any(e.type == "birth" for e in col.envelopes("status")))
        birth = next(e for e in col.envelopes("status") if e.type == "birth")
        assert birth.body["bd_seq"] >= 1
        # A broker restart: the device reconnects with the next bd_seq, and the will it
        # registered for that connection must carry the same one.
        col.close()
        mosquitto.stop(kill=True)
        mosquitto.start()
        col = Collector(mosquitto.port)  # the new birth is retained: no race with the device
        bd = birth.body["bd_seq"] + 1
        assert wait_until(
            lambda: any(
                e.type == "birth" and e.body["bd_seq"] == bd for e in col.envelopes("status")
            ),
            10,
        ), [e.body for e in col.envelopes("status")]
    finally:
        _sigkill(second)
    # The broker publishes the Last Will: a death with the birth's bd_seq, retained.
    assert wait_until(lambda: any(e.type == "death" for e in col.envelopes("status")), 10)
    death = next(e for e in col.envelopes("status") if e.type == "death")
    assert death.body == {"state": "offline", "bd_seq": bd}
    late = Collector(mosquitto.port, sub=f"edge/{DEV}/status")
    try:
        assert wait_until(lambda: bool(late.msgs), 5)
        _, payload, retained = late.msgs[0]
        assert retained and Envelope.from_json(payload).type == "death"
    finally:
        late.close()
        col.close()


def test_clean_stop_publishes_offline_status(mosquitto: Broker, tmp_path: Path) -> None:
    client, events, _ = make_client(config(mosquitto.port, tmp_path, heartbeat_s=0.2))
    col = Collector(mosquitto.port)
    client.start()
    try:
        assert wait_until(lambda: client.connected, 5)
        events.emit("frame_rejected", 3)
        # Heartbeats: QoS 0, not through the outbox.
        assert wait_until(lambda: bool(col.envelopes("telemetry")), 5)
        beat = col.envelopes("telemetry")[0]
        assert beat.type == "heartbeat" and beat.body["frames_seen"] == 123
        assert isinstance(beat.body["readings"], dict) and "cpu_percent" in beat.body["readings"]
        assert client.stop(5)
        assert wait_until(lambda: any(e.type == "death" for e in col.envelopes("status")), 5)
        status = col.envelopes("status")
        assert status[-1].type == "death"
        assert status[-1].body["bd_seq"] == status[0].body["bd_seq"] == 1
        assert col.seqs() == [1]
    finally:
        client.stop(0)
        col.close()


def test_stop_after_a_finished_episode_still_flushes_and_says_offline(
    mosquitto: Broker, tmp_path: Path
) -> None:
    """Regression: the lifecycle bookkeeping once shared a name with the stopped flag, so after
    any episode ended ``stop`` skipped the flush and the offline status."""
    client, events, _ = make_client(config(mosquitto.port, tmp_path))
    col = Collector(mosquitto.port)
    client.start()
    try:
        assert wait_until(lambda: client.connected, 5)
        events.emit("drift", 5)
        events.emit("adaptation_finished", 20)
        events.emit("alert", 20)
        assert client.stop(5)
        assert wait_until(lambda: any(e.type == "death" for e in col.envelopes("status")), 5)
        assert col.seqs() == [1, 2, 3]
    finally:
        client.stop(0)
        col.close()


# ------------------------------------------------------------------------------ commands
def test_malformed_commands_are_refused_and_valid_ones_queued(
    mosquitto: Broker, tmp_path: Path
) -> None:
    sink = ListSink()
    events = EventLog()
    events.add_sink(sink)
    client, events, commands = make_client(config(mosquitto.port, tmp_path), events=events)
    col = Collector(mosquitto.port)
    ctl = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="ctl")
    ctl.connect("127.0.0.1", mosquitto.port)
    ctl.loop_start()
    client.start()
    cmd_topic = f"edge/{DEV}/cmd"

    def send(payload: bytes | str) -> None:
        ctl.publish(cmd_topic, payload, qos=1).wait_for_publish(5)

    def cmd(cid: str, name: str, args: dict[str, Any], schema: int = 1) -> str:
        return json.dumps({"schema": schema, "id": cid, "command": name, "args": args, "time": 1.0})

    bad = [
        (b"{not json", None, "not valid JSON"),
        (cmd("c2", "set_threshold", {"domain": "zero", "threshold": 0.5}), "c2", "'domain'"),
        (cmd("c3", "format_disk", {}), "c3", "unknown command"),
        (
            json.dumps({"schema": 1, "id": "c4", "command": "report_state", "pad": "x" * 10**7}),
            None,
            "the limit is",
        ),
        (
            cmd(
                "c5",
                "install_adaptor",
                {"bundle": "!!not*base64", "sha256": "s", "encoder_hash": "e"},
            ),
            "c5",
            "base64",
        ),
        (cmd("c6", "report_state", {}, schema=99), "c6", "schema 99"),
    ]
    try:
        assert wait_until(lambda: client.connected, 5)
        time.sleep(0.2)  # the cmd subscription's SUBACK
        for payload, _, _ in bad:
            send(payload)

        def refused() -> list[dict[str, Any]]:
            return [e for e in sink.events if e["type"] == "command_refused"]

        assert wait_until(lambda: len(refused()) == len(bad), 10), refused()
        for event, (_, cid, why) in zip(refused(), bad, strict=True):
            assert event["command_id"] == cid
            assert why in event["reason"], (why, event["reason"])
        assert len(commands) == 0
        # The refusals flow back as alerts through the same sink.
        assert wait_until(
            lambda: [e.type for e in col.envelopes("alerts")] == ["command_refused"] * len(bad)
        )
        # ... and the client still works: a valid command reaches the queue with its id.
        send(CommandMessage("set_threshold", {"domain": 0, "threshold": 0.25}, id="c7").to_json())
        assert wait_until(lambda: len(commands) == 1, 5)
        (queued,) = commands.drain()
        assert (queued.name, queued.args) == ("set_threshold", {"domain": 0, "threshold": 0.25})
        assert queued.id == "c7"
    finally:
        client.stop(2)
        ctl.loop_stop()
        ctl.disconnect()
        col.close()


def test_adaptor_export_is_published_on_adaptors(
    mosquitto: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The test plays the owner thread: it answers the queued commands as the runtime would.
    # (setitem: keeps this test meaningful on a CommandQueue that predates export_domain.)
    monkeypatch.setitem(COMMANDS, "export_domain", ("domain",))
    client, events, commands = make_client(config(mosquitto.port, tmp_path))
    col = Collector(mosquitto.port)
    client.start()
    try:
        assert wait_until(lambda: client.connected, 5)
        events.emit("drift", 40, kind="domain_shift")
        events.emit("adaptation_finished", 60, domain=1, version=1)
        queued = {c.name: c for c in commands.drain()}
        assert set(queued) == {"export_domain", "report_state"}
        assert queued["export_domain"].args == {"domain": 1}
        bundle = b"\x00safetensors bytes\xff" * 10
        queued["export_domain"].future.set_result(
            {"bundle": bundle, "sha256": "abc", "version": 1, "signature": None}
        )
        queued["report_state"].future.set_result(
            {"active_domain": 1, "domains": [{"id": 0}, {"id": 1}]}
        )
        assert wait_until(lambda: bool(col.envelopes("adaptors")), 5)
        (msg,) = col.envelopes("adaptors")
        assert base64.b64decode(msg.body["bundle"]) == bundle
        assert msg.body["domain"] == 1 and msg.body["lifecycle"] == f"{DEV}:40"
        assert msg.body["encoder_hash"] == "enc-abc" and msg.body["sha256"] == "abc"
        # The refreshed snapshot is re-published as the retained birth.
        assert wait_until(
            lambda: any(e.body.get("active_domain") == 1 for e in col.envelopes("status"))
        )
    finally:
        client.stop(2)
        col.close()


# ------------------------------------------------------------------------------ auth and ACL
_ACL = """user ctl
topic readwrite edge/#

user dev-1
topic write edge/dev-1/status
topic write edge/dev-1/alerts
topic write edge/dev-1/telemetry
topic write edge/dev-1/labels/request
topic write edge/dev-1/adaptors
topic read edge/dev-1/cmd
"""


def _secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_wrong_password_refused_and_acl_enforced(tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    pw = password_file(tmp_path / "passwd", {"dev-1": "right-pw", "ctl": "ctl-pw"})
    acl = tmp_path / "acl"
    acl.write_text(_ACL)
    broker = Broker(kind="mosquitto", password_file=pw, acl_file=acl, workdir=tmp_path / "b")
    broker.start()
    col = Collector(broker.port, username="ctl", password="ctl-pw")
    try:
        wrong = _secret(tmp_path / "wrong.yaml", "username: dev-1\npassword: nope\n")
        bad, _, _ = make_client(config(broker.port, tmp_path / "a", credentials_file=wrong))
        bad.start()
        time.sleep(1.5)
        assert not bad.connected and bad.last_error is not None
        assert "refused" in bad.last_error
        bad.stop(0)
        assert col.envelopes("status") == []

        right = _secret(
            tmp_path / "right.json", json.dumps({"username": "dev-1", "password": "right-pw"})
        )
        sink = ListSink()
        client, events, commands = make_client(
            config(broker.port, tmp_path / "b2", credentials_file=right)
        )
        events.add_sink(sink)
        client.start()
        assert wait_until(lambda: client.connected, 5), client.last_error
        assert wait_until(lambda: bool(col.envelopes("status")), 5)
        events.emit("frame_rejected", 1)
        assert wait_until(lambda: col.seqs() == [1], 5)
        # The ACL lets dev-1 read its cmd topic: a controller command gets through.
        col.c.publish(f"edge/{DEV}/cmd", CommandMessage("report_state", id="r1").to_json(), qos=1)
        assert wait_until(lambda: len(commands) == 1, 5)

        # dev-1 (MQTT 5, so the PUBACK says why) may not write elsewhere, nor to its cmd topic.
        reasons: dict[int, Any] = {}
        probe = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="dev-1-probe", protocol=mqtt.MQTTv5
        )
        probe.username_pw_set("dev-1", "right-pw")
        probe.on_publish = lambda c, u, mid, rc, p: reasons.__setitem__(mid, rc)
        probe.connect("127.0.0.1", broker.port)
        probe.loop_start()
        try:
            denied = [
                probe.publish("edge/dev-2/alerts", b"forged", qos=1),
                probe.publish(f"edge/{DEV}/cmd", b"self-command", qos=1),
            ]
            allowed = probe.publish(f"edge/{DEV}/telemetry", b"control", qos=1)
            for info in [*denied, allowed]:
                info.wait_for_publish(5)
            assert wait_until(lambda: len(reasons) == 3, 5)
            assert all(reasons[i.mid].is_failure for i in denied), reasons
            assert not reasons[allowed.mid].is_failure
            assert wait_until(lambda: any(p == b"control" for _, p, _ in col.msgs), 5), (
                "the control publish must arrive, or the check below proves nothing"
            )
            time.sleep(0.3)
            payloads = [p for _, p, _ in col.msgs]
            assert b"forged" not in payloads and b"self-command" not in payloads
            assert len(commands) == 1  # the client never saw its own forged command
        finally:
            probe.loop_stop()
            probe.disconnect()
        client.stop(2)
    finally:
        col.close()
        broker.stop()


def test_credentials_sources_and_permissions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loose = tmp_path / "creds.yaml"
    loose.write_text("username: u\npassword: p\n")
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_credentials(FleetConfig(credentials_file=loose))
    loose.chmod(0o600)
    assert load_credentials(FleetConfig(credentials_file=loose)) == ("u", "p")
    monkeypatch.setenv(USERNAME_ENV, "envu")
    monkeypatch.setenv(PASSWORD_ENV, "envp")
    assert load_credentials(FleetConfig()) == ("envu", "envp")
    monkeypatch.delenv(USERNAME_ENV)
    monkeypatch.delenv(PASSWORD_ENV)
    assert load_credentials(FleetConfig()) == (None, None)
    assert tls_context(FleetConfig()) is None
    assert tls_context(FleetConfig(tls=True)) is not None


# ------------------------------------------------------------------------------ thumbnails
def test_png_round_trip() -> None:
    rng = np.random.default_rng(0)
    for shape in [(7, 5), (16, 16, 3), (3, 9, 4), (1, 1)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        png = encode_png(img)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        np.testing.assert_array_equal(decode_png(png), img)
    # A float frame in [0, 1] (the stream's dtype): scaled, grown to 32 px by nearest sampling.
    frame = rng.random((28, 28)).astype(np.float32)
    thumb = decode_png(thumbnail(frame, 32))
    assert thumb.shape == (32, 32) and thumb.dtype == np.uint8
    assert thumb[0, 0] == np.uint8(round(float(frame[0, 0]) * 255))
    # Shrinking averages: a 64 px RGB checkerboard of 2x2 blocks becomes flat grey.
    board = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    small = decode_png(thumbnail(np.stack([board] * 3, axis=-1), 32))
    assert small.shape == (32, 32, 3) and np.all(np.abs(small.astype(int) - 128) <= 1)
    broken = bytearray(encode_png(board))
    broken[40] ^= 0xFF
    with pytest.raises(InputError):
        decode_png(bytes(broken))


def test_png_matches_an_independent_decoder() -> None:
    image_mod = pytest.importorskip("PIL.Image")  # not a dependency; a cross-check when present
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (13, 11, 3), dtype=np.uint8)
    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (9, 1))
    for img in (rgb, grey):
        ours = np.asarray(image_mod.open(io.BytesIO(encode_png(img))))
        np.testing.assert_array_equal(ours, img)
        # PIL picks row filters per line: our decoder must undo all of them.
        buf = io.BytesIO()
        image_mod.fromarray(img).save(buf, format="PNG", optimize=True)
        np.testing.assert_array_equal(decode_png(buf.getvalue()), img)


def test_fleet_labels_queue_label_requests(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "dev-1.sqlite", DEV)
    events = EventLog()
    client = FleetClient(
        config(1883, tmp_path),  # never started: label requests wait in the outbox
        events=events,
        commands=CommandQueue(),
        position=lambda: 0,
        outbox=outbox,
        software_version="t",
        encoder_hash="e",
    )
    events.add_sink(client)
    events.emit("drift", 100, kind="domain_shift")
    labels = FleetLabels(client, thumbnail_px=16, frames_per_request=2)
    images = np.random.default_rng(2).random((10, 28, 28)).astype(np.float32)
    batch = FrameBatch(100, 110, images)
    ask = np.zeros(10, bool)
    ask[[1, 4, 5, 8, 9]] = True
    n = 10
    dec = Decisions(
        indices=batch.indices,
        prediction=np.zeros(n, np.int64),
        ood_score=np.zeros(n, np.float32),
        domain=np.zeros(n, np.int64),
        is_ood=np.zeros(n, bool),
        rejected=np.zeros(n, bool),
        label_request=ask,
    )
    assert len(labels.answer(batch.indices[ask]).indices) == 0
    labels(ServedBatch(batch, dec, labels.answer(np.zeros(0)), [], 0.0, 0.0))
    rows = [r for r in outbox.pending(100) if r[1] == "labels/request"]
    bodies = [json.loads(p)["body"] for _, _, p in rows]
    assert [b["frames"] for b in bodies] == [[101, 104], [105, 108], [109]]
    assert all(b["lifecycle"] == f"{DEV}:100" for b in bodies)
    assert len({b["request_id"] for b in bodies}) == 3
    thumb = decode_png(base64.b64decode(bodies[0]["thumbnails"][1]))
    assert thumb.shape == (16, 16)
    # The thumbnail is of the requested frame (104), not of a neighbour.
    np.testing.assert_array_equal(thumb, decode_png(thumbnail(images[4], 16)))
    assert not np.array_equal(thumb, decode_png(thumbnail(images[3], 16)))
    outbox.close()
