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


# The fleet tests compare paced runs with unpaced ones frame for frame. A zero-shot search
# builds on the worker, so under pacing its domain installs a number of frames later that depends
# on the machine; the fixed head builds between two batches. The search has its own tests.
NO_SEARCH = ["--set", "adapt.nas=false"]


def _device_args(
    port: int, outbox: Path, device: str = "dev-1", *, search: bool = False
) -> list[str]:
    """A device's run arguments; ``search``: keep the zero-shot search (the kill tests compare
    against a reference run that has it)."""
    return [
        *FAST_RUN_ARGS,
        *([] if search else NO_SEARCH),
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


# ------------------------------------------------------------------ in-process: the runtime side


def _config(port: int, tmp_path: Path, device: str) -> Any:
    from edge_runtime.config import RuntimeConfig

    return RuntimeConfig().with_overrides(
        {
            "encoder.input_size": "32",
            "hdc.dim": "2048",
            "adapt.steps": "60",
            "adapt.label_budget": "40",
            "adapt.nas": "false",  # see NO_SEARCH
            "fleet.enabled": "true",
            "fleet.host": "127.0.0.1",
            "fleet.port": str(port),
            "fleet.device_id": device,
            "fleet.outbox_dir": str(tmp_path / "outbox"),
            "fleet.reconnect_max_s": "1",
        }
    )


@pytest.fixture
def controller(mosquitto, tmp_path: Path):
    from edge_runtime.fleet.controller import FleetController

    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = open_store(url)
    ctl = FleetController(mosquitto.url, store)
    ctl.start()
    assert ctl.wait_ready(10)
    yield ctl, url
    ctl.stop()
    store.close()


def _final(metrics: dict[str, Any]) -> list[float | None]:
    return [s["final_accuracy"] for s in metrics["segments"]]


class Operator:
    """A scripted operator: answers every stored label request from the stream's labels."""

    def __init__(self, ctl: Any, url: str, device: str, labels: Any) -> None:
        import threading

        self.ctl, self.url, self.device, self.labels = ctl, url, device, labels
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        store = open_store(self.url)  # its own connection: the controller's writer has one
        try:
            while not self._stop.wait(0.02):
                for req in store.label_requests(self.device, unanswered=True):
                    frames = [int(f) for f in req["frames"]]
                    self.ctl.send(
                        self.device,
                        "labels",
                        {
                            "request_id": req["request_id"],
                            "frames": frames,
                            "labels": [int(self.labels[f]) for f in frames],
                        },
                    )
                    store.mark_answered(self.device, req["request_id"])
                    self.answered += len(frames)
        finally:
            store.close()

    def __enter__(self) -> Operator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_label_loop_adapts_as_the_stream_labels_do(mini, mosquitto, controller, tmp_path) -> None:
    from edge_runtime.data import load_stream
    from edge_runtime.runner import run_stream

    ctl, url = controller
    stream = load_stream(mini)
    cfg = _config(mosquitto.port, tmp_path, "dev-lab")
    offline = cfg.with_overrides({"fleet.enabled": "false"})
    reference = run_stream(stream, offline, tmp_path / "ref", progress=False, baselines=False)
    # At 100 fps a 32-frame batch takes 320 ms: room for the round trip device -> broker ->
    # store -> operator -> device even on 2 busy cores (at 400 fps, 80 ms, it was missed under
    # load and the labels landed a batch late).
    with Operator(ctl, url, "dev-lab", stream.labels) as operator:
        fleet = run_stream(
            stream, cfg, tmp_path / "fleet", progress=False, labels_from="fleet", rate=100
        )
    m, ref = fleet.metrics, reference.metrics
    assert m["labels_from"] == "fleet" and operator.answered > 0
    assert m["labels_used"] == ref["labels_used"] > 0
    assert [s["detected"] for s in m["segments"]] == [s["detected"] for s in ref["segments"]]
    for got, want in zip(_final(m), _final(ref), strict=True):
        if want is not None:
            assert got is not None and abs(got - want) <= 2.0, (_final(m), _final(ref))
    requests = open_store(url).label_requests("dev-lab")
    assert requests and all(r["thumbnails"] for r in requests)  # PNG thumbnails came along


def test_a_second_device_adapts_with_no_labels_from_an_adaptor_the_fleet_shares(
    mini, mosquitto, controller, tmp_path
) -> None:
    from edge_runtime.data import load_stream
    from edge_runtime.runner import run_stream

    _, url = controller
    stream = load_stream(mini)
    first = run_stream(
        stream, _config(mosquitto.port, tmp_path / "a", "dev-a"), tmp_path / "a", progress=False
    )
    store = open_store(url)
    _wait(lambda: len(store.adaptors()) >= 2, 30, "dev-a's adaptors in the store")
    # dev-b meets the same domains with no operator at all: every label request goes unanswered.
    second = run_stream(
        stream,
        _config(mosquitto.port, tmp_path / "b", "dev-b"),
        tmp_path / "b",
        progress=False,
        labels_from="fleet",
        rate=400,
    )
    installed = [e for e in second.events if e["type"] == "adaptor_installed"]
    assert installed and all(e["source_device"] == "dev-a" for e in installed)
    assert second.metrics["labels_used"] == 0
    offers = store.offers("dev-b")
    assert len(offers) >= len(installed)
    # Where dev-b installed dev-a's adaptor it serves that domain as dev-a does.
    segs_a, segs_b = first.metrics["segments"], second.metrics["segments"]
    served = {int(e["domain"]) for e in installed}
    for sa, sb in zip(segs_a, segs_b, strict=True):
        if sb["adaptor"] in served and sa["final_accuracy"] is not None:
            assert abs(sb["final_accuracy"] - sa["final_accuracy"]) <= 5.0, (sa, sb)
    store.close()


def test_malformed_commands_are_refused_while_the_runtime_keeps_serving(
    mini, mosquitto, tmp_path
) -> None:
    import base64

    import paho.mqtt.client as mqtt

    from edge_runtime.data import load_stream
    from edge_runtime.events import ListSink
    from edge_runtime.fleet.attach import attach
    from edge_runtime.fleet.payloads import CommandMessage
    from edge_runtime.runtime import Runtime

    stream = load_stream(mini)
    cfg = _config(mosquitto.port, tmp_path, "dev-cmd")
    rt = Runtime(cfg, background=False)
    rt.fit_base(stream.train_images, stream.train_labels)
    seen = rt.events.add_sink(ListSink())
    link = attach(rt, cfg.fleet)
    _wait(lambda: link.client.connected, 10, "the device to connect")
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    other_encoder = base64.b64encode(b"not a bundle").decode()
    bad = [
        b"{not json",
        json.dumps({"schema": 1, "id": "t1", "command": "rollback", "args": {"domain": "one"}}),
        json.dumps({"schema": 1, "id": "u1", "command": "reboot", "args": {}}),
        b"x" * (10 * 1024 * 1024),
        CommandMessage(
            "install_adaptor",
            {"bundle": other_encoder, "sha256": "0" * 64, "encoder_hash": rt.encoder_hash},
        ).to_json(),
        CommandMessage(
            "install_adaptor",
            {"bundle": other_encoder, "sha256": "0" * 64, "encoder_hash": "another-encoder"},
        ).to_json(),
        CommandMessage("rollback", {"domain": 7}).to_json(),  # valid shape, unknown domain
    ]
    try:
        start = 0
        for n, payload in enumerate(bad, 1):
            pub.publish("edge/dev-cmd/cmd", payload, qos=1).wait_for_publish(10)

            def refusals() -> int:
                return sum(e["type"] == "command_refused" for e in seen.events)

            # The client refuses what it cannot parse; a well-formed command waits in the
            # runtime's queue and is refused there, between batches.
            _wait(lambda n=n: refusals() >= n or len(rt.commands) > 0, 15, f"command {n}")
            dec = rt.process(stream.images[start : start + 32])  # serving goes on after each
            assert len(dec) == 32 and not dec.rejected.any()
            assert refusals() == n
            start += 32
        refused = [e for e in seen.events if e["type"] == "command_refused"]
        assert len(refused) == len(bad) and all(e["reason"] for e in refused)
        reasons = " | ".join(e["reason"] for e in refused)
        for why in ("JSON", "must be int", "unknown command", "limit", "checksum", "encoder"):
            assert why in reasons, (why, reasons)
        assert len(rt.domains) == 1  # nothing was installed
    finally:
        pub.loop_stop()
        link.close(5)
        rt.close()
