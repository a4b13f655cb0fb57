"""FleetStore on both backends: a SQLite file and the PostgreSQL that ``pg_url`` empties."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.errors import InputError
from edge_runtime.fleet.payloads import Envelope, PayloadError, alert_body
from edge_runtime.fleet.store import (
    SCHEMA,
    FleetStore,
    StoreURLError,
    default_store_url,
    open_store,
    redact,
)

TABLES = {"fleet_meta", "devices", "alerts", "label_requests", "adaptors", "offers"}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.sqlite'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[FleetStore]:
    s = open_store(store_url)
    yield s
    s.close()


def alert(device: str, seq: int, kind: str = "alert", lifecycle: str = "L1", **extra) -> Envelope:
    event = {"type": kind, "frame": seq * 10, "time": 1.5 * seq, "details": {"n": seq}, **extra}
    return Envelope(device, seq, kind, alert_body(event, lifecycle), time=1000.0 + seq)


def birth(device: str, seq: int, bd_seq: int, encoder_hash: str = "enc-1") -> Envelope:
    body = {
        "state": "online",
        "bd_seq": bd_seq,
        "encoder_hash": encoder_hash,
        "domains": [{"id": 0, "name": "base", "kind": "base", "version": 1, "labels": 10}],
        "software_version": "0.1",
    }
    return Envelope(device, seq, "birth", body, time=900.0 + seq)


def table_names(store: FleetStore) -> set[str]:
    if store.backend == "sqlite":
        rows = store._query("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {r["name"] for r in rows}
    rows = store._query(
        "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = 'public'"
    )
    return {r["name"] for r in rows}


def test_schema_is_created_and_reopening_keeps_data(store_url: str) -> None:
    with open_store(store_url) as s:
        assert table_names(s) >= TABLES
        assert s.add_alerts([alert("dev-a", 1)]) == 1
    # Creating the schema again (a controller restart) must neither fail nor drop rows.
    with open_store(store_url) as s:
        assert s.alert_counts() == (1, 1)
        assert len(SCHEMA) >= len(TABLES)


def test_sqlite_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "fleet.sqlite"
    with open_store(f"sqlite:///{path}") as s:
        assert s.backend == "sqlite"
        assert s._query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"
        assert s._query("PRAGMA synchronous")[0]["synchronous"] == 1  # NORMAL
        assert s._query("PRAGMA busy_timeout")[0]["timeout"] >= 1000
    assert path.exists()


def test_alerts_are_deduplicated_by_device_and_seq(store: FleetStore) -> None:
    batch = [alert("dev-a", s) for s in range(1, 6)]
    assert store.add_alerts(batch) == 5
    # A QoS 1 redelivery or an outbox replay: the same (device, seq) again, even with another
    # body, is one row.
    assert store.add_alerts(batch) == 0
    assert store.add_alerts([alert("dev-a", 3, kind="drift"), alert("dev-b", 3)]) == 1
    assert store.alert_counts() == (6, 6)
    rows = store.alerts("dev-a")
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["type"] == "alert"  # the first copy wins
    assert store.add_alerts([]) == 0


def test_alerts_are_ordered_per_device_with_their_fields(store: FleetStore) -> None:
    # Out of order, interleaved, in two batches: the store orders by (device, seq).
    store.add_alerts([alert("dev-b", 7), alert("dev-a", 9, kind="drift"), alert("dev-a", 2)])
    store.add_alerts([alert("dev-b", 1), alert("dev-a", 5)])
    rows = store.alerts()
    assert [(r["device_id"], r["seq"]) for r in rows] == [
        ("dev-a", 2),
        ("dev-a", 5),
        ("dev-a", 9),
        ("dev-b", 1),
        ("dev-b", 7),
    ]
    drift = rows[2]
    assert drift["type"] == "drift" and drift["phase"] == "new" and drift["lifecycle"] == "L1"
    assert drift["frame"] == 90 and drift["time"] == pytest.approx(1009.0)
    assert drift["body"]["details"] == {"n": 9} and drift["received_at"] > 0
    assert [r["seq"] for r in store.alerts(limit=2)] == [2, 5]
    assert [r["seq"] for r in store.alerts(types=["drift"])] == [9]


def test_birth_death_and_a_stale_last_will(store: FleetStore) -> None:
    store.set_birth(birth("dev-a", seq=1, bd_seq=0))
    (dev,) = store.devices()
    assert dev["online"] and dev["bd_seq"] == 0 and dev["encoder_hash"] == "enc-1"
    assert dev["domains"][0]["name"] == "base"

    # The device reconnects (new birth, bd_seq 1); the first session's Will arrives late.
    store.set_birth(birth("dev-a", seq=5, bd_seq=1))
    assert store.set_death("dev-a", 0) is False
    assert store.device("dev-a")["online"] is True
    # A retained older birth re-delivered after the newer one does not roll it back.
    assert store.set_birth(birth("dev-a", seq=1, bd_seq=0)) is False
    assert store.device("dev-a")["bd_seq"] == 1
    # The current session's Will does mark it offline.
    assert store.set_death("dev-a", 1) is True
    assert store.device("dev-a")["online"] is False
    assert store.set_death("nobody", 1) is False
    assert store.device("nobody") is None


def test_heartbeat_and_derived_device_fields(store: FleetStore) -> None:
    store.set_birth(birth("dev-a", seq=1, bd_seq=0))
    hb = {"frames_seen": 42, "outbox": 0, "readings": {"cpu_percent": 12.5}}
    store.set_heartbeat(Envelope("dev-a", 2, "heartbeat", hb, time=2000.0))
    store.set_heartbeat(Envelope("dev-a", 1, "heartbeat", {"frames_seen": 1}, time=1999.0))
    store.add_alerts([alert("dev-a", 3, kind="drift", lifecycle="ep-1"), alert("dev-a", 4)])
    store.add_alerts([alert("dev-a", 8, kind="novel_class", lifecycle="ep-2")])
    dev = store.device("dev-a")
    assert dev["telemetry"] == hb and dev["last_heartbeat"] == 2000.0  # the older one lost
    assert dev["last_drift"]["seq"] == 8 and dev["last_drift"]["lifecycle"] == "ep-2"
    assert dev["last_seen"] == pytest.approx(2000.0)
    assert dev["adaptors"] == 0


def test_label_requests_round_trip(store: FleetStore) -> None:
    body = {
        "request_id": "r1",
        "frames": [3, 4, 9],
        "thumbnails": ["iVBORw0KGgo=", "iVBORw0KGgo=", "iVBORw0KGgo="],
        "labels": 3,
    }
    env = Envelope("dev-a", 11, "labels_requested", body, time=1234.0)
    assert store.add_label_request(env) is True
    assert store.add_label_request(env) is False  # redelivery
    got = store.label_request("dev-a", "r1")
    assert got is not None
    assert got["frames"] == [3, 4, 9] and got["thumbnails"] == body["thumbnails"]
    assert got["seq"] == 11 and got["answered"] is False and got["body"]["labels"] == 3
    assert [r["request_id"] for r in store.label_requests(unanswered=True)] == ["r1"]
    assert store.mark_answered("dev-a", "r1") is True
    assert store.label_requests(unanswered=True) == []
    assert store.label_requests("dev-a")[0]["answered"] is True
    assert store.label_request("dev-a", "nope") is None
    assert store.mark_answered("dev-a", "nope") is False
    with pytest.raises(PayloadError, match="request_id"):
        store.add_label_request(Envelope("dev-a", 12, "labels_requested", {"frames": []}))


def test_adaptor_and_offer_once(store: FleetStore) -> None:
    body = {
        "domain": 2,
        "version": 1,
        "bundle": "AAEC",
        "sha256": "ab" * 32,
        "encoder_hash": "enc-1",
        "signature": "ff00",
        "lifecycle": "ep-9",
    }
    first = Envelope("dev-a", 20, "adaptor", body, time=100.0)
    assert store.add_adaptor(first) is True
    assert store.add_adaptor(first) is False  # redelivered: nothing changes
    # The trained head of the same version replaces the initialised one, never the reverse.
    trained = Envelope("dev-a", 25, "adaptor", {**body, "bundle": "AAED"}, time=200.0)
    assert store.add_adaptor(trained) is True
    assert store.add_adaptor(first) is False
    assert store.adaptor("dev-a", 2, 1)["bundle"] == "AAED"
    assert store.add_adaptor(Envelope("dev-a", 26, "adaptor", body, time=300.0)) is True
    assert store.add_adaptor(Envelope("dev-b", 3, "adaptor", {**body, "encoder_hash": "e2"}))
    (only,) = store.adaptors("enc-1")
    assert only["device_id"] == "dev-a" and only["signature"] == "ff00" and "bundle" not in only
    assert len(store.adaptors()) == 2
    assert store.adaptors("enc-1", with_bundle=True)[0]["bundle"] == "AAEC"
    assert store.adaptor("dev-a", 2, 1)["bundle"] == "AAEC"
    assert store.adaptor("dev-a", 2, 7) is None
    assert store.device("dev-a")["adaptors"] == 1

    # Once per drift episode of the target, whoever asks again.
    assert store.record_offer("dev-c", "ep-1", "dev-a", 2, 1, similarity=0.9) is True
    assert store.record_offer("dev-c", "ep-1", "dev-b", 2, 1) is False
    assert store.record_offer("dev-c", "ep-2", "dev-a", 2, 1) is True
    offers = store.offers("dev-c")
    assert [(o["lifecycle"], o["source_device"]) for o in offers] == [
        ("ep-1", "dev-a"),
        ("ep-2", "dev-a"),
    ]
    with pytest.raises(PayloadError, match="signature"):
        store.add_adaptor(Envelope("dev-a", 21, "adaptor", {**body, "signature": None}))


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("", "empty store URL"),
        ("mysql://u:p@h/db", "unknown scheme 'mysql'"),
        ("fleet.sqlite", "unknown scheme"),
        ("sqlite://", "sqlite:///relative/path"),
        ("sqlite:///", "sqlite:///relative/path"),
        ("sqlite:/x.db", "sqlite:///relative/path"),
    ],
)
def test_bad_urls_are_clear_errors(url: str, match: str) -> None:
    with pytest.raises(StoreURLError, match=match) as info:
        open_store(url)
    assert isinstance(info.value, InputError) and isinstance(info.value, ValueError)


def test_sqlite_url_naming_a_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreURLError, match="is a directory"):
        open_store(f"sqlite:///{tmp_path}")


def test_unreachable_postgres_names_the_url_without_the_password() -> None:
    url = "postgresql://edge:s3cret@127.0.0.1:1/none"
    with pytest.raises(StoreURLError, match="cannot connect") as info:
        open_store(url)
    assert "127.0.0.1:1/none" in str(info.value) and "s3cret" not in str(info.value)
    assert redact(url) == "postgresql://edge:***@127.0.0.1:1/none"


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite"
    open_store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE fleet_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreURLError, match="fleet schema 99"):
        open_store(f"sqlite:///{path}")


def test_default_store_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    url = default_store_url()
    assert url == f"sqlite:///{tmp_path / 'xdg' / 'edge_runtime' / 'fleet.sqlite'}"
    open_store(url).close()
    assert (tmp_path / "xdg" / "edge_runtime" / "fleet.sqlite").exists()
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_url().endswith("/home/.local/share/edge_runtime/fleet.sqlite")


def test_closed_store_refuses_work(tmp_path: Path) -> None:
    s = open_store(f"sqlite:///{tmp_path / 'f.sqlite'}")
    s.close()
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.alerts()
