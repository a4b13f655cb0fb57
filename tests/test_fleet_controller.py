"""FleetController against a real Mosquitto, storing into real SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_runtime.fleet import payloads as p
from edge_runtime.fleet.broker import Broker
from edge_runtime.fleet.controller import (
    DEFAULT_MATCH_THRESHOLD,
    ControllerError,
    FleetController,
    best_adaptor,
    hamming_similarity,
    parse_broker_url,
)
from edge_runtime.fleet.payloads import CommandMessage, Envelope, PayloadError, alert_body
from edge_runtime.fleet.store import FleetStore, open_store

wait_for = FleetController.wait_for
BITS = 2048


class Device:
    """A device as the broker sees it: a paho client publishing envelopes, reading its cmd."""

    def __init__(self, broker: Broker, device_id: str, prefix: str = "edge") -> None:
        self.device_id, self.prefix = device_id, prefix
        self.commands: list[CommandMessage] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev-{device_id}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.seq = 0

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.commands.append(CommandMessage.from_json(msg.payload))

    def listen(self) -> Device:
        self.client.subscribe(p.topic(self.prefix, self.device_id, p.CMD), qos=1)
        assert self._subscribed.wait(5)
        return self

    def envelope(self, kind: str, body: dict) -> Envelope:
        self.seq += 1
        return Envelope(self.device_id, self.seq, kind, body)

    def publish(self, channel: str, payload: Envelope | bytes | str, wait: bool = True) -> None:
        raw = payload.to_json() if isinstance(payload, Envelope) else payload
        info = self.client.publish(p.topic(self.prefix, self.device_id, channel), raw, qos=1)
        if wait:
            info.wait_for_publish(5)

    def alert(self, kind: str = "alert", lifecycle: str = "ep-1", **event) -> Envelope:
        env = self.envelope(kind, alert_body({"type": kind, "frame": self.seq, **event}, lifecycle))
        self.publish(p.ALERTS, env)
        return env

    def birth(self, encoder_hash: str = "enc-1", bd_seq: int = 0) -> None:
        body = {
            "state": "online",
            "bd_seq": bd_seq,
            "encoder_hash": encoder_hash,
            "domains": [{"id": 0, "name": "base", "kind": "base", "version": 1, "labels": 10}],
            "software_version": "test",
        }
        self.publish(p.STATUS, self.envelope(p.BIRTH, body))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[FleetStore]:
    s = open_store(f"sqlite:///{tmp_path / 'fleet.sqlite'}")
    yield s
    s.close()


@pytest.fixture
def controller(mosquitto: Broker, sqlite_store: FleetStore) -> Iterator[FleetController]:
    c = FleetController(mosquitto.url, sqlite_store, reconnect_min_s=1, reconnect_max_s=2)
    c.start()
    assert c.wait_ready(10), "controller did not connect and subscribe"
    yield c
    c.stop()


@pytest.fixture
def devices(mosquitto: Broker) -> Iterator[dict[str, Device]]:
    made: dict[str, Device] = {}

    class Fleet(dict):
        def __missing__(self, key: str) -> Device:
            made[key] = self[key] = Device(mosquitto, key)
            return made[key]

    yield Fleet()
    for d in made.values():
        d.close()


def signature(rng: random.Random, bits: int = BITS) -> bytes:
    return rng.getrandbits(bits).to_bytes(bits // 8, "little")


def flip(sig: bytes, fraction: float, rng: random.Random) -> bytes:
    n = len(sig) * 8
    value = int.from_bytes(sig, "little")
    for i in rng.sample(range(n), int(fraction * n)):
        value ^= 1 << i
    return value.to_bytes(len(sig), "little")


# ---------------------------------------------------------------------------- storing


def test_alerts_status_heartbeat_and_labels_reach_the_store(
    controller: FleetController, sqlite_store: FleetStore, devices: dict[str, Device]
) -> None:
    dev = devices["cam-1"]
    dev.birth(bd_seq=3)
    hb = {"frames_seen": 120, "outbox": 0, "readings": {"cpu_percent": 30.0}}
    dev.publish(p.TELEMETRY, dev.envelope("heartbeat", hb))
    sent = [dev.alert("drift" if i == 0 else "alert", frame=i) for i in range(20)]
    request = {"request_id": "r-1", "frames": [4, 5], "thumbnails": ["iVBORw0KGgo="] * 2}
    dev.publish(p.LABEL_REQUEST, dev.envelope("labels_requested", request))

    assert wait_for(lambda: controller.stored == 20 and controller.drained(), 10), (
        controller.stats()
    )
    rows = sqlite_store.alerts("cam-1")
    assert [r["seq"] for r in rows] == [e.seq for e in sent]
    assert rows[0]["type"] == "drift" and rows[0]["phase"] == "new"
    assert rows[0]["lifecycle"] == "ep-1"
    (device,) = sqlite_store.devices()
    assert device["online"] and device["bd_seq"] == 3 and device["encoder_hash"] == "enc-1"
    assert device["telemetry"] == hb and device["last_drift"]["seq"] == sent[0].seq
    assert sqlite_store.label_request("cam-1", "r-1")["frames"] == [4, 5]
    stats = controller.stats()
    assert stats["received"] == 23 and stats["malformed"] == 0 and stats["duplicates"] == 0

    # The device's Last Will for its current session marks it offline.
    dev.publish(p.STATUS, dev.envelope(p.DEATH, {"state": "offline", "bd_seq": 3}))
    assert wait_for(lambda: not sqlite_store.device("cam-1")["online"], 5)


def test_a_redelivered_alert_is_stored_once(
    controller: FleetController, sqlite_store: FleetStore, devices: dict[str, Device]
) -> None:
    dev = devices["cam-1"]
    env = dev.alert()
    dev.publish(p.ALERTS, env)  # an outbox replay after a lost PUBACK
    assert wait_for(lambda: controller.stored + controller.duplicates == 2, 5)
    assert controller.stored == 1 and controller.duplicates == 1
    assert sqlite_store.alert_counts() == (1, 1)


def test_malformed_payloads_are_counted_and_ignored(
    controller: FleetController, sqlite_store: FleetStore, devices: dict[str, Device]
) -> None:
    dev = devices["cam-1"]
    dev.publish(p.ALERTS, b"\xff not json")
    dev.publish(p.ALERTS, '{"schema": 99, "device_id": "cam-1"}')
    dev.publish(p.ALERTS, "[1, 2]")
    # Another device's envelope on cam-1's topic: refused, a device speaks only for itself.
    dev.publish(p.ALERTS, Envelope("cam-2", 1, "alert", {}).to_json())
    # An adaptor whose bundle does not match its hash must not be shared.
    bad = {"domain": 1, "version": 1, "bundle": "AAEC", "sha256": "00" * 32}
    dev.publish(
        p.ADAPTORS, dev.envelope("adaptor", {**bad, "encoder_hash": "e", "signature": "ff"})
    )
    good = dev.alert()
    assert wait_for(lambda: controller.malformed == 5 and controller.stored == 1, 5), (
        controller.stats()
    )
    assert [r["seq"] for r in sqlite_store.alerts()] == [good.seq]
    assert sqlite_store.adaptors() == []
    assert controller.stats()["store_errors"] == 0


def test_reconnects_after_the_broker_restarts(
    mosquitto: Broker, controller: FleetController, sqlite_store: FleetStore
) -> None:
    dev = Device(mosquitto, "cam-1")
    for _ in range(5):
        dev.alert()
    assert wait_for(lambda: controller.stored == 5, 5)
    dev.close()

    mosquitto.stop()
    assert wait_for(lambda: not controller.connected, 5)
    mosquitto.start()
    # reconnect_max_s=2: paho retries within a few seconds and subscribes again.
    assert controller.wait_ready(10), controller.stats()
    assert controller.connects == 2

    dev = Device(mosquitto, "cam-1")
    dev.seq = 5
    later = [dev.alert() for _ in range(5)]
    dev.close()
    assert wait_for(lambda: controller.stored == 10, 5), controller.stats()
    assert [r["seq"] for r in sqlite_store.alerts()][-5:] == [e.seq for e in later]


def test_two_controllers_share_one_subscription_into_postgres(
    mosquitto: Broker, pg_url: str
) -> None:
    stores = [open_store(pg_url), open_store(pg_url)]
    controllers = [
        FleetController(mosquitto.url, s, shared_group="controllers", client_id=None)
        for s in stores
    ]
    fleet: list[Device] = []
    try:
        for c in controllers:
            c.start()
        assert all(c.wait_ready(10) for c in controllers)
        fleet = [Device(mosquitto, f"dev-{i:02d}") for i in range(10)]

        def publish_all(dev: Device) -> None:
            infos = []
            for _ in range(100):
                env = dev.envelope("alert", alert_body({"type": "alert", "frame": dev.seq}, "l"))
                topic = p.topic("edge", dev.device_id, p.ALERTS)
                infos.append(dev.client.publish(topic, env.to_json(), qos=1))
            for info in infos:
                info.wait_for_publish(10)

        threads = [threading.Thread(target=publish_all, args=(d,)) for d in fleet]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)

        def total() -> int:
            return sum(c.stored + c.duplicates for c in controllers)

        assert wait_for(lambda: total() >= 1000, 15), [c.stats() for c in controllers]
        rows = stores[0].alerts()
        assert len(rows) == 1000 and stores[0].alert_counts() == (1000, 1000)
        for i in range(10):
            seqs = [r["seq"] for r in rows if r["device_id"] == f"dev-{i:02d}"]
            assert seqs == list(range(1, 101))
        assert sum(c.stored for c in controllers) == 1000
        assert sum(c.duplicates for c in controllers) == 0
        # The broker split the load: each controller stored a share.
        assert all(c.stored > 0 for c in controllers), [c.stats() for c in controllers]
    finally:
        for d in fleet:
            d.close()
        for c in controllers:
            c.stop()
        for s in stores:
            s.close()


# ---------------------------------------------------------------------------- commands


def test_send_delivers_a_command(controller: FleetController, devices: dict[str, Device]) -> None:
    dev = devices["cam-1"].listen()
    cid = controller.send("cam-1", "set_threshold", {"domain": 1, "threshold": 0.4})
    assert wait_for(lambda: len(dev.commands) == 1, 5)
    (cmd,) = dev.commands
    assert cmd.id == cid and cmd.command == "set_threshold"
    assert cmd.args == {"domain": 1, "threshold": 0.4}
    with pytest.raises(PayloadError, match="unknown command"):
        controller.send("cam-1", "format_disk", {})
    with pytest.raises(PayloadError, match="needs argument"):
        controller.send("cam-1", "rollback", {})
    with pytest.raises(ControllerError, match="device id"):
        controller.send("cam/1", "report_state", {})


# ---------------------------------------------------------------------------- matching


def test_hamming_similarity() -> None:
    assert hamming_similarity("ff00", "ff00") == 1.0
    assert hamming_similarity("ff00", "00ff") == 0.0
    assert hamming_similarity("f000", "ff00") == pytest.approx(1 - 4 / 16)
    assert hamming_similarity("ff", "ff00") is None  # another dimension
    assert hamming_similarity("zz", "ff") is None
    assert hamming_similarity("", "") is None


def test_best_adaptor_picks_the_closest_from_another_device_on_the_same_encoder() -> None:
    rng = random.Random(0)
    query = signature(rng)
    near, nearer = flip(query, 0.15, rng), flip(query, 0.05, rng)
    cands = [
        {"device_id": "a", "encoder_hash": "e1", "signature": near.hex(), "domain": 1},
        {"device_id": "b", "encoder_hash": "e1", "signature": nearer.hex(), "domain": 2},
        {"device_id": "self", "encoder_hash": "e1", "signature": query.hex(), "domain": 3},
        {"device_id": "c", "encoder_hash": "e2", "signature": query.hex(), "domain": 4},
        {"device_id": "d", "encoder_hash": "e1", "signature": signature(rng).hex()},
        {"device_id": "e", "encoder_hash": "e1", "signature": query[:16].hex()},
    ]
    match = best_adaptor(query.hex(), cands, encoder_hash="e1", exclude_device="self")
    assert match is not None and match.adaptor["device_id"] == "b"
    assert match.similarity == pytest.approx(0.95, abs=1e-3)
    # Above the threshold only: the 0.85 one goes when the bar is 0.9, the 0.95 one stays.
    hi = best_adaptor(query.hex(), cands[:1], encoder_hash="e1", exclude_device="x", threshold=0.9)
    assert hi is None
    # An unrelated hypervector (similarity ~0.5) never reaches the default bar.
    unrelated = best_adaptor(
        signature(rng).hex(), cands[:2], encoder_hash="e1", exclude_device="self"
    )
    assert unrelated is None
    assert best_adaptor(query.hex(), cands, encoder_hash="e9", exclude_device="self") is None
    assert 0.5 < DEFAULT_MATCH_THRESHOLD < 1.0


def _adaptor_body(sig: bytes, encoder_hash: str = "enc-1", domain: int = 2) -> dict:
    bundle = bytes(range(256)) * 4
    return {
        "domain": domain,
        "version": 1,
        "bundle": base64.b64encode(bundle).decode(),
        "sha256": hashlib.sha256(bundle).hexdigest(),
        "encoder_hash": encoder_hash,
        "signature": sig.hex(),
        "lifecycle": "a-ep-1",
    }


def test_a_drift_like_a_shared_adaptor_gets_it_offered_once(
    controller: FleetController, sqlite_store: FleetStore, devices: dict[str, Device]
) -> None:
    rng = random.Random(1)
    learned = signature(rng)
    a, b, c = devices["dev-a"], devices["dev-b"].listen(), devices["dev-c"].listen()
    for dev in (a, b, c):
        dev.birth()
    body = _adaptor_body(learned)
    a.publish(p.ADAPTORS, a.envelope("adaptor", body))
    assert wait_for(lambda: len(sqlite_store.adaptors()) == 1, 5), controller.stats()

    # dev-b drifts into what dev-a adapted to (90% of bits agree); dev-c into something else.
    b.alert("drift", lifecycle="b-ep-1", evidence={"signature": flip(learned, 0.1, rng).hex()})
    c.alert("drift", lifecycle="c-ep-1", evidence={"signature": signature(rng).hex()})
    assert wait_for(lambda: len(b.commands) == 1, 5), controller.stats()
    (cmd,) = b.commands
    assert cmd.command == "install_adaptor"
    assert cmd.args == {
        "bundle": body["bundle"],
        "sha256": body["sha256"],
        "encoder_hash": "enc-1",
        "source_device": "dev-a",
        "source_domain": 2,
    }
    assert base64.b64decode(cmd.args["bundle"]) == bytes(range(256)) * 4

    # The same episode's later flag, and a redelivery, are not offered again.
    b.alert("novel_class", lifecycle="b-ep-1", evidence={"signature": learned.hex()})
    assert wait_for(lambda: controller.drained() and controller.stored == 3, 5)
    c.publish(p.ALERTS, c.envelope("alert", {}))  # a marker: all before it is handled
    assert wait_for(lambda: controller.stored == 4 and controller.drained(), 5)
    threading.Event().wait(0.3)  # a command sent by mistake would arrive within this
    assert len(b.commands) == 1 and c.commands == [] and a.commands == []
    assert controller.offers == 1
    (offer,) = sqlite_store.offers()
    assert offer["target_device"] == "dev-b" and offer["lifecycle"] == "b-ep-1"
    assert offer["similarity"] == pytest.approx(0.9, abs=1e-3)


def test_no_offer_across_encoders(
    controller: FleetController, sqlite_store: FleetStore, devices: dict[str, Device]
) -> None:
    rng = random.Random(2)
    learned = signature(rng)
    a, b = devices["dev-a"], devices["dev-b"].listen()
    a.birth("enc-1")
    b.birth("enc-2")  # another encoder: dev-a's adaptor cannot run on dev-b's features
    a.publish(p.ADAPTORS, a.envelope("adaptor", _adaptor_body(learned)))
    b.alert("drift", lifecycle="b-ep-1", evidence={"signature": learned.hex()})
    assert wait_for(lambda: controller.stored == 1 and controller.drained(), 5)
    threading.Event().wait(0.3)
    assert b.commands == [] and sqlite_store.offers() == []


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:1883", "127.0.0.1:1883", "mqtt://", "mqtt://host:99999"]
)
def test_bad_broker_urls(url: str, sqlite_store: FleetStore) -> None:
    with pytest.raises(ControllerError, match="broker URL"):
        FleetController(url, sqlite_store)


def test_broker_url_defaults() -> None:
    assert parse_broker_url("mqtt://broker.local") == ("broker.local", 1883, False)
    assert parse_broker_url("mqtts://broker.local") == ("broker.local", 8883, True)
    assert parse_broker_url("mqtt://10.0.0.2:1999") == ("10.0.0.2", 1999, False)


def test_bad_options(sqlite_store: FleetStore) -> None:
    with pytest.raises(ControllerError, match="match_threshold"):
        FleetController("mqtt://h", sqlite_store, match_threshold=1.5)
    with pytest.raises(ControllerError, match="shared group"):
        FleetController("mqtt://h", sqlite_store, shared_group="a/b")
    with pytest.raises(ControllerError, match="prefix"):
        FleetController("mqtt://h", sqlite_store, prefix="/edge")
    shared = FleetController("mqtt://h", sqlite_store, shared_group="g", prefix="site1")
    assert shared.topics()[0] == "$share/g/site1/+/status"
    assert "site1/+/cmd" not in " ".join(shared.topics())
