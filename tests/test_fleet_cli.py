"""The operator's fleet commands as a user types them: `fleet status`, `fleet events`, `fleet
send` and `fleet label` against a real store and a real Mosquitto."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge_runtime import cli
from edge_runtime.fleet.payloads import CommandMessage, Envelope
from edge_runtime.fleet.store import open_store
from edge_runtime.fleet.thumbnails import decode_png, thumbnail


class CmdListener:
    """A paho subscriber on one device's cmd topic: what the device would receive."""

    def __init__(self, port: int, device: str) -> None:
        self.got: list[CommandMessage] = []
        self.arrived = threading.Event()
        ready = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(f"edge/{device}/cmd", qos=1)
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert ready.wait(5)

    def _on(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        self.got.append(CommandMessage.from_json(msg.payload))
        self.arrived.set()

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = open_store(url)
    birth = {
        "state": "online",
        "bd_seq": 3,
        "encoder_hash": "enc",
        "domains": [{"id": 0, "name": "base", "kind": "base", "version": 1, "labels": [0, 1]}],
        "software_version": "t",
    }
    store.set_birth(Envelope("cam-1", 0, "birth", birth, time=1000.0))
    for seq, etype in enumerate(("drift", "alert", "labels_requested"), 1):
        body = {"type": etype, "frame": 100 + seq, "time": 1000.0 + seq, "lifecycle": "cam-1:101"}
        store.add_alerts([Envelope("cam-1", seq, etype, body, time=1000.0 + seq)])
    images = np.random.default_rng(0).integers(0, 255, (3, 28, 28), dtype=np.uint8)
    request = {
        "request_id": "req-1",
        "frames": [101, 102, 103],
        "thumbnails": [base64.b64encode(thumbnail(im, 32)).decode() for im in images],
    }
    store.add_label_request(Envelope("cam-1", 4, "label_request", request, time=1005.0))
    store.close()
    return url


def test_status_and_events(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fleet", "status", "--store", store_url]) == 0
    table = capsys.readouterr().out
    assert "cam-1" in table and "0v1" in table
    assert cli.main(["fleet", "status", "--store", store_url, "--json"]) == 0
    (dev,) = json.loads(capsys.readouterr().out)
    assert dev["device_id"] == "cam-1" and dev["bd_seq"] == 3 and dev["online"]
    assert cli.main(["fleet", "events", "--store", store_url, "--device", "cam-1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["device_id"], r["seq"], r["type"], r["frame"]) for r in rows] == [
        ("cam-1", 1, "drift", 101),
        ("cam-1", 2, "alert", 102),
        ("cam-1", 3, "labels_requested", 103),
    ]
    assert cli.main(["fleet", "events", "--store", "mysql://nope"]) == 2
    assert "mysql" in capsys.readouterr().err


def test_send_validates_then_delivers(mosquitto, capsys: pytest.CaptureFixture[str]) -> None:
    listener = CmdListener(mosquitto.port, "cam-1")
    try:
        argv = ["fleet", "send", "cam-1", "set_threshold", "domain=1", "threshold=-0.05"]
        assert cli.main([*argv, "--broker", mosquitto.url]) == 0
        assert listener.arrived.wait(5)
        (msg,) = listener.got
        assert (msg.command, msg.args) == ("set_threshold", {"domain": 1, "threshold": -0.05})
        assert msg.id in capsys.readouterr().out
        # Refused before anything is sent: an unknown command, a wrong type, no broker.
        assert cli.main(["fleet", "send", "cam-1", "reboot", "--broker", mosquitto.url]) == 2
        assert "unknown command" in capsys.readouterr().err
        bad = ["fleet", "send", "cam-1", "rollback", "domain=one", "--broker", mosquitto.url]
        assert cli.main(bad) == 2
        assert "must be int" in capsys.readouterr().err
        assert len(listener.got) == 1
        assert (
            cli.main(["fleet", "send", "cam-1", "report_state", "--broker", "mqtt://127.0.0.1:1"])
            == 2
        )
        assert "cannot reach the broker" in capsys.readouterr().err
    finally:
        listener.close()


def test_label_answers_a_request_from_a_csv(
    mosquitto, store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listener = CmdListener(mosquitto.port, "cam-1")
    csv = tmp_path / "labels.csv"
    csv.write_text("frame_id,label\n101,1\n103,0\n")
    frames = tmp_path / "frames"
    base = ["--store", store_url, "--broker", mosquitto.url, "--frames-dir", str(frames)]
    try:
        assert cli.main(["fleet", "label", "cam-1", "latest", "--from", str(csv), *base]) == 0
        assert listener.arrived.wait(5)
        (msg,) = listener.got
        assert msg.command == "labels"
        assert msg.args == {"request_id": "req-1", "frames": [101, 103], "labels": [1, 0]}
        # The frames the operator looked at, as PNG files.
        assert decode_png((frames / "cam-1-102.png").read_bytes()).shape[:2] == (32, 32)
        store = open_store(store_url)
        assert store.label_requests("cam-1", unanswered=True) == []
        store.close()
        # A frame the request did not ask for is an error, and nothing is sent.
        csv.write_text("999,1\n")
        assert cli.main(["fleet", "label", "cam-1", "req-1", "--from", str(csv), *base]) == 2
        assert "not asked for" in capsys.readouterr().err
        assert cli.main(["fleet", "label", "cam-1", "nope", "--from", str(csv), *base]) == 2
        assert len(listener.got) == 1
    finally:
        listener.close()
