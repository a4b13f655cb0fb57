"""The fleet end to end, configured as a user would: `edge-runtime run` with `fleet.enabled`
beside `edge-runtime fleet serve`, against a real Mosquitto that is killed and restarted, a
device that is SIGKILLed with alerts queued, malformed commands while serving, the operator's
label loop, and an adaptor shared from one device to another."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from run_args import FAST_RUN_ARGS

from edge_runtime.cli.demo import cached_scenario
from edge_runtime.fleet.store import open_store

pytest.importorskip("paho.mqtt")


@pytest.fixture(scope="module")
def mini() -> str:
    return str(cached_scenario("fashion-drift-mini"))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_runtime", *args]


def _device_args(port: int, outbox: Path, device: str = "dev-1") -> list[str]:
    return [
        *FAST_RUN_ARGS,
        "--no-baselines",
        "--set",
        "fleet.enabled=true",
        "--set",
        "fleet.host=127.0.0.1",
        "--set",
        f"fleet.port={port}",
        "--set",
        "fleet.tls=false",
        "--set",
        f"fleet.device_id={device}",
        "--set",
        f"fleet.outbox_dir={outbox}",
        "--set",
        "fleet.reconnect_max_s=1",
    ]


def _events(out: Path) -> list[dict[str, Any]]:
    path = out / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _stored(url: str, device: str) -> list[dict[str, Any]]:
    store = open_store(url)
    try:
        return store.alerts(device_id=device)
    finally:
        store.close()


@pytest.fixture
def fleet_serve(mosquitto, tmp_path: Path):
    """`edge-runtime fleet serve` as a subprocess storing into a SQLite file."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        _cli("fleet", "serve", "--broker", mosquitto.url, "--store", url, "--ready-file", ready),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    _wait(ready.exists, 30, "the controller to subscribe")
    yield url
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _same_alerts(stored: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    seqs = [r["seq"] for r in stored]
    assert seqs == sorted(set(seqs)), "stored alerts must be unique and in sequence order"
    assert [(r["type"], r["frame"]) for r in stored] == [(e["type"], e["frame"]) for e in events]


def test_every_alert_is_stored_once_across_a_broker_restart(
    mini, mosquitto, fleet_serve, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    dev = subprocess.Popen(
        _cli(
            "run",
            "--stream",
            mini,
            "--out",
            str(out),
            "--rate",
            "250",
            *_device_args(mosquitto.port, tmp_path / "outbox"),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait(lambda: len(_events(out)) >= 2, 90, "the first drift events")
        mosquitto.stop()  # the broker goes away mid-stream ...
        time.sleep(1.5)
        mosquitto.start()  # ... and comes back on the same port
        assert dev.wait(180) == 0, dev.stdout.read().decode() if dev.stdout else ""
    finally:
        if dev.poll() is None:
            dev.kill()
    events = _events(out)
    assert len(events) >= 10
    _wait(lambda: len(_stored(fleet_serve, "dev-1")) >= len(events), 30, "every alert stored")
    _same_alerts(_stored(fleet_serve, "dev-1"), events)


def test_alerts_queued_when_the_device_is_killed_are_delivered_after_restart(
    mini, mosquitto, tmp_path: Path
) -> None:
    mosquitto.stop()  # the broker is down: every alert stays in the outbox
    outbox = tmp_path / "outbox"
    first = tmp_path / "run1"
    args = _device_args(mosquitto.port, outbox)
    dev = subprocess.Popen(
        _cli("run", "--stream", mini, "--out", str(first), "--rate", "250", *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(lambda: len(_events(first)) >= 6, 90, "alerts queued in the outbox")
    finally:
        os.kill(dev.pid, signal.SIGKILL)
        dev.wait()
    killed = _events(first)
    with sqlite3.connect(outbox / "dev-1.sqlite") as db:
        queued = db.execute("SELECT COUNT(*) FROM messages WHERE channel = 'alerts'").fetchone()[0]
    assert queued >= len(killed)  # every event it wrote is queued (the outbox is written first)

    mosquitto.start()
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    ready = tmp_path / "ready"
    ctl = subprocess.Popen(
        _cli("fleet", "serve", "--broker", mosquitto.url, "--store", url, "--ready-file", ready),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(ready.exists, 30, "the controller to subscribe")
        second = tmp_path / "run2"
        restart = _cli("run", "--stream", mini, "--out", str(second), "--max-frames", "64", *args)
        assert subprocess.run(restart, capture_output=True, timeout=180).returncode == 0
        again = _events(second)
        _wait(lambda: len(_stored(url, "dev-1")) >= queued + len(again), 30, "the queued alerts")
        stored = _stored(url, "dev-1")
        seqs = [r["seq"] for r in stored]
        assert seqs == sorted(set(seqs))  # none duplicated
        assert len(stored) == queued + len(again)  # none lost
        # The killed run's events come first, in order, then the restarted run's.
        _same_alerts(stored[: len(killed)], killed)
        _same_alerts(stored[queued:], again)
    finally:
        ctl.send_signal(signal.SIGTERM)
        ctl.wait(10)
